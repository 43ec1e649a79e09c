"""Every config key, once: its type, default, check and one-line comment, read into frozen settings.

The sections below are frozen dataclasses whose fields are the config keys (`optim.learning_rate`
is `OptimSettings.learning_rate`). Each field's `key(...)` holds the default, the one-line comment
and the bounds its value is checked against; `None` means "off" or "auto" where the comment says
so. From these:

* `default_config()` is the ml_collections ConfigDict that `configs/default.py` returns (a key with
  a `None` default is a typed placeholder, so `--config.train.max_steps=200` parses as an int);
* `Settings.from_config(config)` checks every value and returns the frozen settings; a bad value
  is an `InputError` naming its key (`config key optim.learning_rate: expected ...`);
* `Settings.from_record(path)` reads a run's `settings.json` back through the same checks;
* `configuration_page()` is docs/configuration.md.

Dataclasses are frozen (hashable), so the train step can close over them; this module imports no
other of the package but `errors`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from sda_jax.errors import InputError

_REPO = pathlib.Path(__file__).resolve().parents[1]
# The project's shared/ folder: beside the repository, or inside it (a copy, as on a lent GPU machine).
SHARED = next((p for p in (_REPO / "shared", _REPO.parent / "shared") if (p / "data").is_dir()), _REPO.parent / "shared")

TRUNCATIONS = ("longest_first", "reference")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNEL_CHOICES = ("auto", "reference", "xla", "pallas")
TEACHERS = ("ema", "window", "vote")
ADVERSARIAL_METHODS = ("none", "fgm", "pgd")
PREDICT_WITH = ("best_combination", "best_model")
SPLIT_NAMES = ("train", "dev", "test")
TFDS_PREFIX = "tfds:"
# The keys a sweep can take several values of: none of them changes a program's shapes, each is an
# array in the train state (see `sda_jax/step/hyperparameters.py`), and `seed` draws a model's own init and dropout.
SWEEP_KEYS = (
    "seed", "optim.learning_rate", "optim.warmup_ratio", "optim.weight_decay", "sda.kd_coeff", "sda.teacher_decay",
    "sda.eval_ema_decay", "adversarial.epsilon",
)  # fmt: skip
# Why the other keys are not sweep keys, by key or section (the first match counts).
_NOT_SWEEPABLE = (
    ("train.batch_size", "the batch size sets every program's shapes: run one sweep per batch size"),
    ("data.", "the models share one input pipeline: its files, tokens and bucket lengths"),
    ("model.", "the models share one architecture, checkpoint and compute dtype: one set of programs"),
    ("train.", "the models share one train loop: its length, cadences and outputs"),
    ("sda.eval_ema_start_step", "it decides whether the train state keeps an eval EMA at all: its shapes"),
    ("sda.", "the teacher's kind and window change the train step's program"),
    ("adversarial.", "the attack's method and steps change the train step's program; sweep adversarial.epsilon"),
    ("optim.", "not among the sweep keys; sweep optim.learning_rate, optim.warmup_ratio or optim.weight_decay"),
    ("fp16.", "the loss scale's rules are not among the sweep keys"),
    ("pretrain.", "masked-LM pretraining trains one model"),
)
ARCHITECTURE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


def key(default: Any, comment: str, *, minimum: float | None = None, maximum: float | None = None, above: float | None = None,
        choices: tuple[str, ...] | None = None, distinct: bool = False) -> Any:  # fmt: skip
    """A config key: its default, its one-line comment and the checks of `_convert` (`minimum`,
    `maximum` inclusive, `above` exclusive)."""
    metadata = {
        "comment": comment, "minimum": minimum, "maximum": maximum, "above": above, "choices": choices, "distinct": distinct,
    }  # fmt: skip
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    source: str = key("files", "files (the three below) or tfds:NAME, e.g. tfds:clue_afqmc, tfds:glue/mrpc")
    tfds_splits: tuple[str, ...] = key(("train", "validation", "test"), "TFDS split names read as train, dev, test")
    tfds_data_dir: pathlib.Path | None = key(None, "TFDS data_dir (None: TFDS's default, ~/tensorflow_datasets)")
    tfds_manual_dir: pathlib.Path | None = key(None, "folder with the raw files, for building a TFDS set offline")
    train_file: pathlib.Path = key(SHARED / "data/afqmc/train.json", "CLUE JSON lines with labels")
    dev_file: pathlib.Path = key(SHARED / "data/afqmc/dev.json", "CLUE JSON lines with labels, for eval")
    test_file: pathlib.Path = key(SHARED / "data/afqmc/test.json", "CLUE JSON lines with `id`, no labels")
    label_names: tuple[str, ...] = key(("0", "1"), "the label strings of the data set; index = class id", distinct=True)
    text_a_key: str = key("sentence1", "JSON field of the first sentence")
    text_b_key: str = key("sentence2", "JSON field of the second sentence (absent: single-sentence)")
    label_key: str = key("label", "JSON field of the label string")
    id_key: str = key("id", "JSON field of the test-row id written to the prediction file")
    max_seq_len: int = key(64, "tokens per example after truncation, [CLS]/[SEP] included", minimum=3)
    truncation: str = key("longest_first", "longest_first (both sentences keep tokens) or reference (the seed's tail cut)",
                          choices=TRUNCATIONS)  # fmt: skip
    bucket_lengths: tuple[int, ...] | None = key(None, "padded lengths a batch may have, one compile each; None: fitted to the train set", minimum=1)
    num_buckets: int | None = key(None, "with bucket_lengths None: fit this many lengths; None: the cost model picks (data/bucketing.py)", minimum=1)
    bucket_multiplier: int = key(200, "bucket sampler chunk = batch_size * this, sorted by length", minimum=1)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    dir: pathlib.Path = key(SHARED / "data/bert-base-chinese", "HF folder: config.json, vocab.txt, weights")
    from_scratch: bool = key(False, "True: random init from config.json; False: the folder needs weights")
    num_hidden_layers: int | None = key(None, "overrides config.json (from scratch only); None: config.json's", minimum=1)
    hidden_size: int | None = key(None, "overrides config.json (from scratch only)", minimum=1)
    num_attention_heads: int | None = key(None, "overrides config.json (from scratch only)", minimum=1)
    intermediate_size: int | None = key(None, "overrides config.json (from scratch only)", minimum=1)
    dtype: str = key("auto", "compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16, float16", choices=DTYPES)
    scan_layers: bool = key(True, "nn.scan (+remat) over the encoder layers: ~2x faster GPU compiles; False: unrolled")
    kernels: str = key("auto", "forms of the blocks: reference, xla or pallas; auto: xla on a GPU, reference elsewhere (docs/performance.md)",
                       choices=KERNEL_CHOICES)  # fmt: skip

    @property
    def overrides(self) -> tuple[tuple[str, int], ...]:
        """The (config.json field, value) pairs the config sets."""
        return tuple((name, getattr(self, name)) for name in ARCHITECTURE_KEYS if getattr(self, name) is not None)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    batch_size: int = key(64, "global batch size, split over all devices of all hosts", minimum=1)
    num_epochs: int = key(1, "passes over the training set", minimum=1)
    max_steps: int | None = key(None, "stops after this many steps (short runs, tests); None: num_epochs decide", minimum=1)
    eval_every: int = key(400, "dev evaluation every this many steps, and always at the end", minimum=1)
    eval_all_params: bool = key(True, "also score the student and the teacher on dev (logged, not for \"best\")")
    log_every: int = key(20, "steps between host reads of the running loss (each read syncs)", minimum=1)
    checkpoint_every: int = key(200, "full train-state checkpoint for resume every this many steps", minimum=1)
    checkpoint_every_seconds: float | None = key(None, "also checkpoint at the first log step this many seconds after the "
                                                 "last (process 0's clock); None: steps only", above=0.0)  # fmt: skip
    keep_checkpoints: int = key(2, "train checkpoints kept (the best-by-dev one is kept apart)", minimum=1)
    predict_file: str = key("afqmc_predict.json", "CLUE submission written into the workdir")
    predict_with: str = key("best_combination", "the submission's models: best_combination (the ensemble of its seeds) or best_model",
                            choices=PREDICT_WITH)  # fmt: skip
    per_model_predictions: bool = key(False, "with several models: also write each model's predictions beside the submission")
    plot_curves: bool = key(True, "draw the training curves into the workdir as a PNG at the end of the run (matplotlib)")


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    learning_rate: float = key(2e-5, "peak learning rate after warmup", minimum=0.0)
    warmup_ratio: float = key(0.05, "fraction of all steps with linear warmup from 0, then linear decay to 0", minimum=0.0, maximum=1.0)
    weight_decay: float = key(0.01, "AdamW decoupled decay; never on biases and LayerNorm", minimum=0.0)
    adam_b1: float = key(0.9, "Adam first-moment decay", minimum=0.0, maximum=1.0)
    adam_b2: float = key(0.999, "Adam second-moment decay", minimum=0.0, maximum=1.0)
    adam_eps: float = key(1e-8, "Adam epsilon, added to sqrt(v)", minimum=0.0)
    adam_bias_correction: bool = key(False, "the reference uses AdamW(correct_bias=False)")
    lookahead_k: int | None = key(5, "Lookahead sync period in steps; None: no Lookahead", minimum=1)
    lookahead_alpha: float = key(1.0, "Lookahead slow-weight step size (the reference's Lookahead(opt, 5, 1))", minimum=0.0, maximum=1.0)
    max_grad_norm: float | None = key(None, "clips the global gradient norm to this; None: no clipping (the reference)", above=0.0)


@dataclasses.dataclass(frozen=True)
class SdaSettings:
    teacher_decay: float = key(0.995, "teacher EMA decay cap: min(this, (1 + t) / (10 + t)) at step t", minimum=0.0, maximum=1.0)
    kd_coeff: float = key(1.0, "loss = CE + kd_coeff * MSE(student logits, teacher logits)", minimum=0.0)
    eval_ema_decay: float = key(0.999, "decay of the separate EMA used for dev evaluation and export", minimum=0.0, maximum=1.0)
    eval_ema_start_step: int = key(500, "the eval EMA copies the student until this step, averages after", minimum=0)
    teacher: str = key("ema", "ema (reference), window (mean params of last K students: SDA), vote (mean logits: SDV)",
                       choices=TEACHERS)  # fmt: skip
    teacher_window: int = key(5, "K, the number of student snapshots of the window/vote teachers", minimum=1)


@dataclasses.dataclass(frozen=True)
class AdversarialSettings:
    method: str = key("none", "none, fgm or pgd: perturb the word embeddings along the loss gradient", choices=ADVERSARIAL_METHODS)
    epsilon: float = key(1.0, "norm of the FGM perturbation; radius of the PGD ball", minimum=0.0)
    alpha: float = key(0.3, "norm of each PGD step", minimum=0.0)
    steps: int = key(3, "PGD attack steps (each one more forward and backward pass)", minimum=1)


@dataclasses.dataclass(frozen=True)
class Fp16Settings:
    initial_loss_scale: float = key(2.0**16, "dynamic loss scale start (torch GradScaler default)", minimum=1.0)
    growth_interval: int = key(2000, "finite steps before the loss scale doubles", minimum=1)


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    splits: tuple[str, ...] = key(("train", "test"), "masked-LM pretraining (sda_jax.pretrain) trains on these splits' sentences; labels never read")
    heldout_split: str = key("dev", "the split whose sentences score the masked-LM loss and accuracy every train.eval_every steps",
                             choices=SPLIT_NAMES)  # fmt: skip
    pairs: bool = key(True, "inputs as [CLS] a [SEP] b [SEP] (the fine-tuning format); False: each sentence alone")
    mask_prob: float = key(0.15, "share of each input's tokens to predict (specials never), rounded per input", above=0.0, maximum=1.0)
    mask_token_ratio: float = key(0.8, "of the predicted tokens, the share replaced by [MASK]", minimum=0.0, maximum=1.0)
    random_token_ratio: float = key(0.1, "of the predicted tokens, the share replaced by a random token (the rest: kept)",
                                    minimum=0.0, maximum=1.0)  # fmt: skip
    whole_word_masking: bool = key(False, "predict every character of a word or none (words from jieba: the wwm extra)")


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int = key(2021, "the one seed: init, dropout, data order and fresh heads (with sweep.seed: the data order)", minimum=0)
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    optim: OptimSettings = OptimSettings()
    sda: SdaSettings = SdaSettings()
    adversarial: AdversarialSettings = AdversarialSettings()
    fp16: Fp16Settings = Fp16Settings()
    pretrain: PretrainSettings = PretrainSettings()
    # ((sweep key, its values), ...) in SWEEP_KEYS order: the grid of models a run trains side by side.
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
        """Checks every key of `config` and returns the frozen settings; InputError names the key."""
        return cls._from(config.to_dict(), lambda name: f"config key {name}")

    @classmethod
    def _from(cls, values: dict[str, Any], where) -> Settings:
        values = dict(values)
        sweep = values.pop("sweep", None)
        settings = _convert_section(cls, {**values, "sweep": ()}, "", where)
        settings = dataclasses.replace(settings, sweep=_convert_sweep(sweep or {}, where))
        _check_together(settings)
        return settings

    @classmethod
    def from_record(cls, path: pathlib.Path) -> Settings:
        """A run's settings.json (`to_record`), checked as a config is; InputError names the file."""
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path.parent}: not an sda-jax run folder (no {path.name})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: not readable as the run's settings ({err})") from None
        return cls._from(record, lambda name: f"{path}: key {name}")

    def to_record(self) -> str:
        """settings.json: every key and its value (paths as strings, tuples as lists; the sweep as
        the config writes it, {section: {key: values}})."""
        record = dataclasses.asdict(dataclasses.replace(self, sweep=()))
        record["sweep"] = {}
        for name, values in self.sweep:
            *sections, last = name.split(".")
            node = record["sweep"]
            for section in sections:
                node = node.setdefault(section, {})
            node[last] = list(values)
        return json.dumps(record, indent=2, default=str) + "\n"

    def with_values(self, values: Mapping[str, Any]) -> Settings:
        """These settings with dotted keys set to other (checked) values: a sweep's member's own."""
        settings = self
        for name, value in values.items():
            *sections, last = name.split(".")
            if not sections:
                settings = dataclasses.replace(settings, **{last: value})
            else:
                section = getattr(settings, sections[0])
                settings = dataclasses.replace(settings, **{sections[0]: dataclasses.replace(section, **{last: value})})
        return settings


