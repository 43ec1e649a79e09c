"""GPU acceptance in one budgeted call: every figure written into $OUT the moment it is measured.

    bash benchmarks/gpu_acceptance.sh                    # on a lent GPU: all parts, 420 s budget
    bash benchmarks/gpu_acceptance.sh --dry-run          # anywhere: the plan and its estimates only
    bash benchmarks/gpu_acceptance.sh --budget-s 200 step seeds   # some parts, a smaller budget

The parts run in the order below, each as its own process with a time bound. Before a part starts,
its estimate is compared with the time left: a part that would not fit is skipped with a line
saying so, and a part that runs past its bound (or past the budget) is killed with a line saying
so, keeping what it printed. The plan, with every estimate and how it was made, is printed first.

    device  GPU, driver, CPU count, versions of jax/jaxlib/flax/optax/torch/transformers, jax.devices()
    tests   pytest -m gpu: bf16/fp16 steps against the float32 CPU step, one compile per program, export parity
    epoch   time to result: configs/afqmc.py (BERT-base from scratch: no weights travel) for one AFQMC
            epoch from a cold compilation cache, then again warm; command to predictions, seconds by phase
    step    benchmarks.bench on BERT-base bf16 at the run's bucket length: sda-jax scanned (XLA's ops and
            model.kernels=pallas) and unrolled,
            the seed recipe as written, its best eager form, the best torch.compile form
    cmdbuf  the scanned step again with XLA's command buffers over while loops (XLA's CUDA graphs do not
            capture loops by default); the flags are checked against this jaxlib first, unknown ones dropped
    seeds   1 and 12 BERT-base models in one program (a sweep)

$OUT receives `acceptance.log` (everything printed), `figures.json` (each part's status, seconds and
figures, rewritten after every part) and the epoch runs' `epoch_cold_summary.json` /
`epoch_warm_summary.json`: four files, within what the device tool brings back (8).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 420.0  # the 7 minutes; the device call's timeout_s ≈ 480 leaves a minute
RESERVE_S = 5.0  # kept back at the end for writing figures.json

# XLA's command buffers (CUDA graphs) with while loops in them, and loops with known trip counts
# unrolled into the graph (xla/debug_options_flags.cc of jaxlib 0.10/0.11: the default set lacks WHILE).
COMMAND_BUFFER_FLAGS = (
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE",
    "--xla_gpu_command_buffer_unroll_loops=true",
)

# What the figures are held against (the GPU acceptance issue), and the deviceless H100 estimates
# they check (benchmarks/RESULTS.md, 2026-11-25: `python -m benchmarks.h100_aot`).
GOALS = {
    "train step at the run's length": "<= 4 ms",
    "an AFQMC epoch's train loop": "<= 3 s",
    "cold run, command to predictions": "<= 60 s",
    "warm run, command to predictions": "<= 25 s",
    "x the seed recipe's step": ">= 4",
    "x the best torch.compile form": ">= 1.3",
    "12 models' step / one model's": "<= 4",
}
DEVICELESS = {
    "train step, scanned, L=32 / L=64": "9.1 / 14.0 ms",
    "train step, unrolled, L=32 / L=64": "6.9 / 10.7 ms",
    "train program compile (scanned)": "14.5 CPU-s",
    "8 seeds' step at L=32": "63.4 ms (7.0x one seed)",
}


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    what: str
    estimate_s: float  # planned duration on the lent H200 (see `basis`)
    bound_s: float  # killed after this long
    basis: str  # how the estimate was made
    commands: Callable[[Context], list[Command]]


@dataclasses.dataclass(frozen=True)
class Command:
    label: str
    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    figures: Callable[[Context, str, float], dict] | None = None  # (context, output, seconds) -> figures


@dataclasses.dataclass
class Context:
    out: pathlib.Path
    python: str
    scratch: pathlib.Path
    figures: dict = dataclasses.field(default_factory=dict)


# --- the parts ---------------------------------------------------------------------------------

_DEVICE_FACTS = (
    "import os, platform, jax, jaxlib, flax, optax\n"
    "print('python', platform.python_version(), '| cpus', os.cpu_count())\n"
    "print('jax', jax.__version__, '| jaxlib', jaxlib.__version__, '| flax', flax.__version__, '| optax', optax.__version__)\n"
    "print('devices', jax.devices())\n"
    "try:\n"
    "    import torch, transformers\n"
    "    print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)\n"
    "except ImportError as err:\n"
    "    print('torch/transformers:', err)\n"
)


def _device_commands(ctx: Context) -> list[Command]:
    smi = shutil.which("nvidia-smi")
    commands = []
    if smi:
        query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem"
        commands.append(Command("nvidia-smi", [smi, query, "--format=csv,noheader"], figures=_lines_as("gpu")))
    commands.append(Command("versions", [ctx.python, "-c", _DEVICE_FACTS], figures=_lines_as("versions")))
    return commands


def _tests_commands(ctx: Context) -> list[Command]:
    argv = [ctx.python, "-m", "pytest", "-q", "-m", "gpu", "-rP", "-p", "no:cacheprovider", "tests/gpu/test_gpu.py"]
    return [Command("pytest -m gpu", argv, figures=_pytest_figures)]


def _epoch_commands(ctx: Context) -> list[Command]:
    cache, workdir = ctx.scratch / "xla-cache", ctx.scratch / "epoch"
    argv = [
        ctx.python, "-m", "sda_jax.train", "--config", "configs/afqmc.py", "--config.model.from_scratch=True",
        f"--workdir={workdir}", "--fresh",
    ]  # fmt: skip
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache)}  # empty before the cold run, filled by it
    return [Command(f"{name} epoch", argv, env, figures=_epoch_figures(name, workdir)) for name in ("cold", "warm")]


def _bench(ctx: Context, label: str, forms: str, steps: int, rounds: int, env=None) -> Command:
    rows = ctx.scratch / f"{label}.json"
    argv = [
        ctx.python, "-m", "benchmarks.bench", "--model", "base", "--steps", str(steps), "--rounds", str(rounds),
        "--forms", forms, "--no-append", f"--json={rows}",
    ]  # fmt: skip
    return Command(label, argv, env or {}, figures=lambda _ctx, _out, _s: _json_rows(rows))


def _step_commands(ctx: Context) -> list[Command]:
    return [_bench(ctx, "step", "jax,jax-pallas,jax-unrolled,seed,eager,compile", steps=20, rounds=4)]


def _cmdbuf_commands(ctx: Context) -> list[Command]:
    flags = valid_xla_flags(ctx.python, COMMAND_BUFFER_FLAGS)
    ctx.figures.setdefault("cmdbuf", {})["xla_flags"] = flags
    if not flags:
        return []
    env = {"XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()}
    return [_bench(ctx, "cmdbuf", "jax", steps=20, rounds=1, env=env)]


def _seeds_commands(ctx: Context) -> list[Command]:
    return [_bench(ctx, "seeds", "jax,jax12", steps=8, rounds=2)]


PARTS = (
    Part("device", "GPU, driver, versions, jax.devices()", 10, 45,
         "Python with jax and torch imported, nvidia-smi", _device_commands),
    Part("tests", "pytest -m gpu (bf16/fp16 vs float32 CPU step, one compile per program, export parity)", 50, 120,
         "3 small train-step compiles on CPU and GPU, a 40-step run of a 1-layer model (~10 s start), an export",
         _tests_commands),
    Part("epoch", "configs/afqmc.py, BERT-base from scratch, one AFQMC epoch: cold cache, then warm", 100, 200,
         "per run ~10 s start + data + model; cold: train program 16 CPU-s deviceless + eval programs + GEMM "
         "autotuning ~30 s; 537 steps at the deviceless 14 ms ~8 s; 3 checkpoints of the 1.5 GiB state, 2 dev "
         "evaluations, prediction ~15 s; warm: no compile", _epoch_commands),
    Part("step", "benchmarks.bench, BERT-base bf16: sda-jax scanned, Pallas kernels, unrolled; torch seed, eager, compile",
         175, 270, "~15 s start and data; compiles: scanned ~25 s (twice: XLA's ops and the Pallas kernels), unrolled 32 CPU-s deviceless + autotuning ~45 s, "
         "torch.compile (reduce-overhead) of BERT-base forward+backward ~60 s; 20 timed steps per form",
         _step_commands),
    Part("cmdbuf", "the scanned step with command buffers over while loops", 45, 90,
         "~15 s start and data, a flag check, one scanned compile ~25 s, 20 steps", _cmdbuf_commands),
    Part("seeds", "1 and 12 BERT-base models in one program (a sweep)", 55, 120,
         "~15 s start; one model's program from the cache of the step part; 12 models ~45 CPU-s deviceless + "
         "autotuning ~35 s; 8 steps at ~170 ms", _seeds_commands),
)  # fmt: skip


# --- figures -------------------------------------------------------------------------------------


def _lines_as(key: str):
    return lambda _ctx, output, _seconds: {key: [line for line in output.splitlines() if line.strip()]}


def _pytest_figures(_ctx: Context, output: str, _seconds: float) -> dict:
    lines = output.splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\b(passed|failed|error|skipped)\b", line)), "")
    return {"summary": summary.strip("= "), "measured": [line for line in lines if line.startswith("gpu:")]}


def _epoch_figures(name: str, workdir: pathlib.Path):
    def figures(ctx: Context, _output: str, seconds: float) -> dict:
        summary_path = workdir / "summary.json"
        if not summary_path.is_file():
            return {f"{name}_command_to_predictions_s": round(seconds, 1), f"{name}_summary": None}
        shutil.copyfile(summary_path, ctx.out / f"epoch_{name}_summary.json")
        summary = json.loads(summary_path.read_text())
        keep = ("wall_seconds", "seconds_by_phase", "train_seconds", "train_samples_per_second", "steps",
                "train_step_compilations", "eval_step_compilations", "bucket_lengths", "compute_dtype", "devices")  # fmt: skip
        return {f"{name}_command_to_predictions_s": round(seconds, 1), name: {k: summary.get(k) for k in keep}}

    return figures


def _json_rows(path: pathlib.Path) -> dict:
    return {"rows": json.loads(path.read_text())} if path.is_file() else {"rows": None}


def valid_xla_flags(python: str, flags: tuple[str, ...], timeout: float = 60.0) -> list[str]:
    """The flags this jaxlib accepts: XLA aborts on an unknown flag or value, naming it; drop those and retry."""
    kept = list(flags)
    for _ in range(len(flags)):
        env = dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), *kept]).strip())
        probe = subprocess.run(
            [python, "-c", "import jax; jax.devices()"], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )  # fmt: skip
        if probe.returncode == 0:
            return kept
        text = probe.stderr
        named = [line.split("XLA_FLAGS:", 1)[1] for line in text.splitlines() if re.search(r"Unknown flags? in XLA_FLAGS:", line)]
        named += re.findall(r"[Ii]llegal value for (--?xla_\w+)", text)
        unknown = {name.lstrip("-") for name in re.findall(r"--?(xla_\w+)", " ".join(named))}
        dropped = [f for f in kept if f.split("=")[0].lstrip("-") in unknown]
        if not dropped:
            print(f"note: XLA refused {' '.join(kept)} for an unnamed reason: {text.strip().splitlines()[-1:]}")
            return []
        print(f"note: this jaxlib does not know {' '.join(dropped)}; dropped")
        kept = [f for f in kept if f not in dropped]
    return kept


# --- running -------------------------------------------------------------------------------------


class Log:
    """Prints and appends to $OUT/acceptance.log at once, so a kill at the limit loses nothing printed."""

    def __init__(self, path: pathlib.Path):
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self._file.write(line + "\n")
        self._file.flush()


def plan_lines(parts: list[Part], budget_s: float, elapsed_s: float = 0.0) -> tuple[list[str], list[str]]:
    """The plan: each part's estimate, its bound and whether it fits; returns (lines, parts that fit)."""
    lines = [f"plan: budget {budget_s:.0f} s ({elapsed_s:.0f} s spent before the first part), {RESERVE_S:.0f} s kept for the end"]
    clock, fits = elapsed_s, []
    for part in parts:
        fitting = clock + part.estimate_s <= budget_s - RESERVE_S
        if fitting:
            clock += part.estimate_s
            fits.append(part.name)
        status = f"ends ~{clock:.0f} s" if fitting else "skipped on paper: does not fit"
        lines.append(f"  {part.name:<7} est. {part.estimate_s:>4.0f} s (bound {part.bound_s:.0f} s), {status}: {part.what}")
        lines.append(f"          estimate: {part.basis}")
    lines.append(f"plan: {len(fits)} of {len(parts)} parts fit, {clock - elapsed_s:.0f} s estimated")
    lines.append("goals: " + "; ".join(f"{k} {v}" for k, v in GOALS.items()))
    lines.append("deviceless H100 estimates these figures check: " + "; ".join(f"{k} {v}" for k, v in DEVICELESS.items()))
    return lines, fits


