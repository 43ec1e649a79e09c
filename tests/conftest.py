"""Shared pytest fixtures: where the project's `../shared` data lives, and a compilation cache."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

# The suite starts many short training processes with identical programs: a persistent XLA cache
# (inherited by every subprocess) turns their 10-20 s compilations into cache reads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# A 1-layer, 32-wide BERT on one bucket length (one compilation): for tests of the run's
# machinery (resume, processes), where the model's quality does not matter.
TINY_RUN_FLAGS = [
    "--config.model.num_hidden_layers=1",
    "--config.model.hidden_size=32",
    "--config.model.num_attention_heads=2",
    "--config.model.intermediate_size=64",
    "--config.data.bucket_lengths=(64,)",
    "--config.train.batch_size=16",
    "--config.optim.learning_rate=0.001",
    "--config.train.eval_all_params=False",  # one dev pass per evaluation is enough there
]


def moved_by_rounding_alone(key: str) -> bool:
    """State entries of the attention key biases (their params, averages and Adam moments).

    Softmax is invariant to a key bias, so its exact gradient is zero and Adam moves it on the
    rounding noise of the gradient sums alone (tests/test_parity.py checks the invariance). Runs
    that sum gradients in another order (other device or process counts) agree on everything else
    to float32 rounding, but not on this noise, whose size depends on how XLA fuses the step.
    """
    return "['attention']['self']['key']['bias']" in key


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: OpenMP threads cost more than they bring, ~10x more on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shard_torch_state_dict(model, folder: pathlib.Path, tensors_per_shard: int) -> pathlib.Path:
    """A sharded `pytorch_model.bin` (transformers v5 writes safetensors only), as older
    `save_pretrained` wrote it; returns its index file."""
    import json

    import torch

    state, weight_map = model.state_dict(), {}
    names = list(state)
    for i in range(0, len(names), tensors_per_shard):
        shard = f"pytorch_model-{i // tensors_per_shard + 1:05d}.bin"
        torch.save({n: state[n] for n in names[i : i + tensors_per_shard]}, folder / shard)
        weight_map.update(dict.fromkeys(names[i : i + tensors_per_shard], shard))
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.fixture(scope="session")
def afqmc_dir() -> pathlib.Path:
    """The real CLUE AFQMC split: train.json, dev.json, test.json (JSON lines)."""
    return SHARED_DIR / "data" / "afqmc"


@pytest.fixture(scope="session")
def bert_base_chinese_dir() -> pathlib.Path:
    """bert-base-chinese config.json, vocab.txt and tokenizer_config.json (no weights)."""
    return SHARED_DIR / "data" / "bert-base-chinese"


def load_train_state(workdir: pathlib.Path, step: int) -> dict:
    """A run's train checkpoint as {key path: numpy array}, whatever process/device count saved it."""
    import jax

    from sda_jax import checkpoints

    state = checkpoints.read_train_state(workdir, step)
    return {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_flatten_with_path(state)[0]}
