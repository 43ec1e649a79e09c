"""A run's folder: the one module that knows its layout, its records and the rules for reusing it.

    settings.json            the run's settings (`Settings.to_record`)
    model/                   config.json of the architecture (HF format, with the label names) and the
                             tokenizer files, ready to sit beside exported weights
    metrics.jsonl            train and dev records (`metrics_writer`)
    tensorboard/             the same as TensorBoard events
    training_curves.png      the curves, drawn at the end
    checkpoints/train/       full train states for resume (`checkpoints.TrainCheckpoints`)
    checkpoints/best/model_<i>/   each model's best parameter sets by dev accuracy
    summary.json             the run's summary (`run_summary`)
    <train.predict_file>     the CLUE submission (and, with train.per_seed_predictions, one per seed)

Export and prediction need nothing but the workdir. A workdir that holds a run with other
settings is never silently mixed with a new one: the run refuses unless told to start afresh.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

from sda_jax import atomic_write
from sda_jax.bert_config import BertConfig
from sda_jax.errors import InputError
from sda_jax.settings import Settings

SETTINGS_FILE = "settings.json"
MODEL_DIR = "model"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "training_curves.png"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Workdir:
    path: pathlib.Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", pathlib.Path(self.path))

    # --- the layout --------------------------------------------------------------------------

    @property
    def settings_file(self) -> pathlib.Path:
        return self.path / SETTINGS_FILE

    @property
    def model_dir(self) -> pathlib.Path:
        return self.path / MODEL_DIR

    @property
    def metrics_file(self) -> pathlib.Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard_dir(self) -> pathlib.Path:
        return self.path / TENSORBOARD_DIR

    @property
    def curves_file(self) -> pathlib.Path:
        return self.path / CURVES_FILE

    @property
    def summary_file(self) -> pathlib.Path:
        return self.path / SUMMARY_FILE

    @property
    def train_checkpoints(self) -> pathlib.Path:
        return self.path / CHECKPOINTS_DIR / "train"

    def best_checkpoint(self, model: int) -> pathlib.Path:
        """Where model `model`'s best checkpoint (by dev accuracy) lives."""
        return self.path / CHECKPOINTS_DIR / "best" / f"model_{model}"

    def predictions(self, settings: Settings, seed: int | None = None) -> pathlib.Path:
        """The submission file; with `seed`, that seed's own beside it (train.per_seed_predictions)."""
        path = self.path / settings.train.predict_file
        return path if seed is None else path.with_name(f"{path.stem}.seed{seed}{path.suffix}")

    def outputs(self, settings: Settings) -> list[pathlib.Path]:
        """Everything a run writes here: what starting afresh removes, and nothing else."""
        fixed = (SETTINGS_FILE, MODEL_DIR, METRICS_FILE, TENSORBOARD_DIR, CURVES_FILE, SUMMARY_FILE, CHECKPOINTS_DIR)
        per_seed = [self.predictions(settings, seed) for seed in settings.train.seeds or ()]
        return [self.path / name for name in fixed] + [self.predictions(settings), *per_seed]

    # --- starting a run ----------------------------------------------------------------------

    def prepare(self, settings: Settings, *, fresh: bool) -> None:
        """Creates the folder, or checks that the run it holds is this one; `fresh` removes the old run.

        InputError if the folder is not writable, or holds a run with other settings and `fresh`
        is not set.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise InputError(f"{self.path}: cannot write to the workdir ({err.strerror})") from None
        if self.settings_file.exists() and not fresh:
            old = json.loads(self.settings_file.read_text(encoding="utf-8"))
            changed = sorted(_changed_keys(old, json.loads(settings.to_record())))
            if changed:
                raise InputError(
                    f"{self.path}: holds a run with other settings ({', '.join(changed[:4])}"
                    f"{', ...' if len(changed) > 4 else ''}); pass --fresh (alias --overwrite) to replace it or use another --workdir"
                )
        if fresh:
            for path in self.outputs(settings):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()

    def write_records(self, settings: Settings, config: BertConfig, tokenizer) -> None:
        """settings.json and model/{config.json, tokenizer files}."""
        atomic_write.write_text(self.settings_file, settings.to_record())
        self.model_dir.mkdir(exist_ok=True)
        hf_config = config.to_hf_dict(settings.data.label_names)
        atomic_write.write_text(self.model_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
        tokenizer.save_pretrained(str(self.model_dir))

    def truncate_metrics(self, step: int) -> None:
        """Drops metrics logged after `step`: a run resumed from that step logs them again."""
        if self.metrics_file.exists():
            lines = self.metrics_file.read_text(encoding="utf-8").splitlines(keepends=True)
            atomic_write.write_text(self.metrics_file, "".join(line for line in lines if json.loads(line)["step"] <= step))

    # --- reading a run -----------------------------------------------------------------------

    def check_is_run(self) -> None:
        """InputError unless the folder holds an sda-jax run (its model record, at least)."""
        if not (self.model_dir / "config.json").is_file():
            raise InputError(f"{self.path}: not an sda-jax run folder (no {MODEL_DIR}/config.json)")

    def read_settings(self) -> Settings:
        return Settings.from_record(self.settings_file)

    def read_model(self) -> tuple[BertConfig, list[str]]:
        """The architecture and label names of the run."""
        self.check_is_run()
        config_path = self.model_dir / "config.json"
        config = BertConfig.from_json_file(config_path)
        id2label = json.loads(config_path.read_text(encoding="utf-8"))["id2label"]
        return config, [id2label[str(i)] for i in range(len(id2label))]


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]
