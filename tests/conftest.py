"""Shared pytest helpers: the project's `../shared` data, a compilation cache, the one way the tests
start a command line (`cli`), and runs of `train_and_evaluate` in this process (`train_in_process`).

End-to-end checks run `train_and_evaluate` in the test process wherever they need no process of
their own; a subprocess (through `cli`) is for what only one can show: another device count
(XLA_FLAGS), signals, several processes, exit statuses and the one-line errors of the commands.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import pathlib
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

# The suite runs many short trainings with identical programs: a persistent XLA cache (inherited
# by every subprocess) turns their compilations into cache reads. One for the whole session, set
# by pytest-xdist's controller before it starts the workers, so a program one worker compiled is
# read by the other. JAX writes an entry in place; a half-written one that a reader meets is a
# warning and a compilation (jax._src.compiler._cache_read), not an error.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The first rows of each AFQMC split, written once per session (`pytest_configure`) where every
# process of a test (subprocesses, SLURM tasks) reads them: a run of the machinery reads, scores
# and predicts all of its data, and the full dev and test sets would be most of a tiny run's work.
AFQMC_CUT_ROWS = {"train": 1024, "dev": 256, "test": 256}
AFQMC_CUT_DIR = REPO_ROOT / ".pytest_cache" / "afqmc-cut"
AFQMC_CUT = {f"data.{split}_file": AFQMC_CUT_DIR / f"{split}.json" for split in AFQMC_CUT_ROWS}

# A 1-layer, 32-wide BERT on one bucket length (one compilation) and the cut of AFQMC: for tests
# of the run's machinery (resume, processes), where the model's quality does not matter.
TINY_RUN = {
    "model.num_hidden_layers": 1,
    "model.hidden_size": 32,
    "model.num_attention_heads": 2,
    "model.intermediate_size": 64,
    "data.bucket_lengths": (64,),
    "train.batch_size": 16,
    "optim.learning_rate": 0.001,
    "train.eval_all_params": False,  # one dev pass per evaluation is enough there
    "train.plot_curves": False,  # drawn and checked by test_train_e2e and test_pretrain's tapt_run
    **AFQMC_CUT,
}


def tiny_model(**changes):
    """The tests' tiny BERT (2 layers, 32 wide, 2 heads), with `changes`: the one model config unit tests build."""
    from sda_jax.models.config import BertConfig

    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2, num_labels=2,
    )  # fmt: skip
    return config.replace(**changes)


def settings_with(**overrides):
    """The default settings with `section__key=value` overrides (a double underscore for the dot),
    from a plain Adam step: lr 1e-3, no warmup, bias correction, no Lookahead, the eval EMA from step 0."""
    from configs import default
    from sda_jax.config import Settings

    config = default.get_config()
    values = {
        "optim__learning_rate": 1e-3, "optim__warmup_ratio": 0.0, "optim__adam_bias_correction": True,
        "optim__lookahead_k": None, "sda__eval_ema_start_step": 0, **overrides,
    }  # fmt: skip
    for key, value in values.items():
        section, name = key.split("__")
        config[section][name] = value
    return Settings.from_config(config)


def flags_of(overrides: Mapping[str, Any]) -> list[str]:
    """Config overrides as the command line takes them."""
    return [f"--config.{key}={value!r}" if not isinstance(value, (str, pathlib.Path)) else f"--config.{key}={value}"
            for key, value in overrides.items()]  # fmt: skip


TINY_RUN_FLAGS = flags_of(TINY_RUN)