def run_command(command: Command, timeout: float, log: Log) -> tuple[str, float, str]:
    """Runs one command in its own process group, streaming its output; returns (status, seconds, output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **command.env)
    start = time.perf_counter()
    process = subprocess.Popen(
        command.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True,
    )  # fmt: skip
    output: list[str] = []
    killed = threading.Event()

    def kill() -> None:  # the whole group: torch.compile's workers and XLA's threads too
        killed.set()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(max(timeout, 0.0), kill)
    timer.start()
    try:
        for line in process.stdout:
            line = line.rstrip("\n")
            if "\r" in line:  # progress bars redraw with carriage returns: keep the last state
                line = line.rsplit("\r", 1)[-1]
            output.append(line)
            log(f"  | {line}")
        process.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - start
    if process.returncode == 0:
        status = "ok"
    elif killed.is_set():
        status = f"killed at its time limit ({timeout:.0f} s)"
    else:
        status = f"failed (exit {process.returncode})"
    return status, seconds, "\n".join(output)


def run(parts: list[Part], budget_s: float, out: pathlib.Path, python: str, started_at: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "acceptance.log")
    elapsed = lambda: time.time() - started_at
    lines, _ = plan_lines(parts, budget_s, elapsed())
    for line in lines:
        log(line)
    ctx = Context(out=out, python=python, scratch=pathlib.Path(tempfile.mkdtemp(prefix="sda-acceptance-")))
    failures = 0
    for part in parts:
        left = budget_s - RESERVE_S - elapsed()
        record = ctx.figures.setdefault(part.name, {})
        if part.estimate_s > left:
            record["status"] = f"skipped: needs ~{part.estimate_s:.0f} s, {max(left, 0):.0f} s left"
            log(f"== {part.name}: {record['status']}")
            _write_figures(ctx)
            continue
        log(f"== {part.name} (est. {part.estimate_s:.0f} s, bound {part.bound_s:.0f} s, {left:.0f} s left): {part.what}")
        part_start, statuses = time.perf_counter(), []
        for command in part.commands(ctx):
            timeout = min(part.bound_s - (time.perf_counter() - part_start), budget_s - RESERVE_S - elapsed())
            if timeout <= 0:
                statuses.append(f"{command.label}: not started, no time left")
                log(f"-- {statuses[-1]}")
                continue
            log(f"-- {command.label}: {' '.join(command.argv[1:] if command.argv[0] == python else command.argv)}")
            status, seconds, output = run_command(command, timeout, log)
            if command.figures is not None:
                try:
                    record.update(command.figures(ctx, output, seconds))
                except (OSError, ValueError, KeyError) as err:  # a part's output is not what we expect
                    record[f"{command.label}_figures_error"] = repr(err)
            statuses.append(f"{command.label}: {status} in {seconds:.1f} s")
            log(f"-- {statuses[-1]}")
            failures += status != "ok"
            _write_figures(ctx)
        record["status"] = "; ".join(statuses) or "nothing to run"
        record["seconds"] = round(time.perf_counter() - part_start, 1)
        log(f"== {part.name}: {record['status']} ({record['seconds']:.1f} s)")
        _write_figures(ctx)
    log(f"done in {elapsed():.0f} s of {budget_s:.0f}; figures in {out / 'figures.json'}")
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    return 1 if failures else 0


def _write_figures(ctx: Context) -> None:
    tmp = ctx.out / ".figures.json.tmp"
    tmp.write_text(json.dumps(ctx.figures, indent=2, default=str) + "\n")
    os.replace(tmp, ctx.out / "figures.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"some of: {', '.join(p.name for p in PARTS)} (default: all)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall seconds for the whole call")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimates; run nothing")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-acceptance", help="where figures go (default: $OUT)")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in {part.name for part in PARTS}]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(p.name for p in PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = float(os.environ.get("SDA_ACCEPTANCE_STARTED_AT") or time.time())  # the wrapper's start
    parts = [p for p in PARTS if not args.parts or p.name in args.parts]
    if args.dry_run:
        lines, _ = plan_lines(parts, args.budget_s, time.time() - started_at)
        print("\n".join(["dry run: nothing runs, no GPU is touched", *lines]))
        return 0
    return run(parts, args.budget_s, pathlib.Path(args.out), sys.executable, started_at)


if __name__ == "__main__":
    sys.exit(main())