def sections() -> list[tuple[str, type]]:
    """(config prefix, dataclass) of the top level ("") and of each section ("optim.", ...)."""
    hints = typing.get_type_hints(Settings)
    return [("", Settings)] + [
        (f.name + ".", hints[f.name]) for f in dataclasses.fields(Settings) if dataclasses.is_dataclass(hints[f.name])
    ]


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, one-line comment) of every config key, in config order; the sweep keys last."""
    out = [(prefix + f.name, f.default, f.metadata["comment"]) for prefix, cls in sections() for f in _scalar_fields(cls)]
    sweep = "values of {} for the grid of models trained side by side; None: its one value"
    return out + [(f"sweep.{name}", None, sweep.format(name)) for name in SWEEP_KEYS]


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default: the ConfigDict of configs/default.py (placeholders where None)."""
    config = ml_collections.ConfigDict()
    for prefix, cls in sections():
        node = config
        if prefix:
            node = config[prefix.rstrip(".")] = ml_collections.ConfigDict()
        hints = typing.get_type_hints(cls)
        for f in _scalar_fields(cls):
            base, _ = _unwrap(hints[f.name])
            if f.default is None:
                node[f.name] = config_dict.placeholder(str if base is pathlib.Path else _origin(base))
            else:
                node[f.name] = str(f.default) if base is pathlib.Path else f.default
    # The sweep mirrors every key (a tuple of values each), so that a key no sweep can take is refused with why.
    config.sweep = ml_collections.ConfigDict()
    for prefix, cls in sections():
        node = config.sweep
        if prefix:
            node = config.sweep[prefix.rstrip(".")] = ml_collections.ConfigDict()
        for f in _scalar_fields(cls):
            node[f.name] = config_dict.placeholder(tuple)
    return config


