"""Export a run's best checkpoint as a Hugging Face `BertForSequenceClassification` folder
(`ErnieForSequenceClassification` for a run of an ERNIE checkpoint); a masked-LM pretraining run's
(`sda_jax.pretrain`) as a `BertForMaskedLM` (`ErnieForMaskedLM`) folder, which `fill-mask` serves
and `model.dir` fine-tunes from.

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
`student`. A run of several models (a sweep) exports one model's best, chosen with `--seed S`,
`--model I` or `--values KEY=VALUE,...` (its swept values); their ensemble is not one model. The export is written into a temporary sibling
folder that is renamed into place once complete, so an interrupted export leaves no half-written
`--out`. An unusable workdir or `--out` stops with a one-line `error:` and exit status 2. The
command line is in `sda_jax.commands`.
"""

from __future__ import annotations

import ast
import json
import pathlib
import shutil
from typing import Any

from sda_jax.config import Settings
from sda_jax.errors import InputError
from sda_jax.step.model_axis import Models
from sda_jax.workdir import atomic_write, checkpoints
from sda_jax.workdir.layout import Workdir

PARAM_SETS = ("eval_ema", "teacher", "student")
WEIGHTS_FILE = "model.safetensors"
EXPORT_INFO_FILE = "sda_jax_export.json"  # provenance: run, step, parameter set, dev metrics


def check_workdir(
    workdir: Workdir, params_name: str, seed: int | None = None, model: int | None = None, *, while_training: bool = False,
    values: str | None = None,
) -> tuple[Settings, int, str | None]:  # fmt: skip
    """The run's settings, the model whose best checkpoint to read, and who trains the run if it is
    still training (then refused unless `while_training`); InputError unless `workdir` is an sda-jax
    run folder whose best checkpoint of that model holds `params_name` as one model. Cheap
    file-system checks only, so the command fails fast."""
    if params_name not in PARAM_SETS:
        raise InputError(f"--params: {params_name!r} is not one of {', '.join(PARAM_SETS)}")
    workdir.check_is_run()
    settings = workdir.read_settings()
    if params_name == "teacher" and workdir.is_masked_lm():
        raise InputError(f"{workdir.path}: a masked-LM pretraining run has no teacher; export --params eval_ema or student (the same: its one set)")
    if params_name == "teacher" and settings.sda.teacher == "vote":
        raise InputError(
            f"{workdir.path}: its vote teacher averages the logits of several student snapshots and is not one model; "
            "export --params eval_ema or --params student, or train with sda.teacher=window (mean parameters)"
        )
    index = _model_index(workdir, settings, seed, model, values)
    holder = workdir.training_run()
    if holder is not None and not while_training:
        raise InputError(
            f"{workdir.path}: its run is still training ({holder}); wait until it ends, or pass --while_training to "
            "export its best checkpoint so far"
        )
    if not checkpoints.has_best(workdir.best_checkpoint(index)):
        raise InputError(f"{workdir.path}: no best checkpoint of model {index} (did the run reach its first dev evaluation?)")
    return settings, index, holder


def _model_index(workdir: Workdir, settings: Settings, seed: int | None, model: int | None, values: str | None = None) -> int:
    """The model to export: the run's only one, or the one `--seed`, `--model` or `--values` names."""
    models = Models.of(settings)
    described = models.describe()
    if sum(x is not None for x in (seed, model, values)) > 1:
        raise InputError("--seed, --model and --values: give one of them")
    if seed is not None or values is not None:
        wanted = {"seed": seed} if seed is not None else _parse_values(values)
        matches = [m["model"] for m in described if all(_same(m.get(k), v) for k, v in wanted.items())]
        flag = "--seed" if seed is not None else "--values"
        if not matches:
            raise InputError(f"{flag}: {workdir.path} trained no model of {wanted} (its models: {_listed(described)})")
        if len(matches) > 1:
            raise InputError(f"{flag}: {workdir.path} trained {len(matches)} models of {wanted} ({matches}); name its other values too")
        return matches[0]
    if model is not None:
        if not 0 <= model < models.count:
            raise InputError(f"--model: {workdir.path} trained models 0 to {models.count - 1}, not {model}")
        return model
    if models.count > 1:
        raise InputError(
            f"{workdir.path}: trained {models.count} models ({_listed(described)}); their ensemble (the mean of their logits) "
            "is not one model: export one of them with --seed S, --model I or --values KEY=VALUE,..."
        )
    return 0


