"""Export a run's best checkpoint as a Hugging Face `BertForSequenceClassification` folder
(`ErnieForSequenceClassification` for a run of an ERNIE checkpoint).

    python -m sda_jax.export --workdir runs/afqmc_small --out exported/afqmc_small
    python -m sda_jax.export --workdir runs/afqmc_small --out exported/teacher --params teacher
    python -m sda_jax.export --workdir runs/seeds --out exported/seed2022 --seed 2022

The folder holds `config.json` (with the run's label names as id2label/label2id),
`model.safetensors` and the run's tokenizer files, so that plain PyTorch `transformers` serves it:

    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    transformers.pipeline("text-classification", model=out)({"text": a, "text_pair": b})

`--params` picks one of the parameter sets of the best checkpoint: `eval_ema` (default: the
parameters dev evaluation scored, which equal the student until the eval EMA starts), `teacher`
(the SDA teacher; not a vote teacher, which is an ensemble of snapshots, not one model) or
`student`. A run of several seeds (`train.seeds`) exports one seed's best model, `--seed S`; their
ensemble is not one model. The export is written into a temporary sibling folder that is renamed into place once
complete, so an interrupted export leaves no half-written `--out`. An unusable workdir or `--out`
stops with a one-line `error:` and exit status 2. The command line is in `sda_jax.main`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

from sda_jax import atomic_write, checkpoints
from sda_jax.checkpoints import BEST_DIR
from sda_jax.errors import InputError
from sda_jax.run_record import MODEL_DIR, SETTINGS_FILE, read_model_record, read_settings_record

PARAM_SETS = ("eval_ema", "teacher", "student")
WEIGHTS_FILE = "model.safetensors"
EXPORT_INFO_FILE = "sda_jax_export.json"  # provenance: run, step, parameter set, dev metrics


def check_workdir(workdir: pathlib.Path, params_name: str, seed: int | None = None) -> int | None:
    """Raises InputError unless `workdir` is an sda-jax run folder whose best checkpoint holds
    `params_name` as one model (of `seed`, for a run of several seeds, which must name one).
    Cheap file-system checks only, so the command fails fast. Returns the seed whose best
    checkpoint to read (None: the run's only one)."""
    if params_name not in PARAM_SETS:
        raise InputError(f"--params: {params_name!r} is not one of {', '.join(PARAM_SETS)}")
    if not (workdir / MODEL_DIR / "config.json").is_file():
        raise InputError(f"{workdir}: not an sda-jax run folder (no {MODEL_DIR}/config.json)")
    if params_name == "teacher" and read_settings_record(workdir).get("sda", {}).get("teacher") == "vote":
        raise InputError(
            f"{workdir}: its vote teacher averages the logits of several student snapshots and is not one model; "
            "export --params eval_ema or --params student, or train with sda.teacher=window (mean parameters)"
        )
    folder_seed = _seed_folder(workdir, seed)
    if not checkpoints.has_best(workdir, folder_seed):
        raise InputError(f"{workdir}: no best checkpoint in {BEST_DIR}/ (did the run reach its first dev evaluation?)")
    return folder_seed


def _seed_folder(workdir: pathlib.Path, seed: int | None) -> int | None:
    """The seed of the best checkpoint to export: None for a run of one seed (which `seed`, if
    given, must be), else `seed`, which a run of several must be given."""
    if not (workdir / SETTINGS_FILE).is_file():
        return None  # an incomplete folder: the best-checkpoint check says what is missing
    settings = read_settings_record(workdir)
    seeds = settings.get("train", {}).get("seeds") or [settings.get("seed")]
    listed = ", ".join(map(str, seeds))
    if seed is not None and seed not in seeds:
        raise InputError(f"--seed: {workdir} trained seed(s) {listed}, not {seed}")
    if len(seeds) == 1:
        return None
    if seed is None:
        raise InputError(
            f"{workdir}: trained {len(seeds)} seeds ({listed}); their ensemble (the mean of their logits) is not "
            "one model: export one of them with --seed S"
        )
    return seed


def check_out(out: pathlib.Path) -> None:
    """Raises InputError if `out` exists and is not an empty folder."""
    if out.is_dir():
        if any(out.iterdir()):
            raise InputError(f"{out}: already exists and is not empty; choose another --out or remove it")
    elif out.exists():
        raise InputError(f"{out}: already exists and is not a folder")


def restore_best(
    workdir: pathlib.Path, params_name: str = "eval_ema", seed: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One parameter set of the run's best checkpoint (of `seed` in a run of several), as float32
    numpy arrays, and its metrics.

    Needs no train state: the tree to restore into comes from the run's model config, traced with
    `jax.eval_shape`. Only the requested set is read from disk.
    """
    import jax

    from sda_jax.models import init_params

    folder_seed = check_workdir(workdir, params_name, seed)
    config, _ = read_model_record(workdir)
    # Runs from before model.scan_layers existed kept their layers unrolled.
    scan_layers = read_settings_record(workdir).get("model", {}).get("scan_layers", False)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), scan_layers))
    return checkpoints.restore_best_params(workdir, params_name, shapes, folder_seed)


def export(workdir: pathlib.Path, out: pathlib.Path, params_name: str = "eval_ema", seed: int | None = None) -> dict[str, Any]:
    """Writes the Hugging Face folder `out` from the run in `workdir`; returns the export info.

    Raises InputError for a workdir that is not a run folder or has no such checkpoint, and for
    an `out` that exists and is not an empty folder.
    """
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    check_workdir(workdir, params_name, seed)
    check_out(out)
    import safetensors.numpy

    from sda_jax.hf_checkpoint import state_dict_from_params

    config, label_names = read_model_record(workdir)
    params, metrics = restore_best(workdir, params_name, seed)
    info = {"workdir": str(workdir.resolve()), "params": params_name, "seed": seed, "checkpoint": metrics}
    try:
        with atomic_write.new_folder(out) as tmp:
            for source in sorted((workdir / MODEL_DIR).iterdir()):  # the tokenizer files
                if source.is_file() and source.name != "config.json":
                    shutil.copy2(source, tmp / source.name)
            hf_config = config.to_hf_dict(label_names)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
            state_dict = state_dict_from_params(params, config.model_type)  # Bert- or ErnieForSequenceClassification
            safetensors.numpy.save_file(state_dict, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            check_out(out)  # again: someone may have filled it meanwhile
    except OSError as err:
        raise InputError(f"{out}: cannot write the export ({err.strerror or err})") from None
    return info


if __name__ == "__main__":
    from sda_jax import main

    main.run_export()
