"""Nothing lost when two runs share a workdir, a checkpoint is damaged or the disk fills, and a
time-based checkpoint cadence (that two processes agree on it: tests/e2e/test_multihost.py).

Each fault is made by hand on a run of the 1-layer model, and the run that follows it is held
to an undisturbed one: bit-identical final state, metrics and predictions.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from sda_jax import export
from sda_jax.errors import InputError, NoSpaceError
from tests.conftest import REPO_ROOT, TINY_RUN, flags_of, load_train_state, one_line_error, train_in_process
from tests.e2e import resume_runs

# Checkpoints at 20, 30, 40 kept: enough to fall back on.
RUN = {**TINY_RUN, "train.max_steps": 40, "train.log_every": 4, "train.eval_every": 20, "train.checkpoint_every": 10,
       "train.keep_checkpoints": 3}  # fmt: skip


def _train(workdir, fresh=False, **changes):
    """A run of RUN (with dotted-key `changes`) in this process: (its summary, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = train_in_process(workdir, {**RUN, **changes}, fresh=fresh)
    return summary, printed.getvalue()


_same_run = resume_runs.assert_same_run  # final state, metrics and predictions, bit for bit


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("undisturbed") / "run"
    _train(workdir)
    return workdir


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# --- Damaged checkpoints ----------------------------------------------------------------------


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate_where_no_manifest_was_written(path):
    step_dir = next(parent for parent in path.parents if parent.name.isdigit())
    (step_dir / "sda_jax_manifest.json").unlink()
    _truncate(path)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate, "bytes"),  # cut short: its manifest has the size
        (lambda path: path.unlink(), "is missing"),
        (_flip_a_byte, "does not match its checksum"),
        # No manifest (a run killed before it wrote one): orbax's own reading finds the damage.
        (_truncate_where_no_manifest_was_written, ""),
    ],
    ids=["cut-short", "file-missing", "flipped-byte", "no-manifest"],
)
def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(undisturbed, tmp_path, damage, reason):
    workdir = tmp_path / "run"
    shutil.copytree(undisturbed, workdir)
    step_40 = workdir / "checkpoints" / "train" / "40"
    damage(_largest_file(step_40))
    summary, printed = _train(workdir)
    line = next(line for line in printed.splitlines() if "damaged" in line)
    assert line.startswith("checkpoints/train/40: damaged (") and line.endswith("); resuming from 30"), line
    assert reason in line
    assert summary["resumed_from_step"] == 30
    assert [p.name.split("-")[:2] for p in (workdir / "checkpoints" / "damaged").iterdir()] == [["train", "40"]]  # moved, not deleted
    _same_run(undisturbed, workdir)


