"""What a workdir records about its run, and the rules for reusing a workdir.

    workdir/settings.json     the run's settings, as read from the config
    workdir/model/            config.json of the architecture (HF format, with the label names)
                              and the tokenizer files, ready to sit beside exported weights

Export and prediction need nothing but the workdir. A workdir that holds a run with other
settings is never silently mixed with a new one: the run refuses unless told to overwrite.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import transformers

from sda_jax import atomic_write
from sda_jax.bert_config import BertConfig
from sda_jax.errors import InputError
from sda_jax.metrics_writer import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR

MODEL_DIR = "model"
SETTINGS_FILE = "settings.json"
# Everything a run writes into its workdir; a fresh start removes these and nothing else.
RUN_OUTPUTS = ("checkpoints", TENSORBOARD_DIR, MODEL_DIR, SETTINGS_FILE, METRICS_FILE, "summary.json", CURVES_FILE)


def settings_record(settings: Any) -> str:
    return json.dumps(dataclasses.asdict(settings), indent=2, default=str) + "\n"


def prepare_workdir(workdir: pathlib.Path, settings: Any, predict_file: str, *, fresh: bool) -> None:
    """Creates the workdir, or checks that the run it holds is this one; `fresh` wipes the old run.

    Raises InputError if the workdir is not writable, or holds a run with other settings and
    `fresh` is not set.
    """
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise InputError(f"{workdir}: cannot write to the workdir ({err.strerror})") from None
    previous = workdir / SETTINGS_FILE
    if previous.exists() and not fresh:
        old = json.loads(previous.read_text(encoding="utf-8"))
        new = json.loads(settings_record(settings))
        changed = sorted(_changed_keys(old, new))
        if changed:
            raise InputError(
                f"{workdir}: holds a run with other settings ({', '.join(changed[:4])}"
                f"{', ...' if len(changed) > 4 else ''}); pass --fresh (alias --overwrite) to replace it or use another --workdir"
            )
    if fresh:
        for name in (*RUN_OUTPUTS, predict_file):
            path = workdir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def truncate_metrics(workdir: pathlib.Path, step: int) -> None:
    """Drops metrics logged after `step`: a resumed run logs those steps again."""
    path = workdir / METRICS_FILE
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        atomic_write.write_text(path, "".join(line for line in lines if json.loads(line)["step"] <= step))


def write_run_record(
    workdir: pathlib.Path,
    settings: Any,
    config: BertConfig,
    label_names: Sequence[str],
    tokenizer: transformers.PreTrainedTokenizerFast,
) -> None:
    """Writes settings.json and model/{config.json, tokenizer files}."""
    atomic_write.write_text(workdir / SETTINGS_FILE, settings_record(settings))
    model_dir = workdir / MODEL_DIR
    model_dir.mkdir(exist_ok=True)
    atomic_write.write_text(model_dir / "config.json", json.dumps(config.to_hf_dict(label_names), indent=2) + "\n")
    tokenizer.save_pretrained(str(model_dir))


def read_model_record(workdir: pathlib.Path) -> tuple[BertConfig, list[str]]:
    """The architecture and label names of the run in `workdir`."""
    config_path = workdir / MODEL_DIR / "config.json"
    if not config_path.is_file():
        raise InputError(f"{workdir}: not an sda-jax run folder (no {MODEL_DIR}/config.json)")
    config = BertConfig.from_json_file(config_path)
    id2label = json.loads(config_path.read_text(encoding="utf-8"))["id2label"]
    return config, [id2label[str(i)] for i in range(len(id2label))]


def read_settings_record(workdir: pathlib.Path) -> dict[str, Any]:
    """The settings of the run in `workdir`, as settings.json holds them."""
    path = workdir / SETTINGS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{workdir}: not an sda-jax run folder (no {SETTINGS_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not readable as the run's settings ({err})") from None
