"""Convert Hugging Face PyTorch BERT and ERNIE checkpoints to and from our Flax param tree.

Reads `model.safetensors` (no torch needed) or `pytorch_model.bin` (needs torch), whole or
sharded (`*.index.json` naming the shard of every tensor, as `save_pretrained` writes them), from a
BertModel, BertForMaskedLM, BertForPreTraining or BertForSequenceClassification checkpoint, with or
without the `bert.` prefix and with legacy `LayerNorm.gamma/beta` names. For a config of
`model_type` ernie the same holds for the Ernie* classes and the `ernie.` prefix, plus
`embeddings.task_type_embeddings` when the config has `use_task_id`; ERNIE's tree is ours under
the same `bert/...` paths. Every tensor in the file is either loaded or reported unused; heads the
file lacks or that do not fit the config (pooler, classifier) are initialised fresh and reported,
while any other missing or misshapen tensor is an `InputError`. With `masked_lm` the same holds
for `masked_lm.BertForMaskedLM` (transformers' Bert/ErnieForMaskedLM): no pooler or classifier,
the `cls.predictions` head instead (fresh when the file has none), whose decoder is the word
embedding table (`cls.predictions.decoder.*` in a file are those tied copies, neither loaded nor
reported).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from sda_jax.errors import InputError
from sda_jax.models.bert import init_params, scans_layers
from sda_jax.models.config import BertConfig
from sda_jax.models.layers import hf_normal_init
from sda_jax.models.masked_lm import init_mlm_params

SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"  # sharded checkpoints: model.safetensors.index.json, pytorch_model.bin.index.json

# The prefix of the encoder's tensors in a task model's state dict (HF's `base_model_prefix`), and
# the model's name in messages, by `model_type`.
_PREFIXES = {"bert": "bert.", "ernie": "ernie."}
_DISPLAY_NAMES = {"bert": "a BERT", "ernie": "an ERNIE"}

# Non-trainable buffers some HF versions serialise; they carry no weights.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# A masked-LM file's copies of the tensors its decoder is tied to (the word embeddings, cls.predictions.bias).
_TIED_MLM_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# The heads of each kind of model, which a file may lack (then they are initialised fresh).
_HEADS = {False: ("pooler", "classifier"), True: ("mlm",)}
_HEAD_NAMES = {"pooler": "pooler", "classifier": "classifier", "mlm": "masked-LM head (cls.predictions)"}

# Raw safetensors dtypes numpy lacks natively; ml_dtypes ships with JAX.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a checkpoint load did, by HF tensor name as `state_dict_from_params` spells them.

    `loaded` and `initialized` use our canonical names; `unused` keeps the file's own names.
    """

    source: str
    loaded: tuple[str, ...]
    unused: tuple[str, ...]
    initialized: tuple[str, ...]
    notes: tuple[str, ...] = ()  # why each head was initialised fresh
    fresh_heads: tuple[str, ...] = ()  # "pooler"/"classifier": initialised from the rng, not the file

    def summary(self) -> str:
        parts = [f"Loaded {len(self.loaded)} tensors from {self.source}."]
        if self.initialized:
            parts.append(f"Initialised fresh: {', '.join(self.initialized)}.")
        parts.extend(self.notes)
        if self.unused:
            shown = ", ".join(self.unused[:8]) + (", ..." if len(self.unused) > 8 else "")
            parts.append(f"Unused checkpoint tensors ({len(self.unused)}): {shown}.")
        return " ".join(parts)


