"""What a workdir records about its run, so that export and prediction need nothing but the workdir.

    workdir/settings.json     the run's settings, as read from the config
    workdir/model/            config.json of the architecture (HF format, with the label names)
                              and the tokenizer files, ready to sit beside exported weights
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import transformers

from sda_jax.errors import InputError
from sda_jax.evaluate import write_text_atomically
from sda_jax.models import BertConfig

MODEL_DIR = "model"
SETTINGS_FILE = "settings.json"


def write_run_record(
    workdir: pathlib.Path,
    settings: Any,
    config: BertConfig,
    label_names: Sequence[str],
    tokenizer: transformers.PreTrainedTokenizerFast,
) -> None:
    """Writes settings.json and model/{config.json, tokenizer files}."""
    record = json.dumps(dataclasses.asdict(settings), indent=2, default=str)
    write_text_atomically(workdir / SETTINGS_FILE, record + "\n")
    model_dir = workdir / MODEL_DIR
    model_dir.mkdir(exist_ok=True)
    write_text_atomically(model_dir / "config.json", json.dumps(config.to_hf_dict(label_names), indent=2) + "\n")
    tokenizer.save_pretrained(str(model_dir))


def read_model_record(workdir: pathlib.Path) -> tuple[BertConfig, list[str]]:
    """The architecture and label names of the run in `workdir`."""
    config_path = workdir / MODEL_DIR / "config.json"
    if not config_path.is_file():
        raise InputError(f"{workdir}: not an sda-jax run folder (no {MODEL_DIR}/config.json)")
    config = BertConfig.from_json_file(config_path)
    id2label = json.loads(config_path.read_text(encoding="utf-8"))["id2label"]
    return config, [id2label[str(i)] for i in range(len(id2label))]
