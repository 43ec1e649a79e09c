"""The resume tests' run: a 40-step tiny run through the command line, started, signalled, resumed
and compared bit for bit (shared by the resume, reliability, seeds, SLURM and end-to-end tests)."""

import pathlib
import random
import time

import numpy as np

from tests.conftest import TINY_RUN, Cli, flags_of, load_train_state, moved_by_rounding_alone

RUN = {
    **TINY_RUN,
    "train.max_steps": 40,
    "train.log_every": 5,
    "train.eval_every": 20,
    "train.checkpoint_every": 10,
    "sda.eval_ema_start_step": 15,
}
TINY = flags_of(RUN)
CLI = Cli()


def arguments(workdir, *extra):
    return ["--config", "configs/afqmc_small.py", f"--workdir={workdir}", *TINY, *extra]


def run(workdir, *extra, devices=1):
    return CLI.run("sda_jax.train", *arguments(workdir, *extra), devices=devices, timeout=600)


def train_steps(workdir: pathlib.Path) -> list[int]:
    folder = workdir / "checkpoints" / "train"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def start_and_signal(workdir, sig, after_checkpoint_steps=10):
    """Starts a run and sends `sig` at a random moment after its first checkpoint exists."""
    process = CLI.start("sda_jax.train", *arguments(workdir))
    deadline = time.time() + 300
    while not train_steps(workdir) or train_steps(workdir)[-1] < after_checkpoint_steps:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))  # the 30 steps left take ~2-3 s on 2 cores: land inside them
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def assert_same_run(a: pathlib.Path, b: pathlib.Path, steps: int = 40):
    """Two runs of `steps` steps: the same final train state, metrics and predictions, bit for bit."""
    flat_a, flat_b = load_train_state(a, steps), load_train_state(b, steps)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    assert (a / "afqmc_predict.json").read_text() == (b / "afqmc_predict.json").read_text()


def assert_close_run(a: pathlib.Path, b: pathlib.Path, steps: int = 40):
    """Two runs of `steps` steps that summed their gradients in another order (another device or
    process count): the same final train state to float32 rounding."""
    flat_a, flat_b = load_train_state(a, steps), load_train_state(b, steps)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_b:
        if not moved_by_rounding_alone(key):
            np.testing.assert_allclose(flat_a[key], flat_b[key], rtol=1e-4, atol=1e-5, err_msg=key)
