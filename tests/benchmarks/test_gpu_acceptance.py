"""The GPU acceptance script, on paper and in its mechanics: the plan fits its budget, parts that do
not fit are skipped with a line, a part past its bound is killed, and a real part writes its figures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from benchmarks import bench, gpu_acceptance
from tests.conftest import REPO_ROOT


def _script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "benchmarks/gpu_acceptance.sh", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        check=False, env=dict(os.environ, **(env or {})),
    )  # fmt: skip


def _planned(stdout: str) -> dict[str, tuple[float, bool]]:
    """{part: (estimate, fits)} from the printed plan."""
    rows = re.findall(r"^  (\w+)\s+est\.\s+(\d+) s \(bound \d+ s\), (ends|skipped)", stdout, flags=re.M)
    return {name: (float(estimate), status == "ends") for name, estimate, status in rows}


def test_dry_run_prints_a_plan_that_fits_its_budget():
    result = _script("--dry-run")
    assert result.returncode == 0, result.stderr
    planned = _planned(result.stdout)
    assert list(planned) == [part.name for part in gpu_acceptance.PARTS]
    assert sum(estimate for estimate, fits in planned.values() if fits) <= gpu_acceptance.DEFAULT_BUDGET_S
    assert planned["device"][1] and planned["tests"][1] and planned["epoch"][1] and planned["step"][1]
    assert "goals:" in result.stdout and "deviceless H100 estimates" in result.stdout
    # A smaller budget: what does not fit is said to be skipped, and the rest still fits.
    small = _planned(_script("--dry-run", "--budget-s", "120").stdout)
    assert sum(e for e, fits in small.values() if fits) <= 120 and not small["step"][1] and small["device"][1]


def test_unknown_part_is_refused():
    result = _script("--dry-run", "nope")
    assert result.returncode == 2 and "unknown part(s) nope" in result.stderr


def test_every_bench_command_of_the_plan_parses(tmp_path):
    """The bench invocations the parts would run are accepted by benchmarks.bench (forms, flags), and
    the command-buffer flags are ones this jaxlib knows (XLA refuses unknown ones at start)."""
    ctx = gpu_acceptance.Context(out=tmp_path, python=sys.executable, scratch=tmp_path)
    commands = [c for part in gpu_acceptance.PARTS for c in part.commands(ctx) if "benchmarks.bench" in c.argv]
    assert {c.label for c in commands} == {"step", "cmdbuf", "seeds"}
    for command in commands:
        args = bench.parse_args(command.argv[command.argv.index("benchmarks.bench") + 1 :])
        assert args.model == "base" and args.no_append and args.json
    step = next(c for c in commands if c.label == "step")
    kinds = bench.parse_args(step.argv[3:]).form_specs
    assert kinds["jax"] == ("jax", 1, True) and kinds["jax-unrolled"] == ("jax", 1, False) and "compile" in kinds
    assert kinds["jax-pallas"] == ("jax-pallas", 1, True)
    assert ctx.figures["cmdbuf"]["xla_flags"] == list(gpu_acceptance.COMMAND_BUFFER_FLAGS)
    assert "WHILE" in next(c for c in commands if c.label == "cmdbuf").env["XLA_FLAGS"]


def test_a_flag_this_jaxlib_does_not_know_is_dropped():
    flags = gpu_acceptance.valid_xla_flags(sys.executable, ("--xla_gpu_no_such_flag=1", "--xla_gpu_command_buffer_unroll_loops=true"))
    assert flags == ["--xla_gpu_command_buffer_unroll_loops=true"]


def test_a_command_past_its_bound_is_killed_and_keeps_its_output(tmp_path):
    log = gpu_acceptance.Log(tmp_path / "log")
    command = gpu_acceptance.Command("sleeper", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
    status, seconds, output = gpu_acceptance.run_command(command, timeout=2.0, log=log)
    assert status.startswith("killed at its time limit") and seconds < 20 and output == "started"
    assert "  | started" in (tmp_path / "log").read_text()


def test_the_device_part_runs_here_and_writes_its_figures(tmp_path):
    """On a machine without a GPU the device part still runs (nvidia-smi is simply absent)."""
    out = tmp_path / "out"
    result = _script("device", "epoch", "--budget-s", "40", env={"OUT": str(out)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads((out / "figures.json").read_text())
    assert figures["device"]["status"].startswith(("nvidia-smi: ok", "versions: ok"))
    assert any(line.startswith("jax ") for line in figures["device"]["versions"])
    assert figures["epoch"]["status"].startswith("skipped: needs ~100 s")
    assert "== epoch: skipped" in (out / "acceptance.log").read_text()
