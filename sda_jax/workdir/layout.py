"""A run's folder: the one module that knows its layout, its records and the rules for reusing it.

    settings.json            the run's settings (`Settings.to_record`)
    model/                   config.json of the architecture (HF format, with the label names) and the
                             tokenizer files, ready to sit beside exported weights
    metrics.jsonl            train and dev records (`metrics_writer`)
    tensorboard/             the same as TensorBoard events
    training_curves.png      the curves, drawn at the end (`train.plot_curves`)
    checkpoints/train/       full train states for resume (`checkpoints.TrainCheckpoints`)
    checkpoints/best/model_<i>/   each model's best parameter sets by dev accuracy
    checkpoints/damaged/     checkpoints found damaged when a run resumed, moved aside (never deleted)
    summary.json             the run's summary (`run_summary`)
    sweep.csv, sweep.md      a sweep's table: per combination of its values, mean ± std over its seeds
    <train.predict_file>     the CLUE submission (and, with train.per_model_predictions, one per model)
    .lock                    held by the run that uses the folder (`RunLock`)

Export and prediction need nothing but the workdir. A workdir that holds a run with other
settings is never silently mixed with a new one: the run refuses unless told to start afresh. A
workdir in use by a live run is refused to a second one, with or without `--fresh`.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket

from sda_jax.config import Settings
from sda_jax.errors import InputError
from sda_jax.models.config import MASKED_LM_TYPES, BertConfig
from sda_jax.workdir import atomic_write

SETTINGS_FILE = "settings.json"
MODEL_DIR = "model"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "training_curves.png"
SUMMARY_FILE = "summary.json"
SWEEP_FILES = ("sweep.csv", "sweep.md")
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"
# A lock that cannot work on this filesystem (some network filesystems): a note, not a crash.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclasses.dataclass(frozen=True)
class RunOutputs:
    """What a finished run leaves in its folder, as text: the submission (and each model's), the
    sweep's tables (CSV and Markdown), the summary."""

    submission: str | None
    summary: dict
    per_model: tuple[str, ...] = ()
    sweep_tables: tuple[str, str] | None = None


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

    @property
    def damaged_checkpoints(self) -> pathlib.Path:
        return self.path / CHECKPOINTS_DIR / "damaged"

    def relative(self, path: pathlib.Path) -> str:
        """`path` as messages name it: relative to the workdir when it is inside it."""
        try:
            return str(pathlib.Path(path).relative_to(self.path))
        except ValueError:
            return str(path)

    def predictions(self, settings: Settings, model: int | None = None) -> pathlib.Path:
        """The submission file; with `model`, that model's own beside it (train.per_model_predictions)."""
        path = self.path / settings.train.predict_file
        return path if model is None else path.with_name(f"{path.stem}.model{model}{path.suffix}")

    @property
    def sweep_tables(self) -> tuple[pathlib.Path, pathlib.Path]:
        """sweep.csv and sweep.md."""
        return tuple(self.path / name for name in SWEEP_FILES)

    def outputs(self, settings: Settings) -> list[pathlib.Path]:
        """Everything a run writes here: what starting afresh removes, and nothing else."""
        fixed = (SETTINGS_FILE, MODEL_DIR, METRICS_FILE, TENSORBOARD_DIR, CURVES_FILE, SUMMARY_FILE, CHECKPOINTS_DIR, *SWEEP_FILES)
        submission = self.predictions(settings)
        per_model = sorted(self.path.glob(f"{submission.stem}.model*{submission.suffix}"))
        return [self.path / name for name in fixed] + [submission, *per_model]

    # --- starting a run ----------------------------------------------------------------------

    def write_outputs(self, settings: Settings, outputs: RunOutputs) -> None:
        """Writes a finished run's outputs, each file atomically, the summary last."""
        texts = {}
        if outputs.submission is not None:
            texts[self.predictions(settings)] = outputs.submission
        texts.update({self.predictions(settings, i): text for i, text in enumerate(outputs.per_model)})
        if outputs.sweep_tables is not None:
            texts.update(zip(self.sweep_tables, outputs.sweep_tables, strict=True))
        texts[self.summary_file] = json.dumps(outputs.summary, indent=2) + "\n"
        for path, text in texts.items():
            atomic_write.write_text(path, text)

    def prepare(self, settings: Settings, *, fresh: bool, lock: RunLock, masked_lm: bool = False) -> None:
        """Creates the folder and takes its `lock`, then checks that the run it holds is this one
        (a fine-tuning run, or with `masked_lm` a pretraining one); `fresh` removes the old run
        (never a live run's: the lock comes first).

        InputError if the folder is not writable, is in use by another run, or holds a run with
        other settings or of the other kind and `fresh` is not set.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise InputError(f"{self.path}: cannot write to the workdir ({err.strerror})") from None
        lock.hold()
        if (self.model_dir / "config.json").is_file() and not fresh and self.is_masked_lm() != masked_lm:
            kinds = ("a fine-tuning run (sda_jax.train)", "a masked-LM pretraining run (sda_jax.pretrain)")
            raise InputError(
                f"{self.path}: holds {kinds[not masked_lm]}, not {kinds[masked_lm]}; use another --workdir or pass --fresh"
            )
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

    def write_records(self, settings: Settings, config: BertConfig, tokenizer, masked_lm: bool = False) -> None:
        """settings.json and model/{config.json (of the classifier or the masked-LM model), tokenizer files}."""
        atomic_write.write_text(self.settings_file, settings.to_record())
        self.model_dir.mkdir(exist_ok=True)
        hf_config = config.to_hf_dict(settings.data.label_names, masked_lm)
        atomic_write.write_text(self.model_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
        tokenizer.save_pretrained(str(self.model_dir))

    def truncate_metrics(self, step: int) -> None:
        """Drops metrics logged after `step`: a run resumed from that step logs them again."""
        if self.metrics_file.exists():
            lines = self.metrics_file.read_text(encoding="utf-8").splitlines(keepends=True)
            atomic_write.write_text(self.metrics_file, "".join(line for line in lines if json.loads(line)["step"] <= step))

    # --- one run at a time ------------------------------------------------------------------

    def lock(self) -> RunLock:
        return RunLock(self)

    def training_run(self) -> str | None:
        """Who holds the folder's lock ("pid N on HOST, since ..."), if a live run does; else None."""
        path = self.path / LOCK_FILE
        if not path.is_file():
            return None
        with path.open("r", encoding="utf-8") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder(file)
            except OSError as err:
                if err.errno in _NO_LOCKS:
                    return None
                raise
            fcntl.flock(file, fcntl.LOCK_UN)
            return None

    # --- reading a run -----------------------------------------------------------------------

    def check_is_run(self) -> None:
        """InputError unless the folder holds an sda-jax run (its model record, at least)."""
        if not (self.model_dir / "config.json").is_file():
            raise InputError(f"{self.path}: not an sda-jax run folder (no {MODEL_DIR}/config.json)")

    def is_masked_lm(self) -> bool:
        """Whether the folder holds a masked-LM pretraining run (its model record says so)."""
        record = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        return record.get("architectures", [""])[0] in MASKED_LM_TYPES.values()

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


class RunLock:
    """A run's exclusive hold on its workdir: an OS file lock (flock) on workdir/.lock, which the
    kernel releases when the process ends, however it ends, so a SIGKILLed run leaves no stale
    lock. The file records the holder (pid, host, start) for the message a second run gets."""

    def __init__(self, workdir: Workdir):
        self.workdir = workdir
        self._file = None
        self.note = ""  # why no lock is held, where the filesystem cannot lock

    def hold(self) -> None:
        """Takes the lock (a no-op when held, and on a filesystem that cannot lock: see `note`);
        InputError naming the holder if another run has it."""
        if self._file is not None or self.note:
            return
        try:
            file = (self.workdir.path / LOCK_FILE).open("a+", encoding="utf-8")
        except OSError as err:
            raise InputError(f"{self.workdir.path}: cannot write to the workdir ({err.strerror})") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(file)
            file.close()
            raise InputError(
                f"{self.workdir.path}: in use by a run that is still going ({holder}); wait for it to end, "
                "or use another --workdir"
            ) from None
        except OSError as err:
            file.close()
            if err.errno not in _NO_LOCKS:
                raise
            self.note = f"note: {self.workdir.path}: this filesystem cannot lock files ({err.strerror}); make sure no other run uses the workdir"
            print(self.note)
            return
        file.seek(0)
        file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _holder(file) -> str:
    file.seek(0)
    try:
        record = json.loads(file.read() or "{}")
        return f"pid {record['pid']} on {record['host']}, since {record['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process whose record is unreadable"
