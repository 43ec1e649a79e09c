"""Two local CPU processes through launch.sh train the same model as one process on the same batches,
and agree on the time-based checkpoints that process 0's clock decides."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import AFQMC_CUT_ROWS, REPO_ROOT, TINY_RUN, flags_of, load_train_state, train_in_process

RUN = {**TINY_RUN, "train.max_steps": 12, "train.log_every": 4, "train.eval_every": 12, "train.checkpoint_every": 12}
FLAGS = flags_of(RUN)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fake_python_first(env: dict, folder: pathlib.Path) -> dict:
    """`env` with a `python` that always fails first on PATH: only $PYTHON can make launch.sh work."""
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / "python"
    fake.write_text("#!/bin/sh\necho 'not the python you want' >&2\nexit 99\n")
    fake.chmod(0o755)
    return {**env, "PATH": f"{folder}{os.pathsep}{env['PATH']}"}


def _launch(workdir, *launch_args, env_extra=None, extra_flags=()):
    # PYTHON: the interpreter running the tests, so a virtualenv works without being activated.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, **(env_extra or {}))
    env = _fake_python_first(env, pathlib.Path(workdir).parent / "fake-bin")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        ["bash", "launch.sh", *launch_args, "configs/afqmc_small.py", f"--workdir={workdir}", *FLAGS, *extra_flags],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr) once all have ended. If one is still running after
    `timeout` s, all are killed and the test fails with its output: a hung collective must fail
    the test, not hang the suite."""
    results = []
    for proc in procs:
        try:
            results.append(proc.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"a process was still running after {timeout} s (all killed): {proc.communicate()[1][-3000:]}")
    return results


@pytest.mark.parametrize("seeds", [(), (2021, 2022)], ids=["one seed", "two seeds"])
def test_two_processes_match_one(tmp_path, seeds):
    """With two seeds, each process holds one seed's state and feeds every row of the batch. The
    two processes checkpoint by time at every log step, and at step 12 the train checkpoint and
    the best checkpoints are written at once: orbax's saves are collective, so a step on which the
    processes disagreed, or two checkpoint managers whose barriers met (as they did before they had
    names of their own: a hang at the last save in most runs), would hang or fail the run.

    jaxlib 0.12's CPU backend never completes a cross-process program that it read from the
    persistent compilation cache (benchmarks/jax_cpu_cache_hang.md), so that a second such run of
    the same settings would hang: multi-process CPU runs compile afresh and write no cache entry
    for a later run to read."""
    sweep = {"sweep.seed": seeds} if seeds else {}
    # The reference: one process (this one; a command-line run compiles the same programs).
    train_in_process(tmp_path / "one", {**RUN, **sweep})
    by_time = {"train.checkpoint_every_seconds": 1e-3, "train.checkpoint_every": 1000, "train.log_every": 3, "train.keep_checkpoints": 3}
    port = _free_port()
    workdir, cache = tmp_path / "two", tmp_path / "cache"
    procs = [
        _launch(workdir, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                env_extra={"JAX_COMPILATION_CACHE_DIR": str(cache)}, extra_flags=flags_of({**sweep, **by_time}))
        for i in range(2)
    ]  # fmt: skip
    results = _wait_all(procs, timeout=300)
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints" / "train").iterdir() if p.name.isdigit())
    assert steps == [6, 9, 12], steps  # every log step (3) of the 12, the last three kept
    assert "2 processes" in results[0][0]  # process 0 prints the summary
    assert "dev accuracy" not in results[1][0]  # process 1 writes and prints nothing of its own
    assert not [p.name for p in cache.rglob("*") if p.is_file()]  # nothing a second run could read

    one, two = load_train_state(tmp_path / "one", 12), load_train_state(workdir, 12)
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=2e-5, atol=2e-6, err_msg=key)
    assert (workdir / "afqmc_predict.json").read_text().count("\n") == AFQMC_CUT_ROWS["test"]
    assert (workdir / "afqmc_predict.json").read_text() == (tmp_path / "one" / "afqmc_predict.json").read_text()


def test_launch_needs_all_three_values(tmp_path):
    proc = _launch(tmp_path / "w", "--coordinator", "127.0.0.1:1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--num-processes" in err


def test_launch_runs_the_interpreter_named_by_PYTHON(tmp_path):
    env = _fake_python_first(dict(os.environ, JAX_PLATFORMS="cpu"), tmp_path / "bin")
    env.pop("PYTHON", None)
    args = ["bash", "launch.sh", "no_such_config.py"]
    on_path = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert on_path.returncode == 99 and "not the python you want" in on_path.stderr
    named = subprocess.run(
        args, cwd=REPO_ROOT, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, check=False, timeout=120
    )  # fmt: skip
    assert named.returncode == 2
    assert named.stderr.strip().splitlines() == [
        f"error: no_such_config.py: no such config file here or in {REPO_ROOT / 'configs'}"
    ]