@dataclasses.dataclass(frozen=True)
class Cli:
    """`python -m MODULE ARGS` from the repository root, on the CPU with `devices` simulated devices."""

    def env(self, devices: int = 1, **extra: str) -> dict[str, str]:
        return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)

    def command(self, module: str, *args: Any) -> list[str]:
        return [sys.executable, "-m", module, *map(str, args)]

    def run(self, module: str, *args: Any, devices: int = 1, env: dict | None = None, cwd=REPO_ROOT, timeout: float = 900):
        return subprocess.run(
            self.command(module, *args), cwd=cwd, env={**self.env(devices), **(env or {})}, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def start(self, module: str, *args: Any, devices: int = 1, env: dict | None = None, log=None) -> subprocess.Popen:
        """The command in the background; its output piped, or into the open file `log` (a run
        left alone for long must not fill a pipe nobody reads)."""
        streams = {"stdout": log, "stderr": subprocess.STDOUT} if log else {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        return subprocess.Popen(
            self.command(module, *args), cwd=REPO_ROOT, env={**self.env(devices), **(env or {})}, text=True, **streams
        )


def pytest_configure(config) -> None:
    """Writes the cut of AFQMC (AFQMC_CUT) unless it is there: pytest-xdist's controller first,
    before its workers start; each file whole, through a rename, for the workers that find it."""
    for split, rows in AFQMC_CUT_ROWS.items():
        if not (SHARED_DIR / "data" / "afqmc" / f"{split}.json").is_file():
            return  # without ../shared the tests that read AFQMC say so, each
        AFQMC_CUT_DIR.mkdir(parents=True, exist_ok=True)
        with open(SHARED_DIR / "data" / "afqmc" / f"{split}.json", encoding="utf-8") as source:
            text = "".join(line for line, _ in zip(source, range(rows)))
        target = AFQMC_CUT_DIR / f"{split}.json"
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            partial = target.with_name(f"{target.name}.{os.getpid()}")
            partial.write_text(text, encoding="utf-8")
            partial.replace(target)


def pytest_collection_modifyitems(items) -> None:
    # Tests of whole runs (training, resuming, several processes) live in tests/e2e/: `-m "not e2e"`
    # leaves the unit tests, and `pytest tests/<folder>` one stage's.
    for item in items:
        if "e2e" in pathlib.Path(str(item.fspath)).relative_to(REPO_ROOT).parts[:2]:
            item.add_marker(pytest.mark.e2e)
    # Longest first: pytest-xdist (`--dist loadfile --no-loadscope-reorder`) hands out whole files
    # in this order, so the SLURM jobs (minutes, mostly waiting on the scheduler and a watchdog) and
    # then the other whole runs start at once, and the short unit files fill in at the end instead
    # of one worker finishing a long file alone. A stable sort: each file's tests stay together.
    items.sort(key=lambda item: 0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("e2e") else 2)


def pytest_collection_finish(session) -> None:
    """As the commands do (sda_jax/commands.py): the imports' objects, all made by now, go to the
    collector's permanent generation, which its full collections during tracing do not rescan."""
    gc.freeze()


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Asserts a command failed with exit 2 and one `error:` line holding every needle; returns it."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def settings_of(overrides: Mapping[str, Any] = (), config: str = "afqmc_small"):
    """The settings of a shipped config with dotted-key overrides, as the command line would read them."""
    import importlib

    from sda_jax.config import Settings

    config_dict = importlib.import_module(f"configs.{config}").get_config()
    for key, value in dict(overrides).items():
        *sections, name = key.split(".")
        node = config_dict
        for section in sections:
            node = node[section]
        node[name] = str(value) if isinstance(value, pathlib.Path) else value
    return Settings.from_config(config_dict)


def train_in_process(workdir: pathlib.Path, overrides: Mapping[str, Any] = (), config: str = "afqmc_small", **kwargs) -> dict:
    """`train_and_evaluate` of a shipped config with overrides, in this process; returns the summary."""
    from sda_jax.train import train_and_evaluate

    return train_and_evaluate(settings_of(overrides, config), workdir, **kwargs)


def moved_by_rounding_alone(key: str) -> bool:
    """State entries of the attention key biases (their params, averages and Adam moments).

    Softmax is invariant to a key bias, so its exact gradient is zero and Adam moves it on the
    rounding noise of the gradient sums alone (tests/e2e/test_parity.py checks the invariance). Runs
    that sum gradients in another order (other device or process counts) agree on everything else
    to float32 rounding, but not on this noise, whose size depends on how XLA fuses the step.
    """
    return "['attention']['self']['key']['bias']" in key


def assert_within_rounding_but_adam_flips(got, want, name: str, atol: float = 1e-6, flip_bound: float = 1e-4) -> float:
    """`got` and `want` (weights of runs that sum gradients in another order: vmapped models,
    other device counts) within `atol` everywhere but at most one element in 100,000 (at least
    one), which stays within `flip_bound`; returns the largest difference.

    Adam normalises each update: an element whose gradient is near zero in both runs (a word row
    the batches barely touch) steps by up to the learning rate wherever the sums' rounding points
    it, so that a few such elements end further apart than float32 rounding of everything else.
    """
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    far = diff > atol
    assert far.sum() <= max(1, far.size // 100_000), (name, int(far.sum()), float(diff.max()))
    assert np.all(diff[far] <= flip_bound), (name, float(diff.max()))
    return float(diff.max()) if diff.size else 0.0


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

    from sda_jax.workdir import checkpoints
    from sda_jax.workdir.layout import Workdir

    state = checkpoints.read_train_state(Workdir(workdir).train_checkpoints, step)
    return {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_flatten_with_path(state)[0]}


def read_records(workdir: pathlib.Path, split: str) -> list[dict]:
    """The run's metrics.jsonl records of one split."""
    import json

    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]