def find_weights_file(model_dir: Path) -> Path | None:
    """`model.safetensors` (or its sharded index) if present, else `pytorch_model.bin` (or its
    index), else None."""
    for name in (SAFETENSORS_NAME, SAFETENSORS_NAME + INDEX_SUFFIX, PYTORCH_NAME, PYTORCH_NAME + INDEX_SUFFIX):
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a `.safetensors` or torch `.bin` file, or of the shards an `.index.json` names,
    as numpy; fp16/bf16 become float32."""
    if path.name.endswith(INDEX_SUFFIX):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        tensors = _read_safetensors(path)
    else:
        tensors = _read_torch(path)
    return {name: _to_float32(array) for name, array in tensors.items()}


def _read_sharded(index_path: Path) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{index_path}: not a readable checkpoint index: {_first_line(err)}") from None
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise InputError(f"{index_path}: shard {shard!r} is missing from {index_path.parent}")
        tensors.update(read_state_dict(shard_path))
    # A shard that lacks a tensor its index promises is a broken download, not a smaller model.
    lacking = sorted(name for name in weight_map if name not in tensors)
    if lacking:
        raise InputError(f"{index_path}: {weight_map[lacking[0]]} lacks {len(lacking)} tensor(s) the index names, e.g. {lacking[0]}")
    return tensors


def _to_float32(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16:
        return np.ascontiguousarray(array, dtype=np.float32)
    return array


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(path)
    except TypeError:
        # safetensors.numpy cannot build bfloat16 arrays; parse the simple format ourselves.
        return _read_safetensors_raw(path)
    except (safetensors.SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a readable safetensors file: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    # Library errors can span paragraphs and carry terminal colours (torch's weights_only one
    # does both); an InputError message is one plain line.
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
    # Layout: u64 little-endian header size, JSON header {name: {dtype, shape, data_offsets}}, data.
    try:
        data = path.read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        body = memoryview(data)[8 + header_len :]
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            array = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
            tensors[name] = array.copy()  # own the memory rather than pin the whole file
        return tensors
    except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a readable safetensors file: {err!r}") from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # optional: only old-style checkpoints need it
    except ImportError:
        raise InputError(
            f"{path}: reading pytorch_model.bin needs PyTorch: pip install torch "
            "(or convert the checkpoint to model.safetensors)"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable PyTorch checkpoint: {_first_line(err)}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError(f"{path}: expected a state dict of named tensors")
    return {
        name: (t.float() if t.is_floating_point() else t).detach().contiguous().numpy()
        for name, t in state.items()
    }


class _Tensor(NamedTuple):
    hf_name: str  # as in a transformers.BertForSequenceClassification (ErnieFor...) state dict
    path: tuple[str, ...]  # in our param tree
    is_linear_weight: bool  # torch Linear [out, in] is a Flax kernel [in, out]
    head: str | None  # "pooler"/"classifier"/"mlm": may be initialised fresh; None: required
    index: int | None = None  # the slice of a stacked leaf (layers under nn.scan) this tensor is

    @property
    def canonical(self) -> str:
        """The name without the encoder prefix (`bert.` or `ernie.`), as in a BertModel/ErnieModel."""
        return self.hf_name.split(".", 1)[1] if self.hf_name.startswith(tuple(_PREFIXES.values())) else self.hf_name


def _tensors(
    num_layers: int, scan_layers: bool, model_type: str = "bert", use_task_id: bool = False, masked_lm: bool = False
) -> list[_Tensor]:
    """Every tensor of the model, in HF state-dict order, under the names of `model_type`; of the
    classifier, or with `masked_lm` of the masked-LM model (no pooler: the `cls.predictions` head).

    With `scan_layers`, layers 0 .. L-2 are slices of the stacked leaves under
    `bert/encoder/layers` (see `models.BertEncoder`); else every layer is `bert/encoder/layer_{i}`.
    ERNIE's tensors are BERT's under `ernie.`, plus, with `use_task_id`, the task-type table (which
    ErnieEmbeddings registers after its LayerNorm).
    """
    out: list[_Tensor] = []
    prefix = _PREFIXES[model_type]

    def add(hf: str, path: tuple[str, ...], kind: str, head: str | None = None, index: int | None = None) -> None:
        ours = {"linear": ("kernel", "bias"), "norm": ("scale", "bias")}[kind]
        out.append(_Tensor(f"{hf}.weight", (*path, ours[0]), kind == "linear", head, index))
        out.append(_Tensor(f"{hf}.bias", (*path, ours[1]), False, head, index))

    def table(name: str) -> None:
        out.append(_Tensor(f"{prefix}embeddings.{name}.weight", ("bert", "embeddings", name, "embedding"), False, None))

    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        table(name)
    add(f"{prefix}embeddings.LayerNorm", ("bert", "embeddings", "LayerNorm"), "norm")
    if use_task_id:
        table("task_type_embeddings")
    for i in range(num_layers):
        hf = f"{prefix}encoder.layer.{i}"
        stacked = scan_layers and i < num_layers - 1
        ours, index = ("bert", "encoder", "layers" if stacked else f"layer_{i}"), i if stacked else None
        for proj in ("query", "key", "value"):
            add(f"{hf}.attention.self.{proj}", (*ours, "attention", "self", proj), "linear", index=index)
        add(f"{hf}.attention.output.dense", (*ours, "attention", "output", "dense"), "linear", index=index)
        add(f"{hf}.attention.output.LayerNorm", (*ours, "attention", "output", "LayerNorm"), "norm", index=index)
        add(f"{hf}.intermediate.dense", (*ours, "intermediate", "dense"), "linear", index=index)
        add(f"{hf}.output.dense", (*ours, "output", "dense"), "linear", index=index)
        add(f"{hf}.output.LayerNorm", (*ours, "output", "LayerNorm"), "norm", index=index)
    if masked_lm:
        head = ("cls", "predictions")
        add("cls.predictions.transform.dense", (*head, "transform", "dense"), "linear", head="mlm")
        add("cls.predictions.transform.LayerNorm", (*head, "transform", "LayerNorm"), "norm", head="mlm")
        out.append(_Tensor("cls.predictions.bias", (*head, "bias"), False, "mlm"))
        return out
    add(f"{prefix}pooler.dense", ("bert", "pooler", "dense"), "linear", head="pooler")
    add("classifier", ("classifier",), "linear", head="classifier")
    return out


def _canonical(name: str, prefix: str = "bert.") -> str:
    """Strip the encoder prefix (`bert.`, or `ernie.` for ERNIE) and rename legacy TF-era LayerNorm gamma/beta."""
    name = name.removeprefix(prefix)
    if "LayerNorm." in name:
        for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
            if name.endswith(old):
                name = name.removesuffix(old) + new
    return name


def _fresh_heads(
    state_dict: Mapping[str, np.ndarray],
    by_name: Mapping[str, str],
    config: BertConfig,
    source: str,
    masked_lm: bool = False,
) -> dict[str, str]:
    """Heads to initialise fresh, with the reason why."""
    fresh = {}
    for head in _HEADS[masked_lm]:
        tensors = [t for t in _tensors(0, scan_layers=False, masked_lm=masked_lm) if t.head == head]
        present = [t.canonical for t in tensors if t.canonical in by_name]
        if present and len(present) < len(tensors):
            raise InputError(f"{source}: has {by_name[present[0]]} but not the rest of the {_HEAD_NAMES[head]}")
        if not present:
            fresh[head] = f"the checkpoint has no {_HEAD_NAMES[head]}"
        elif head == "classifier":
            rows, wanted = np.shape(state_dict[by_name[tensors[0].canonical]])[0], config.num_labels
            if rows != wanted:
                # A head trained for another label set is of no use; it is left in `unused`.
                fresh[head] = f"the checkpoint's head has {rows} labels, the config {wanted}"
    return fresh


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], config: BertConfig, rng: jax.Array, *, source: str, scan_layers: bool = True,
    masked_lm: bool = False,
) -> tuple[dict[str, Any], LoadReport]:  # fmt: skip
    """Map an HF BERT state dict onto our param tree (the inner dict of `init_params`, or with
    `masked_lm` of `init_mlm_params`), in the layout of `scan_layers`.

    `source` names the checkpoint in error messages and the report. `rng` seeds heads that are
    initialised fresh.
    """
    by_name: dict[str, str] = {}  # canonical name -> name in the file
    for original in state_dict:
        canonical = _canonical(original, _PREFIXES[config.model_type])
        if canonical in by_name:
            raise InputError(
                f"{source}: tensors {by_name[canonical]} and {original} are the same weight"
            )
        by_name[canonical] = original
    for buffer in (*_BUFFERS, *(_TIED_MLM_DECODER if masked_lm else ())):
        by_name.pop(buffer, None)

    specs = _tensors(config.num_hidden_layers, scan_layers, config.model_type, config.use_task_id, masked_lm)
    missing = [t.hf_name for t in specs if t.head is None and t.canonical not in by_name]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        shown = ", ".join(missing[:4]) + more
        name = _DISPLAY_NAMES[config.model_type]
        raise InputError(f"{source}: not {name} checkpoint for this config, missing {shown}")
    fresh = _fresh_heads(state_dict, by_name, config, source, masked_lm)

    params = _fresh_head_params(config, tuple(fresh), rng, scan_layers, masked_lm)
    slices: dict[tuple[str, ...], list[np.ndarray]] = {}  # stacked leaves, one array per layer
    loaded: list[str] = []
    initialized = [t.hf_name for t in specs if t.head in fresh]
    shapes = _leaf_shapes(config, scan_layers, masked_lm)
    for t in specs:
        if t.head in fresh:
            continue
        shape = shapes[t.path][1:] if t.index is not None else shapes[t.path]
        original = by_name.pop(t.canonical)
        array = np.asarray(state_dict[original], dtype=np.float32)
        hf_shape = shape[::-1] if t.is_linear_weight else shape
        if array.shape != hf_shape:
            raise InputError(
                f"{source}: tensor {original} has shape {list(array.shape)}, "
                f"the model config needs {list(hf_shape)}"
            )
        array = array.T if t.is_linear_weight else array
        if t.index is None:
            params[t.path] = jnp.asarray(array)
        else:
            slices.setdefault(t.path, []).append(array)
        loaded.append(t.hf_name)
    params.update({path: jnp.asarray(np.stack(layers)) for path, layers in slices.items()})

    report = LoadReport(
        source=source,
        loaded=tuple(loaded),
        unused=tuple(sorted(by_name.values())),
        initialized=tuple(initialized),
        notes=tuple(f"Fresh {head}: {why}." for head, why in fresh.items()),
        fresh_heads=tuple(fresh),
    )
    return traverse_util.unflatten_dict(params), report


def _leaf_shapes(config: BertConfig, scan_layers: bool, masked_lm: bool = False) -> dict[tuple[str, ...], tuple[int, ...]]:
    # The model defines the shapes; eval_shape traces init without computing anything.
    init = init_mlm_params if masked_lm else init_params
    shapes = jax.eval_shape(lambda key: init(config, key, scan_layers), jax.random.key(0))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}


def _fresh_head_params(config: BertConfig, heads: tuple[str, ...], rng: jax.Array, scan_layers: bool, masked_lm: bool = False) -> dict:
    """HF's initialisation of the `heads` ("pooler", "classifier"; "mlm") from `rng`: {tree path: array}."""
    keys = dict(zip(heads, jax.random.split(rng, max(len(heads), 1))))
    shapes = _leaf_shapes(config, scan_layers, masked_lm)
    out = {}
    for t in _tensors(config.num_hidden_layers, scan_layers, config.model_type, config.use_task_id, masked_lm):
        if t.head in heads:
            is_scale = t.path[-2:] == ("LayerNorm", "scale")
            init = hf_normal_init(config) if t.is_linear_weight else (jax.nn.initializers.ones if is_scale else jax.nn.initializers.zeros)
            out[t.path] = init(keys[t.head], shapes[t.path], jnp.float32)
    return out