def test_no_intact_checkpoint_is_one_line_and_fresh_starts_over(undisturbed, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(undisturbed, workdir)
    for step in (20, 30, 40):
        _truncate(_largest_file(workdir / "checkpoints" / "train" / str(step)))
    with pytest.raises(InputError, match=r"checkpoints/train: every train checkpoint is damaged .*rerun with --fresh"):
        _train(workdir)
    assert len(list((workdir / "checkpoints" / "damaged").iterdir())) == 3
    _train(workdir, fresh=True)
    _same_run(undisturbed, workdir)


def test_a_damaged_best_checkpoint_is_one_line_naming_it(undisturbed, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(undisturbed, workdir)
    best = next(p for p in (workdir / "checkpoints" / "best" / "model_0").iterdir() if p.name.isdigit())
    _flip_a_byte(_largest_file(best))
    with pytest.raises(InputError, match=rf"{best}: the best checkpoint is damaged \(.*checksum\)"):
        export.export(workdir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match=rf"{best}: the best checkpoint is damaged"):  # at prediction too
        _train(workdir)


# --- Two runs on one workdir ----------------------------------------------------------------------


def test_a_second_run_on_a_live_workdir_is_refused_and_changes_nothing(undisturbed, tmp_path, cli):
    """Started twice (plain and with --fresh) while the first holds the workdir: refused at once,
    with one line naming the holder, and the first finishes exactly as an undisturbed run does.
    The first is paused (SIGSTOP) meanwhile, so that it is live however fast this machine is."""
    command = lambda workdir, *extra: ("sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}", *flags_of(RUN), *extra)
    live = tmp_path / "live"
    first = cli.start(*command(live))
    deadline = time.time() + 300
    while not (live / "settings.json").exists():  # written once the run holds the workdir
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    try:
        for extra in ((), ("--fresh",)):
            started = time.perf_counter()
            second = cli.run(*command(live, *extra), timeout=120)
            line = one_line_error(second, f"{live}: in use by a run that is still going (pid {first.pid} on {socket.gethostname()}")
            print(f"reliability: second run {extra or '(plain)'} refused in {time.perf_counter() - started:.1f} s: {line}")
        assert (live / "settings.json").exists() and (live / "model").is_dir()  # --fresh removed nothing
        one_line_error(cli.run("sda_jax.export", f"--workdir={live}", f"--out={tmp_path / 'early'}", timeout=120),
                       "its run is still training", "--while_training")  # fmt: skip
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    _same_run(undisturbed, live)  # as the run no other run disturbed (in this process: the same programs)


# --- A full disk ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _small_filesystem(path: pathlib.Path, megabytes: int):
    """A tmpfs of that size at `path`; None where this machine cannot mount one (not root)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True, check=False)
    try:
        yield path if mounted.returncode == 0 else None
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_stops_the_run_with_one_line_and_a_rerun_resumes_exactly(undisturbed, tmp_path, cli):
    with _small_filesystem(tmp_path / "small", megabytes=64) as small:
        if small is not None:
            workdir, filler = small / "run", small / "filler"
            filler.write_bytes(os.urandom(42 << 20))  # leaves room for two train checkpoints (5.7 MB) and the best one (7.7)
            with pytest.raises(NoSpaceError) as stopped:
                _train(workdir)
            message = str(stopped.value)
        else:  # not root: a file-size limit stands in (the same failed writes, EFBIG instead of ENOSPC)
            workdir = tmp_path / "run"
            limited = lambda: (resource.setrlimit(resource.RLIMIT_FSIZE, (6 << 20, 6 << 20)), signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
            result = subprocess.run(
                cli.command("sda_jax.train", *resume_runs.arguments(workdir, *flags_of(RUN))), cwd=REPO_ROOT, env=cli.env(),
                capture_output=True, text=True, timeout=600, preexec_fn=limited, check=False,
            )  # fmt: skip
            assert result.returncode == 4, result.stderr[-3000:]
            message = result.stderr.strip().splitlines()[-1].removeprefix("error: ")
        assert message.startswith("no space left on ") and " while writing " in message, message
        print(f"reliability: full disk: {message}")
        steps = sorted(int(p.name) for p in (workdir / "checkpoints" / "train").iterdir() if p.name.isdigit())
        assert steps and steps[-1] < 40
        for step in steps:  # what was written before is intact
            np.testing.assert_array_equal(load_train_state(workdir, step)["['step']"], step)
        if small is not None:
            filler.unlink()  # space freed
            _train(workdir)
            _same_run(undisturbed, workdir)
    if small is None:
        result = cli.run("sda_jax.train", *resume_runs.arguments(workdir, *flags_of(RUN)), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        _same_run(undisturbed, workdir)


# --- A time-based checkpoint cadence -------------------------------------------------------------


def test_a_resume_from_a_time_based_checkpoint_is_bit_exact(undisturbed, tmp_path):
    """Every log step (4) is `checkpoint_every_seconds` after the last save: checkpoints at 32, 36,
    40 (kept 3), then 40 is damaged, so the run resumes from 36, a step only the clock chose."""
    uninterrupted, workdir = tmp_path / "uninterrupted", tmp_path / "run"
    _train(uninterrupted, **{"train.checkpoint_every_seconds": 1e-3, "train.checkpoint_every": 1000})
    assert sorted(int(p.name) for p in (uninterrupted / "checkpoints" / "train").iterdir() if p.name.isdigit()) == [32, 36, 40]
    shutil.copytree(uninterrupted, workdir)
    _truncate(_largest_file(workdir / "checkpoints" / "train" / "40"))
    summary, printed = _train(workdir, **{"train.checkpoint_every_seconds": 1e-3, "train.checkpoint_every": 1000})
    assert "resuming from 36" in printed and summary["resumed_from_step"] == 36
    restart = summary["seconds_to_first_step"]
    phases = [v for k, v in restart.items() if k != "wall"]
    # Each figure is rounded to the millisecond: their sum is the wall to within half of one per figure.
    assert restart["checkpointing"] > 0 and sum(phases) == pytest.approx(restart["wall"], abs=5e-4 * (len(phases) + 1))
    _same_run(uninterrupted, workdir)
    # A run with the step cadence trains the same state (its log has records at its checkpoint steps too).
    np.testing.assert_array_equal(load_train_state(undisturbed, 40)["['params']['classifier']['kernel']"],
                                  load_train_state(workdir, 40)["['params']['classifier']['kernel']"])  # fmt: skip


# --- A newcomer's two commands -------------------------------------------------------------------


def test_the_first_two_commands_of_the_readme_are_demo_and_test():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line.split("#")[0].strip() for block in readme.split("```bash")[1:] for line in block.split("```")[0].splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"], commands[:3]
    dry = lambda target: subprocess.run(["make", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert "bash .ci/run" in dry("test") and "run.sh" in dry("demo")
    assert subprocess.run(["bash", "-n", "run.sh"], cwd=REPO_ROOT, check=False).returncode == 0


def test_without_torch_transformers_says_nothing_of_it():
    """transformers' import says "PyTorch was not found..." where torch is missing; sda-jax, which
    needs no PyTorch, keeps that line off its commands' output."""
    code = (
        "import sda_jax, transformers\n"
        "from transformers.utils import logging\n"
        "logging.get_logger('transformers').warning_advice(\"PyTorch was not found. Models won't be available.\")\n"
        "logging.get_logger('transformers').warning('another warning')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "PyTorch was not found" not in result.stderr and "another warning" in result.stderr
