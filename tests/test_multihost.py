"""Two local CPU processes through launch.sh train the same model as one process on the same batches."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, TINY_RUN, flags_of, load_train_state, train_in_process

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


@pytest.mark.parametrize("seeds", [(), (2021, 2022)], ids=["one seed", "two seeds"])
def test_two_processes_match_one(tmp_path, seeds):
    """With two seeds, each process holds one seed's state and feeds every row of the batch."""
    sweep = {"sweep.seed": seeds} if seeds else {}
    # The reference: one process (this one; a command-line run compiles the same programs).
    train_in_process(tmp_path / "one", {**RUN, **sweep})
    port = _free_port()
    workdir = tmp_path / "two"
    procs = [
        _launch(workdir, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                extra_flags=flags_of(sweep))
        for i in range(2)
    ]  # fmt: skip
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    assert "2 processes" in results[0][0]  # process 0 prints the summary
    assert "dev accuracy" not in results[1][0]  # process 1 writes and prints nothing of its own

    one, two = load_train_state(tmp_path / "one", 12), load_train_state(workdir, 12)
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=2e-5, atol=2e-6, err_msg=key)
    assert (workdir / "afqmc_predict.json").read_text().count("\n") == 3861
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
