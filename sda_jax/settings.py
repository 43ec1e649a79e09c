"""The run's configuration, read once from the ml_collections ConfigDict into typed, frozen values.

`Settings.from_config` is the only place that reads the ConfigDict: it checks every value and
raises `InputError` naming the offending key, so the rest of the code takes plain attributes and
never re-validates. Dataclasses are frozen (hashable), so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import ml_collections

from sda_jax import tfds_source
from sda_jax.errors import InputError
from sda_jax.tokenization import TRUNCATIONS

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    source: str  # "files" or "tfds:NAME"
    tfds_splits: tuple[str, ...]
    tfds_data_dir: pathlib.Path | None
    tfds_manual_dir: pathlib.Path | None
    train_file: pathlib.Path
    dev_file: pathlib.Path
    test_file: pathlib.Path
    label_names: tuple[str, ...]
    text_a_key: str
    text_b_key: str
    label_key: str
    id_key: str
    max_seq_len: int
    truncation: str  # tokenization.TRUNCATIONS: longest_first or reference (the seed's Collator)
    bucket_lengths: tuple[int, ...]  # () = fitted to the train set (input_pipeline.fit_bucket_lengths)
    num_buckets: int  # how many lengths to fit when bucket_lengths is (); 0: as many as bucket_policy's cost model says
    bucket_multiplier: int


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    dir: pathlib.Path
    from_scratch: bool
    overrides: tuple[tuple[str, int], ...]  # (BertConfig field, value) pairs set in the config
    dtype: str
    scan_layers: bool  # encoder layers under nn.scan (stacked params) rather than unrolled


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    num_epochs: int
    max_steps: int
    eval_every: int
    eval_all_params: bool
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    predict_file: str
    seeds: tuple[int, ...]  # () or one seed: one run; several: one model per seed, trained side by side
    per_seed_predictions: bool  # several seeds: also write each seed's predictions


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    adam_bias_correction: bool
    lookahead_k: int
    lookahead_alpha: float
    max_grad_norm: float


@dataclasses.dataclass(frozen=True)
class SdaSettings:
    teacher_decay: float
    kd_coeff: float
    eval_ema_decay: float
    eval_ema_start_step: int
    teacher: str
    teacher_window: int


@dataclasses.dataclass(frozen=True)
class AdversarialSettings:
    method: str
    epsilon: float
    alpha: float
    steps: int


@dataclasses.dataclass(frozen=True)
class Fp16Settings:
    initial_loss_scale: float
    growth_interval: int


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int
    data: DataSettings
    model: ModelSettings
    train: TrainSettings
    optim: OptimSettings
    sda: SdaSettings
    adversarial: AdversarialSettings
    fp16: Fp16Settings

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
        """Checks every key of `config` and returns the frozen settings; InputError names the key."""
        reader = _Reader(config)
        data = DataSettings(
            source=reader.string("data.source"),
            tfds_splits=reader.strings("data.tfds_splits"),
            tfds_data_dir=reader.optional_path("data.tfds_data_dir"),
            tfds_manual_dir=reader.optional_path("data.tfds_manual_dir"),
            train_file=reader.path("data.train_file"),
            dev_file=reader.path("data.dev_file"),
            test_file=reader.path("data.test_file"),
            label_names=reader.strings("data.label_names"),
            text_a_key=reader.string("data.text_a_key"),
            text_b_key=reader.string("data.text_b_key"),
            label_key=reader.string("data.label_key"),
            id_key=reader.string("data.id_key"),
            max_seq_len=reader.integer("data.max_seq_len", minimum=3),
            truncation=reader.choice("data.truncation", TRUNCATIONS),
            bucket_lengths=tuple(reader.get("data.bucket_lengths")),
            num_buckets=reader.integer("data.num_buckets", minimum=0),
            bucket_multiplier=reader.integer("data.bucket_multiplier", minimum=1),
        )
        _check_buckets(data.bucket_lengths, data.max_seq_len)
        if data.source != "files":
            tfds_source.dataset_name(data.source)  # checks the spec; TensorFlow is not imported
        if len(data.tfds_splits) != 3:
            raise InputError("config key data.tfds_splits: expected three split names (train, dev, test)")
        if len(data.label_names) < 2 or len(set(data.label_names)) != len(data.label_names):
            raise InputError("config key data.label_names: needs at least two distinct labels")
        overrides = tuple(
            (name, value)
            for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
            if (value := reader.integer(f"model.{name}", minimum=0)) > 0
        )
        model = ModelSettings(
            dir=reader.path("model.dir"),
            from_scratch=reader.boolean("model.from_scratch"),
            overrides=overrides,
            dtype=reader.choice("model.dtype", _DTYPES),
            scan_layers=reader.boolean("model.scan_layers"),
        )
        if overrides and not model.from_scratch:
            raise InputError(
                "config keys model.num_hidden_layers/hidden_size/num_attention_heads/"
                "intermediate_size change the architecture: only allowed with model.from_scratch=True"
            )
        train = TrainSettings(
            batch_size=reader.integer("train.batch_size", minimum=1),
            num_epochs=reader.integer("train.num_epochs", minimum=1),
            max_steps=reader.integer("train.max_steps", minimum=0),
            eval_every=reader.integer("train.eval_every", minimum=1),
            eval_all_params=reader.boolean("train.eval_all_params"),
            log_every=reader.integer("train.log_every", minimum=1),
            checkpoint_every=reader.integer("train.checkpoint_every", minimum=1),
            keep_checkpoints=reader.integer("train.keep_checkpoints", minimum=1),
            predict_file=reader.string("train.predict_file"),
            seeds=reader.seeds("train.seeds"),
            per_seed_predictions=reader.boolean("train.per_seed_predictions"),
        )
        optim = OptimSettings(
            learning_rate=reader.number("optim.learning_rate", minimum=0.0),
            warmup_ratio=reader.number("optim.warmup_ratio", minimum=0.0, maximum=1.0),
            weight_decay=reader.number("optim.weight_decay", minimum=0.0),
            adam_b1=reader.number("optim.adam_b1", minimum=0.0, maximum=1.0),
            adam_b2=reader.number("optim.adam_b2", minimum=0.0, maximum=1.0),
            adam_eps=reader.number("optim.adam_eps", minimum=0.0),
            adam_bias_correction=reader.boolean("optim.adam_bias_correction"),
            lookahead_k=reader.integer("optim.lookahead_k", minimum=0),
            lookahead_alpha=reader.number("optim.lookahead_alpha", minimum=0.0, maximum=1.0),
            max_grad_norm=reader.number("optim.max_grad_norm", minimum=0.0),
        )
        sda = SdaSettings(
            teacher_decay=reader.number("sda.teacher_decay", minimum=0.0, maximum=1.0),
            kd_coeff=reader.number("sda.kd_coeff", minimum=0.0),
            eval_ema_decay=reader.number("sda.eval_ema_decay", minimum=0.0, maximum=1.0),
            eval_ema_start_step=reader.integer("sda.eval_ema_start_step", minimum=0),
            teacher=reader.choice("sda.teacher", ("ema", "window", "vote")),
            teacher_window=reader.integer("sda.teacher_window", minimum=1),
        )
        adversarial = AdversarialSettings(
            method=reader.choice("adversarial.method", ("none", "fgm", "pgd")),
            epsilon=reader.number("adversarial.epsilon", minimum=0.0),
            alpha=reader.number("adversarial.alpha", minimum=0.0),
            steps=reader.integer("adversarial.steps", minimum=1),
        )
        fp16 = Fp16Settings(
            initial_loss_scale=reader.number("fp16.initial_loss_scale", minimum=1.0),
            growth_interval=reader.integer("fp16.growth_interval", minimum=1),
        )
        return cls(
            seed=reader.integer("seed", minimum=0),
            data=data,
            model=model,
            train=train,
            optim=optim,
            sda=sda,
            adversarial=adversarial,
            fp16=fp16,
        )


def _check_buckets(bucket_lengths: tuple[Any, ...], max_seq_len: int) -> None:
    key = "config key data.bucket_lengths"
    if not bucket_lengths:
        return  # fitted to the train set once it is read
    if not all(type(n) is int and n > 0 for n in bucket_lengths):
        raise InputError(f"{key}: must be positive integers, got {bucket_lengths!r}")
    if list(bucket_lengths) != sorted(set(bucket_lengths)):
        raise InputError(f"{key}: must be strictly increasing, got {bucket_lengths!r}")
    if bucket_lengths[-1] != max_seq_len:
        raise InputError(
            f"{key}: the largest bucket must equal data.max_seq_len={max_seq_len}, got {bucket_lengths!r}"
        )


class _Reader:
    """Reads dotted keys from a ConfigDict with type checks that name the key."""

    def __init__(self, config: ml_collections.ConfigDict):
        self._config = config

    def get(self, key: str) -> Any:
        node: Any = self._config
        for part in key.split("."):
            if part not in node:
                raise InputError(f"config key {key}: missing")
            node = node[part]
        return node

    def _fail(self, key: str, expected: str, value: Any) -> InputError:
        return InputError(f"config key {key}: expected {expected}, got {value!r}")

    def integer(self, key: str, *, minimum: int) -> int:
        value = self.get(key)
        if type(value) is not int or value < minimum:
            raise self._fail(key, f"an integer >= {minimum}", value)
        return value

    def number(self, key: str, *, minimum: float, maximum: float = float("inf")) -> float:
        value = self.get(key)
        if type(value) not in (int, float) or not minimum <= value <= maximum:
            raise self._fail(key, f"a number in [{minimum}, {maximum}]", value)
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if type(value) is not bool:
            raise self._fail(key, "True or False", value)
        return value

    def string(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not value:
            raise self._fail(key, "a non-empty string", value)
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.get(key)
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, "a list of strings", value)
        return tuple(value)

    def seeds(self, key: str) -> tuple[int, ...]:
        value = self.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value,)
        if isinstance(value, str) or not all(type(v) is int and v >= 0 for v in value):
            raise self._fail(key, "a list of integers >= 0", value)
        if len(set(value)) != len(value):
            raise self._fail(key, "distinct seeds", value)
        return tuple(value)

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.get(key)
        if value not in choices:
            raise self._fail(key, f"one of {', '.join(choices)}", value)
        return value

    def path(self, key: str) -> pathlib.Path:
        return pathlib.Path(self.string(key)).expanduser()

    def optional_path(self, key: str) -> pathlib.Path | None:
        value = self.get(key)
        if not isinstance(value, str):
            raise self._fail(key, "a path or an empty string", value)
        return pathlib.Path(value).expanduser() if value else None