def state_dict_from_params(params: Mapping[str, Any], model_type: str = "bert") -> dict[str, np.ndarray]:
    """Our params as a `transformers.BertForSequenceClassification` state dict, or for
    `model_type="ernie"` an `ErnieForSequenceClassification` one (with the task-type table if
    the params have it); a masked-LM model's (`cls` in the params) as a Bert/ErnieForMaskedLM
    one, without the decoder's tied copies (transformers ties them on loading).

    Float32, C-contiguous numpy arrays under HF's names, ready for `safetensors.numpy.save_file`.
    """
    if model_type not in _PREFIXES:
        raise ValueError(f"model_type {model_type!r} is not one of {', '.join(_PREFIXES)}")
    use_task_id = "task_type_embeddings" in params["bert"]["embeddings"]
    if use_task_id and model_type != "ernie":
        raise ValueError("params with task-type embeddings are an ERNIE model's: pass model_type='ernie'")
    encoder = params["bert"]["encoder"]
    if scans_layers(params):
        num_layers = jax.tree.leaves(encoder["layers"])[0].shape[0] + 1
    else:
        num_layers = sum(1 for key in encoder if key.startswith("layer_"))
    flat = traverse_util.flatten_dict(params)
    out = {}
    for t in _tensors(num_layers, scans_layers(params), model_type, use_task_id, masked_lm="cls" in params):
        array = np.asarray(flat[t.path] if t.index is None else flat[t.path][t.index], dtype=np.float32)
        out[t.hf_name] = np.ascontiguousarray(array.T if t.is_linear_weight else array)
    return out