def _parse_values(text: str) -> dict[str, Any]:
    """--values "optim.learning_rate=3e-5,seed=2" -> {"optim.learning_rate": 3e-05, "seed": 2}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, equals, value = part.partition("=")
        if not equals:
            raise InputError(f"--values: expected KEY=VALUE,..., got {part!r}")
        try:
            out[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise InputError(f"--values: {part!r} is not KEY=NUMBER") from None
    return out


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, (int, float)) and abs(a - b) <= 1e-12 * max(abs(a), abs(b)))


def _listed(described: list[dict[str, Any]]) -> str:
    return "; ".join(", ".join(f"{k}={v}" for k, v in m.items()) for m in described[:6]) + ("; ..." if len(described) > 6 else "")


def check_out(out: pathlib.Path) -> None:
    """Raises InputError if `out` exists and is not an empty folder."""
    if out.is_dir():
        if any(out.iterdir()):
            raise InputError(f"{out}: already exists and is not empty; choose another --out or remove it")
    elif out.exists():
        raise InputError(f"{out}: already exists and is not a folder")


def restore_best(
    workdir: pathlib.Path, params_name: str = "eval_ema", seed: int | None = None, model: int | None = None,
    values: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """One parameter set of a model's best checkpoint, as float32 numpy arrays, and its metrics.

    Needs no train state: the tree to restore into comes from the run's model config, traced with
    `jax.eval_shape`. Only the requested set is read from disk.
    """
    run = Workdir(workdir)
    settings, index, _ = check_workdir(run, params_name, seed, model, while_training=True, values=values)
    return _restore(run, settings, index, params_name)


def _restore(run: Workdir, settings: Settings, index: int, params_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import jax

    from sda_jax.models.bert import init_params
    from sda_jax.models.masked_lm import init_mlm_params

    config, _ = run.read_model()
    # A pretraining run keeps one set, the student, which is what its eval_ema would be (as in a
    # fine-tuning run before its eval EMA starts).
    masked_lm = run.is_masked_lm()
    init = init_mlm_params if masked_lm else init_params
    shapes = jax.eval_shape(lambda: init(config, jax.random.key(0), settings.model.scan_layers))
    return checkpoints.restore_best_params(run.best_checkpoint(index), "student" if masked_lm else params_name, shapes)


def export(
    workdir: pathlib.Path, out: pathlib.Path, params_name: str = "eval_ema", seed: int | None = None, model: int | None = None,
    *, while_training: bool = False, values: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Writes the Hugging Face folder `out` from the run in `workdir`; returns the export info.

    Raises InputError for a workdir that is not a run folder or has no such checkpoint, whose run
    is still training (unless `while_training`: then its best checkpoint so far), and for an `out`
    that exists and is not an empty folder.
    """
    run, out = Workdir(workdir), pathlib.Path(out)
    settings, index, holder = check_workdir(run, params_name, seed, model, while_training=while_training, values=values)
    check_out(out)
    import safetensors.numpy

    from sda_jax.hf.convert import state_dict_from_params

    config, label_names = run.read_model()
    params, metrics = _restore(run, settings, index, params_name)
    info = {
        "workdir": str(run.path.resolve()), "params": "student" if run.is_masked_lm() else params_name, **Models.of(settings).describe()[index],
        "checkpoint": metrics, "while_training": holder is not None,
    }  # fmt: skip
    try:
        with atomic_write.new_folder(out) as tmp:
            for source in sorted(run.model_dir.iterdir()):  # the tokenizer files
                if source.is_file() and source.name != "config.json":
                    shutil.copy2(source, tmp / source.name)
            hf_config = config.to_hf_dict(label_names, masked_lm=run.is_masked_lm())
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
            state_dict = state_dict_from_params(params, config.model_type)  # Bert/Ernie ForSequenceClassification or ForMaskedLM
            safetensors.numpy.save_file(state_dict, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            check_out(out)  # again: someone may have filled it meanwhile
    except OSError as err:
        raise InputError(f"{out}: cannot write the export ({err.strerror or err})") from None
    return info


if __name__ == "__main__":
    from sda_jax import commands

    commands.run_export(export, PARAM_SETS)