def _scalar_fields(cls: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    return [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name]) and f.name != "sweep"]


def _field(name: str) -> tuple[Any, dataclasses.Field]:
    """(type hint, field) of a dotted config key."""
    *sections_, last = name.split(".")
    cls = Settings
    for section in sections_:
        cls = typing.get_type_hints(cls)[section]
    return typing.get_type_hints(cls)[last], next(f for f in dataclasses.fields(cls) if f.name == last)


def _convert_sweep(values: Mapping[str, Any], where) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The swept keys and their checked values, in SWEEP_KEYS order; a key no sweep can take is
    refused with why, a value as its key's own check would refuse it."""

    def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        items = [flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {prefix + k: v} for k, v in tree.items()]
        return {key: value for item in items for key, value in item.items()}

    given = {name: value for name, value in flat(values).items() if value is not None}
    for name in given:
        if name not in SWEEP_KEYS:
            reason = next((why for start, why in _NOT_SWEEPABLE if name == start or name.startswith(start)), "no such key")
            raise InputError(f"{where('sweep.' + name)}: not a sweep key ({reason}); the sweep keys: {', '.join(SWEEP_KEYS)}")
    out = []
    for name in SWEEP_KEYS:
        if name not in given:
            continue
        raw, label = given[name], "sweep." + name
        hint, field = _field(name)
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)) or not raw:
            raise InputError(f"{where(label)}: expected a list of values of {name}, got {raw!r}")
        checked = tuple(
            _convert(value, _unwrap(hint)[0], field.metadata, lambda what, v: InputError(f"{where(label)}: expected {what} each, got {v!r}"))
            for value in raw
        )  # fmt: skip
        if len(set(checked)) != len(checked):
            raise InputError(f"{where(label)}: expected distinct values, got {tuple(raw)!r}")
        out.append((name, checked))
    return tuple(out)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _origin(hint: Any) -> type:
    return typing.get_origin(hint) or hint