def load_pretrained(
    model_dir: Path, config: BertConfig, rng: jax.Array, scan_layers: bool = True
) -> tuple[dict[str, Any], LoadReport]:
    """Find, read and convert the weights in an HF model folder; `rng` seeds the fresh heads."""
    models, report = load_pretrained_models(model_dir, config, [rng], scan_layers)
    return models[0], report


def load_pretrained_models(
    model_dir: Path, config: BertConfig, rngs: list[jax.Array], scan_layers: bool = True, masked_lm: bool = False
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Find, read and convert the weights in an HF model folder, once, for as many models as `rngs`:
    each model gets the file's weights and its own fresh heads (from its rng), where the file has none."""
    model_dir = Path(model_dir)
    path = find_weights_file(model_dir)
    if path is None:
        raise InputError(
            f"{model_dir}: no {SAFETENSORS_NAME} or {PYTORCH_NAME} (whole or sharded) found; to train from scratch "
            "on purpose, set model.from_scratch=True"
        )
    params, report = params_from_state_dict(
        read_state_dict(path), config, rngs[0], source=str(path), scan_layers=scan_layers, masked_lm=masked_lm
    )
    models = [params]
    for rng in rngs[1:]:
        flat = traverse_util.flatten_dict(params)
        flat.update(_fresh_head_params(config, report.fresh_heads, rng, scan_layers, masked_lm))
        models.append(traverse_util.unflatten_dict(flat))
    return models, report
