"""Export a run's best checkpoint as a Hugging Face `BertForSequenceClassification` folder.

    python -m sda_jax.export --workdir runs/afqmc_small --out exported/afqmc_small
    python -m sda_jax.export --workdir runs/afqmc_small --out exported/teacher --params teacher

The folder holds `config.json` (with the run's label names as id2label/label2id),
`model.safetensors` and the run's tokenizer files, so that plain PyTorch `transformers` serves it:

    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    transformers.pipeline("text-classification", model=out)({"text": a, "text_pair": b})

`--params` picks one of the three parameter sets of the best checkpoint: `eval_ema` (default: the
parameters dev evaluation scored, which equal the student until the eval EMA starts), `teacher`
(the SDA teacher) or `student`. The export is written into a temporary sibling folder that is
renamed into place once complete, so an interrupted export leaves no half-written `--out`.
An unusable workdir or `--out` stops with a one-line `error:` and exit status 2.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

from absl import app, flags, logging

from sda_jax.checkpoints import BEST_DIR
from sda_jax.errors import InputError
from sda_jax.run_record import MODEL_DIR

PARAM_SETS = ("eval_ema", "teacher", "student")
WEIGHTS_FILE = "model.safetensors"
EXPORT_INFO_FILE = "sda_jax_export.json"  # provenance: run, step, parameter set, dev metrics


def check_workdir(workdir: pathlib.Path) -> None:
    """Raises InputError unless `workdir` is an sda-jax run folder with a best checkpoint.

    Cheap file-system checks only (no JAX, no orbax), so the CLI fails fast.
    """
    if not (workdir / MODEL_DIR / "config.json").is_file():
        raise InputError(f"{workdir}: not an sda-jax run folder (no {MODEL_DIR}/config.json)")
    best = workdir / BEST_DIR
    # Orbax names a finished step's folder by its number; unfinished writes carry a tmp suffix.
    if not best.is_dir() or not any(p.is_dir() and p.name.isdigit() for p in best.iterdir()):
        raise InputError(f"{workdir}: no best checkpoint in {BEST_DIR}/ (did the run reach its first dev evaluation?)")


def check_out(out: pathlib.Path) -> None:
    """Raises InputError if `out` exists and is not an empty folder."""
    if out.is_dir():
        if any(out.iterdir()):
            raise InputError(f"{out}: already exists and is not empty; choose another --out or remove it")
    elif out.exists():
        raise InputError(f"{out}: already exists and is not a folder")


def restore_best(workdir: pathlib.Path, params_name: str = "eval_ema") -> tuple[dict[str, Any], dict[str, Any]]:
    """One parameter set of the run's best checkpoint, as float32 numpy arrays, and its metrics.

    Needs no train state: the tree to restore into comes from the run's model config, traced with
    `jax.eval_shape`. Only the requested set is read from disk.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from sda_jax.models import init_params
    from sda_jax.run_record import read_model_record

    if params_name not in PARAM_SETS:
        raise InputError(f"--params: {params_name!r} is not one of {', '.join(PARAM_SETS)}")
    check_workdir(workdir)
    config, _ = read_model_record(workdir)
    best = (workdir / BEST_DIR).resolve()
    manager = ocp.CheckpointManager(best, options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = manager.latest_step()
        if step is None:
            raise InputError(f"{workdir}: no complete best checkpoint in {BEST_DIR}/")
        metrics = manager.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))["metrics"]
    finally:
        manager.close()
    # The params item was written by StandardSave, which is a PyTree checkpoint: reading it with
    # the PyTree handler allows a partial restore. ShapeDtypeStruct + RestoreArgs(np.ndarray)
    # restore as host numpy arrays, whatever the devices the run used.
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    like = {params_name: shapes}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), like)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                best / str(step) / "params",
                args=ocp.args.PyTreeRestore(item=like, restore_args=restore_args, partial_restore=True),
            )
    except (ValueError, KeyError, FileNotFoundError) as err:  # e.g. another architecture than model/config.json
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{best / str(step)}: cannot restore the {params_name} params of {MODEL_DIR}/config.json: {first}"
        ) from None
    params = restored[params_name]
    # A key missing on disk stays a ShapeDtypeStruct under partial_restore.
    restored_all = all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    if not restored_all or jax.tree.map(np.shape, params) != jax.tree.map(np.shape, shapes):
        raise InputError(
            f"{best / str(step)}: the {params_name} params do not fit the architecture in {MODEL_DIR}/config.json"
        )
    return params, {"step": step, **dict(metrics)}


def export(workdir: pathlib.Path, out: pathlib.Path, params_name: str = "eval_ema") -> dict[str, Any]:
    """Writes the Hugging Face folder `out` from the run in `workdir`; returns the export info.

    Raises InputError for a workdir that is not a run folder or has no checkpoint, and for an
    `out` that exists and is not an empty folder.
    """
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    check_workdir(workdir)
    check_out(out)
    import safetensors.numpy

    from sda_jax.hf_checkpoint import state_dict_from_params
    from sda_jax.run_record import read_model_record

    config, label_names = read_model_record(workdir)
    params, metrics = restore_best(workdir, params_name)
    info = {"workdir": str(workdir.resolve()), "params": params_name, "checkpoint": metrics}

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise InputError(f"{out}: cannot create the export folder ({err.strerror or err})") from None
    try:
        for source in sorted((workdir / MODEL_DIR).iterdir()):  # the tokenizer files
            if source.is_file() and source.name != "config.json":
                shutil.copy2(source, tmp / source.name)
        hf_config = config.to_hf_dict(label_names)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        safetensors.numpy.save_file(state_dict_from_params(params), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        umask = _umask()  # mkdtemp makes a 0700 folder, safetensors a 0600 file: give them the usual modes
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~umask)
        check_out(out)  # again: someone may have filled it meanwhile
        os.replace(tmp, out)  # atomic; replaces an empty folder
    except OSError as err:
        raise InputError(f"{out}: cannot write the export ({err.strerror or err})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so that importing this module beside
    sda_jax.train (which defines --workdir too) cannot clash."""
    flags.DEFINE_string("workdir", None, "The run folder (the --workdir of sda_jax.train).")
    flags.DEFINE_string("out", None, "The folder to write (must not exist, or be empty).")
    flags.DEFINE_enum(
        "params",
        "eval_ema",
        PARAM_SETS,
        "Which parameters of the best checkpoint: eval_ema (what dev scored), teacher, student.",
    )
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every operation at INFO
    out = pathlib.Path(flags.FLAGS.out)
    try:
        info = export(pathlib.Path(flags.FLAGS.workdir), out, flags.FLAGS.params)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    checkpoint = info["checkpoint"]
    accuracy = f", dev accuracy {checkpoint['accuracy']:.4f}" if "accuracy" in checkpoint else ""
    print(f"Exported the {info['params']} parameters of step {checkpoint['step']}{accuracy} to {out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