def _convert_section(cls: type, values: Mapping[str, Any], prefix: str, where) -> Any:
    if not isinstance(values, Mapping):
        raise InputError(f"{where(prefix.rstrip('.'))}: expected a section of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"{where(prefix + unknown[0])}: not a config key of this version of sda-jax")
    out = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if cls is Settings and f.name == "sweep":  # checked by _convert_sweep
            out[f.name] = ()
            continue
        if f.name not in values:
            raise InputError(f"{where(name)}: missing")
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = _convert_section(hints[f.name], values[f.name], name + ".", where)
        else:
            out[f.name] = _convert(values[f.name], hints[f.name], f.metadata, lambda what, v, n=name: InputError(
                f"{where(n)}: expected {what}, got {v!r}"))  # fmt: skip
    return cls(**out)


def _convert(value: Any, hint: Any, meta: Mapping[str, Any], fail) -> Any:
    """`value` as the type `hint` names, checked against the key's bounds; `fail(what, value)` is the error."""
    base, optional = _unwrap(hint)
    low, high, choices = meta["minimum"], meta["maximum"], meta["choices"]
    if value is None:
        if optional:
            return None
        raise fail(_describe(base, meta), value)
    if base is bool:
        if type(value) is not bool:
            raise fail("True or False", value)
        return value
    if base is int:
        if type(value) is not int or (low is not None and value < low):
            raise fail(_describe(base, meta), value)
        return value
    if base is float:
        above = meta["above"]
        in_range = (low is None or value >= low) and (high is None or value <= high) and (above is None or value > above)
        if type(value) not in (int, float) or not in_range:
            raise fail(_describe(base, meta), value)
        return float(value)
    if base is str:
        if not isinstance(value, str) or not value or (choices and value not in choices):
            raise fail(_describe(base, meta), value)
        return value
    if base is pathlib.Path:
        if not isinstance(value, (str, pathlib.PurePath)) or not str(value):
            raise fail("a path", value)
        return pathlib.Path(value).expanduser()
    item = typing.get_args(base)[0]  # tuple[X, ...]
    if item is int and type(value) is int:
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise fail(_describe(base, meta), value)
    if item is int and not all(type(v) is int and (low is None or v >= low) for v in value):
        raise fail(_describe(base, meta), value)
    if item is str and not all(isinstance(v, str) for v in value):
        raise fail(_describe(base, meta), value)
    if meta["distinct"] and len(set(value)) != len(value):
        raise fail("distinct values", tuple(value))
    return tuple(value)


def _describe(base: Any, meta: Mapping[str, Any]) -> str:
    low, high, choices = meta["minimum"], meta["maximum"], meta["choices"]
    if base is int:
        return f"an integer >= {low:g}" if low is not None else "an integer"
    if base is float:
        if meta["above"] is not None:
            return f"a number > {meta['above']:g}"
        return f"a number in [{low:g}, {high if high is not None else 'inf'}]"
    if base is str:
        return f"one of {', '.join(choices)}" if choices else "a non-empty string"
    item = typing.get_args(base)[0]
    if item is int:
        return f"a list of integers >= {low:g}" if low is not None else "a list of integers"
    return "a list of strings"


def _check_together(settings: Settings) -> None:
    """The checks that involve more than one key, or a key's syntax."""
    data, model = settings.data, settings.model
    if data.bucket_lengths is not None:
        lengths, where = data.bucket_lengths, "config key data.bucket_lengths"
        if not lengths:
            raise InputError(f"{where}: give at least one length, or None to fit them to the train set")
        if list(lengths) != sorted(set(lengths)):
            raise InputError(f"{where}: must be strictly increasing, got {lengths!r}")
        if lengths[-1] != data.max_seq_len:
            raise InputError(f"{where}: the largest bucket must equal data.max_seq_len={data.max_seq_len}, got {lengths!r}")
    if data.source != "files":
        tfds_dataset_name(data.source)
    if len(data.tfds_splits) != 3:
        raise InputError("config key data.tfds_splits: expected three split names (train, dev, test)")
    if len(data.label_names) < 2:
        raise InputError("config key data.label_names: needs at least two distinct labels")
    pretrain = settings.pretrain
    unknown = [name for name in pretrain.splits if name not in SPLIT_NAMES]
    if not pretrain.splits or unknown or len(set(pretrain.splits)) != len(pretrain.splits):
        raise InputError(f"config key pretrain.splits: expected distinct names of {', '.join(SPLIT_NAMES)}, got {pretrain.splits!r}")
    if pretrain.heldout_split in pretrain.splits:
        raise InputError(
            f"config key pretrain.heldout_split: {pretrain.heldout_split} is also in pretrain.splits; the held-out "
            "sentences must not be trained on"
        )
    if pretrain.mask_token_ratio + pretrain.random_token_ratio > 1.0:
        raise InputError("config keys pretrain.mask_token_ratio + pretrain.random_token_ratio: must not exceed 1")
    if model.overrides and not model.from_scratch:
        raise InputError(
            f"config keys model.{'/'.join(ARCHITECTURE_KEYS)} change the architecture: only allowed with model.from_scratch=True"
        )


def tfds_dataset_name(spec: str) -> str:
    """`tfds:glue/mrpc` -> `glue/mrpc` (a TFDS name, optionally `/config` and `:version`); InputError otherwise."""
    spec = str(spec)
    name = spec[len(TFDS_PREFIX) :] if spec.startswith(TFDS_PREFIX) else ""
    if not re.fullmatch(r"[a-z0-9_]+(/[\w.\-]+)?(:[\d.*]+)?", name):
        raise InputError(
            f"{spec}: not a TFDS source (data.source); expected 'files' or tfds:NAME, e.g. tfds:clue_afqmc or tfds:glue/mrpc"
        )
    return name


def configuration_page() -> str:
    """docs/configuration.md, generated from the declarations above (a test checks it is current)."""
    # A path default as it lies beside a clone, wherever this one is.
    shown = lambda v: str(v).replace(str(SHARED), "../shared", 1) if isinstance(v, pathlib.Path) else repr(v)
    rows = [f"| `{name}` | `{shown(default)}` | {comment.replace('|', '/')} |" for name, default, comment in describe()]
    intro = (
        "Generated from `sda_jax/config.py`, where each key is declared once with its type, default, bounds and comment\n"
        "(`python -m sda_jax.config --markdown > docs/configuration.md`). Set a key with `--config.<key>=<value>` (the\n"
        "last one given counts; `None`: off or auto, where its comment says so); a bad value is a one-line error naming it."
    )
    return "\n".join(["# Configuration", "", intro, "", "| key | default | meaning |", "|---|---|---|", *rows, ""])


if __name__ == "__main__":
    import sys

    lines = [configuration_page()] if sys.argv[1:] == ["--markdown"] else [f"{n} = {d!r}  # {c}" for n, d, c in describe()]
    print(*lines, sep="\n", end="" if sys.argv[1:] == ["--markdown"] else "\n")
