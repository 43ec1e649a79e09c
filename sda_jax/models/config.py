"""BERT hyper-parameters under their Hugging Face `config.json` names: read, checked, written back.

`BertConfig.from_json_file` reads a Hugging Face model folder's config.json (unknown fields are
ignored, a bad or missing one is an `InputError` naming the file); `to_hf_dict` writes the
config.json that `transformers.BertForSequenceClassification` loads, with the run's labels.

Two `model_type`s share this encoder: `bert` (BERT, RoBERTa-wwm, MacBERT, Mengzi-BERT ...) and
`ernie` (ERNIE 1.0/2.0/3.0: BERT plus, with `use_task_id`, a task-type embedding table; read and
written as `transformers.ErnieForSequenceClassification`). A config.json without `model_type` is
read as `bert`; any other type is an `InputError`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sda_jax.errors import InputError

# The `model_type`s this encoder computes exactly, and the HF classifier each is written back as.
MODEL_TYPES = {"bert": "BertForSequenceClassification", "ernie": "ErnieForSequenceClassification"}
# ... and the masked-LM model (masked-LM pretraining's runs and exports).
MASKED_LM_TYPES = {"bert": "BertForMaskedLM", "ernie": "ErnieForMaskedLM"}
# Fields only ERNIE configs have (transformers.ErnieConfig); a BERT config neither reads nor writes them.
_ERNIE_FIELDS = ("use_task_id", "task_type_vocab_size")

# Activations the model implements (layers.ACTIVATIONS), by their Hugging Face names.
ACTIVATION_NAMES = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

# Fields without a default in our dataclass: a config.json lacking one of them is not a BERT config.
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)
_INT_FIELDS = (*_REQUIRED_FIELDS, "type_vocab_size", "pad_token_id", "num_labels", "task_type_vocab_size")
_FLOAT_FIELDS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "initializer_range",
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters under their Hugging Face `config.json` names."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2
    # HF falls back to hidden_dropout_prob when this is None; kept so fine-tuned configs round-trip.
    classifier_dropout: float | None = None
    model_type: str = "bert"  # a key of MODEL_TYPES
    # ERNIE only: with use_task_id, the embeddings add row 0 of a task-type table (see models.BertEmbeddings).
    use_task_id: bool = False
    task_type_vocab_size: int = 3

    def __post_init__(self) -> None:
        # ValueError here; from_json_file re-raises it as an InputError naming the file.
        if not isinstance(self.model_type, str) or self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
        if not isinstance(self.use_task_id, bool):
            raise ValueError(f"use_task_id must be true or false, got {self.use_task_id!r}")  # noqa: TRY004 (see above)
        if self.use_task_id and self.model_type != "ernie":
            raise ValueError(f"use_task_id is an ERNIE field; model_type {self.model_type!r} has no task-type embeddings")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")  # noqa: TRY004 (see above)
            if value < (0 if name == "pad_token_id" else 1):
                raise ValueError(f"{name} must be positive, got {value}")
        for name in (*_FLOAT_FIELDS, "classifier_dropout"):
            value = getattr(self, name)
            if value is None and name == "classifier_dropout":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")  # noqa: TRY004 (see above)
            if name.endswith(("dropout", "_prob")):
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"{name} must be in [0, 1), got {value}")
            elif value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATION_NAMES:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATION_NAMES)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} >= vocab_size {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> BertConfig:
        """Read a Hugging Face `config.json`; unknown HF fields are ignored, `overrides` win."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: model config file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: cannot read model config: {err}") from None
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        # Folders from before transformers wrote model_type are BERT's.
        model_type = raw.get("model_type", "bert")
        if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
            raise InputError(
                f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
            )

        # Relative position embeddings change the attention maths, which this model lacks.
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise InputError(f"{path}: position_embedding_type {position_type!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InputError(f"{path}: unknown BERT config override(s) {unknown}")
        values = {k: v for k, v in raw.items() if k in names}
        if model_type != "ernie":  # transformers.BertModel ignores these fields too
            for name in _ERNIE_FIELDS:
                values.pop(name, None)
        # Fine-tuned HF configs usually store id2label instead of num_labels.
        if "num_labels" not in values and isinstance(raw.get("id2label"), dict):
            values["num_labels"] = len(raw["id2label"])
        values.update(overrides)
        missing = [name for name in _REQUIRED_FIELDS if name not in values]
        if missing:
            raise InputError(f"{path}: missing required field(s) {', '.join(missing)}")
        try:
            return cls(**values)
        except ValueError as err:
            raise InputError(f"{path}: {err}") from None

    def replace(self, **changes: Any) -> BertConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self, label_names: Sequence[str], masked_lm: bool = False) -> dict[str, Any]:
        """A `config.json` dict that `transformers.BertForSequenceClassification` (for ERNIE,
        `ErnieForSequenceClassification`; with `masked_lm`, Bert/ErnieForMaskedLM) loads as is."""
        labels = list(label_names)
        if len(labels) != self.num_labels:
            raise ValueError(f"got {len(labels)} label names for num_labels={self.num_labels}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"label names are not unique: {labels}")
        fields = dataclasses.asdict(self)
        del fields["num_labels"]  # HF derives it from id2label
        del fields["model_type"]
        if self.model_type != "ernie":
            for name in _ERNIE_FIELDS:
                del fields[name]
        return {
            "architectures": [(MASKED_LM_TYPES if masked_lm else MODEL_TYPES)[self.model_type]],
            "model_type": self.model_type,
            **fields,
            "position_embedding_type": "absolute",
            "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)},
        }
