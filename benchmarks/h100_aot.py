"""Deviceless H100 report: sda-jax's train and eval programs compiled for an NVIDIA H100, on a CPU machine.

    python -m venv .venv-aot && . .venv-aot/bin/activate && pip install -e . \\
        "jax-cuda13-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)')" \\
        "jax-cuda13-pjrt==$(python -c 'import jaxlib; print(jaxlib.__version__)')"
    python -m benchmarks.h100_aot                         # BERT-base bf16, configs/afqmc.py's programs
    python -m benchmarks.h100_aot --lengths 32,64 --programs train --no-append

Nothing runs: XLA:GPU compiles for the H100 described in ../shared/tools/h100-aot/h100_sxm.txtpb
(or --target) against a deviceless topology. Per program (train step and eval step per bucket
length): trace, lower and compile seconds (wall, and CPU seconds of this process), kernels in
the optimized program (per step: loop bodies times their trip count) by kind, bytes moved (every
kernel reading its operands and writing its result: an upper bound on HBM traffic), temporary and
argument memory, model FLOPs, a roofline step-time estimate (compute at 790 TFLOP/s bf16, HBM at
3.0 TB/s, 1 µs per kernel launch: max(compute, memory) + launches) and the reductions XLA carries
out in 16 bits. The table is appended to benchmarks/RESULTS.md.

Keep the plugin out of the project's own virtualenv and CI: with it installed, every JAX process
on a machine without a GPU tries CUDA first. Without a GPU XLA cannot autotune GEMMs or fusions,
so a real GPU's compile adds the autotuning and may choose other kernels; the compile times here
are those of this machine's CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import pathlib
import resource
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugin must not try to open a GPU (see the tool's README)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from benchmarks import hlo_stats
from configs import afqmc as recipe_config
from sda_jax import kernels
from sda_jax.config import Settings
from sda_jax.data import bucketing, splits, tokenization
from sda_jax.evaluation import evaluate
from sda_jax.models.bert import BertForSequenceClassification, flops_per_token, init_params
from sda_jax.models.config import BertConfig
from sda_jax.parallel import distributed
from sda_jax.step import sda, train_step
from sda_jax.step.model_axis import Models

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
TARGET = pathlib.Path(__file__).resolve().parents[2] / "shared" / "tools" / "h100-aot" / "h100_sxm.txtpb"
PEAK_FLOPS = 790e12  # bf16 dense, as measured on the lent H100/H200 (8192^3 products)
HBM_BYTES_PER_S = 3.0e12  # device-to-device copy, read + written, as measured on the lent H100
LAUNCH_S = 1e-6  # per kernel
MODELS = {
    "base": {},
    "small": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024},
}


def h100_mesh(target: pathlib.Path) -> Mesh:
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc("", "cuda", target_config=target.read_text(), topology="1x1x1")
    except Exception as err:  # noqa: BLE001 (any failure here means the plugin is missing or mismatched)
        sys.exit(
            f"error: cannot compile for a GPU here ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "install jax-cuda13-plugin and jax-cuda13-pjrt of jaxlib's version (see this module's docstring)"
        )
    return Mesh(np.array(topology.devices).reshape(1, -1), (distributed.MODELS_AXIS, distributed.DATA_AXIS))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def compile_and_measure(jitted, args, mesh: Mesh | None = None) -> tuple[dict, object]:
    """Trace, lower and compile with wall and CPU seconds per stage; returns (row, compiled).

    With `mesh` (the H100 topology's), tracing and lowering see it as the abstract mesh, which
    names the GPU the Pallas kernels' Triton lowering compiles for (from JAX 0.11 it asks for
    the local GPU otherwise, and this machine has none)."""
    row = {}
    use_abstract_mesh = getattr(jax.sharding, "use_abstract_mesh", None)
    context = use_abstract_mesh(mesh.abstract_mesh) if mesh is not None and use_abstract_mesh else contextlib.nullcontext()
    wall, cpu = time.perf_counter(), _cpu_seconds()
    with context:
        traced = jitted.trace(*args)
        row["trace_s"], wall, cpu = time.perf_counter() - wall, time.perf_counter(), _cpu_seconds()
        lowered = traced.lower()
    row["lower_s"], wall, cpu = time.perf_counter() - wall, time.perf_counter(), _cpu_seconds()
    compiled = lowered.compile()
    row["compile_s"], row["compile_cpu_s"] = time.perf_counter() - wall, _cpu_seconds() - cpu
    memory = compiled.memory_analysis()
    row["temp_bytes"] = memory.temp_size_in_bytes
    row["argument_bytes"] = memory.argument_size_in_bytes
    return row, compiled


def step_flops(config: BertConfig, batch_size: int, length: int, program: str) -> float:
    """Model FLOPs of one step on a full batch of `length` tokens: the student's forward and backward
    (6 per weight per token) and the teacher's forward (2) for train; 2 per set for eval."""
    forward_backward = batch_size * length * flops_per_token(config, length)
    return forward_backward * (8 / 6) if program == "train" else forward_backward * (2 / 6)


def report_rows(
    settings: Settings, config: BertConfig, lengths, programs_to_compile, mesh, batch_size, eval_sets, verbose=False, seeds=1,
    forms="xla",
) -> list[dict]:
    scan = settings.model.scan_layers
    chosen = kernels.choose(forms, jnp.bfloat16, "gpu", config, max(lengths))
    model = BertForSequenceClassification(config=config, dtype=jnp.bfloat16, scan_layers=scan, forms=chosen)
    models = Models.of_seeds(tuple(range(seeds)))  # the model axis of a sweep over this many seeds
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0), scan))
    state = train_step.abstract_train_state(models.shapes(params), settings, 537, model.dtype, mesh, models, chosen.weight_copies)
    rng = models.abstract(models.shapes(jax.ShapeDtypeStruct((), jax.random.key(0).dtype)), mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    programs = evaluate.EvalPrograms(model, mesh, models, tuple(lengths), batch_size, None)
    # The sets as evaluation passes them: in 16 bits, their weight matrices cast once per evaluation.
    sets = programs.cast(models.abstract(tuple(sda.Current(models.shapes(params)) for _ in range(eval_sets)), mesh))
    eval_sets *= seeds
    rows = []
    for length in lengths:
        batch = distributed.abstract_batch(batch_size, length, mesh)
        for program in programs_to_compile:
            if program == "train":
                jitted, args = train_step.jit_train_step(model, settings, mesh, state_sharding, models), (state, batch, rng)
            else:
                jitted, args = programs.eval_fn.jitted, (sets, batch)
            print(f"compiling {program} at length {length} ...", flush=True)
            row, compiled = compile_and_measure(jitted, args, mesh)
            stats = hlo_stats.program_stats(compiled.as_text())
            flops = step_flops(config, batch_size, length, program) * (eval_sets if program == "eval" else seeds)
            compute_s, memory_s, launch_s = flops / PEAK_FLOPS, stats.bytes_moved / HBM_BYTES_PER_S, stats.kernels * LAUNCH_S
            row.update(
                program=program, length=length, kernels=stats.kernels, kinds=stats.kernels_by_kind,
                bytes_moved=stats.bytes_moved, flops=flops, compute_ms=1e3 * compute_s, memory_ms=1e3 * memory_s,
                launch_ms=1e3 * launch_s, estimate_ms=1e3 * (max(compute_s, memory_s) + launch_s),
                sixteen_bit_reductions=stats.sixteen_bit_reductions,
            )  # fmt: skip
            rows.append(row)
            print(format_row(row), flush=True)
            if verbose:
                for op_name, moved in stats.top_kernels:
                    print(f"    {moved / 1e9:7.3f} GB  {op_name}")
    return rows


def format_row(r: dict) -> str:
    gemms = r["kinds"].get("gemm", 0)
    copies = r["kinds"].get("copy", 0)
    reductions = len(r["sixteen_bit_reductions"])
    return (
        f"| {r['program']} | {r['length']} | {r['trace_s'] + r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['compile_cpu_s']:.1f} | "
        f"{r['kernels']} ({gemms} GEMM, {copies} copy) | {r['flops'] / 1e12:.3f} | {r['bytes_moved'] / 1e9:.2f} | "
        f"{r['temp_bytes'] / 2**30:.2f} / {r['argument_bytes'] / 2**30:.2f} | "
        f"{r['compute_ms']:.2f} / {r['memory_ms']:.2f} / {r['launch_ms']:.2f} | **{r['estimate_ms']:.2f}** | {reductions} |"
    )


HEADER = (
    "| program | length | trace+lower s | compile s (wall) | compile CPU-s | kernels per step | TFLOP | GB moved | "
    "temp / args GiB | compute / HBM / launch ms | estimate ms | 16-bit reductions |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="base")
    parser.add_argument("--lengths", default=None, help="e.g. 32,64 (default: what bucket_policy picks for a GPU)")
    parser.add_argument("--programs", default="train,eval", help="train, eval or both")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-sets", type=int, default=3, help="parameter sets an evaluation scores in one pass")
    parser.add_argument("--target", type=pathlib.Path, default=TARGET, help="the GPU target description (.txtpb)")
    parser.add_argument("--label", default="", help="a note for the table's heading (what this build is)")
    parser.add_argument("--unrolled", action="store_true", help="model.scan_layers=False: the encoder layers unrolled")
    parser.add_argument("--seeds", type=int, default=1, help="sweep.seed of this many: N models in one program")
    parser.add_argument("--kernels", choices=("reference", "xla", "pallas"), default="xla",
                        help="model.kernels: the recipe's plain ops, XLA's 16-bit forms (auto's choice on a GPU) or the Pallas kernels")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="also list the kernels that move the most bytes")
    args = parser.parse_args()

    mesh = h100_mesh(args.target)
    config_dict = recipe_config.get_config()  # the reference recipe: its eval EMA starts after one epoch
    config_dict.model.scan_layers = not args.unrolled
    settings = Settings.from_config(config_dict)
    config = BertConfig.from_json_file(settings.model.dir / "config.json", num_labels=2, **MODELS[args.model])
    if args.lengths:
        lengths = [int(n) for n in args.lengths.split(",")]
    else:
        encoded = splits.read_split(settings.data, "train", tokenization.load_tokenizer(settings.model.dir))
        choice = bucketing.choose(settings.data, encoded.lengths, flops_per_token(config, settings.data.max_seq_len), "gpu", 1.0)
        print(choice.note)
        lengths = list(choice.lengths)
    programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    start_wall, start_cpu = time.perf_counter(), _cpu_seconds()
    rows = report_rows(
        settings, config, lengths, programs, mesh, args.batch_size, args.eval_sets, args.verbose, args.seeds,
        forms=args.kernels,
    )  # fmt: skip
    total_wall, total_cpu = time.perf_counter() - start_wall, _cpu_seconds() - start_cpu
    reductions = hlo_stats.reduction_summary([name for r in rows for name in r["sixteen_bit_reductions"]])
    title = (
        f"## {datetime.date.today().isoformat()}: deviceless H100 compile{f' ({args.label})' if args.label else ''}, "
        f"model {args.model} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{'unrolled' if args.unrolled else 'scanned'}, {args.kernels} kernels), bf16, batch {args.batch_size}"
        f"{f', {args.seeds} seeds in one program' if args.seeds > 1 else ''}"
    )
    body = "\n".join(format_row(r) for r in rows)
    footer = (
        f"\nCommand: `python -m benchmarks.h100_aot {' '.join(sys.argv[1:])}` (jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs). {len(rows)} programs compiled one after another in {total_wall:.0f} s wall / "
        f"{total_cpu:.0f} CPU-s. Estimates are deviceless (no GPU ran): max(FLOPs / 790 TFLOP/s, bytes / 3.0 TB/s) "
        "+ 1 µs per kernel; eval programs score "
        f"{args.eval_sets} parameter sets. 16-bit reductions (all programs): {reductions}.\n"
    )
    text = f"\n{title}\n\n{HEADER}\n{body}\n{footer}"
    print(text)
    if not args.no_append:
        with RESULTS.open("a", encoding="utf-8") as results:
            results.write(text)


if __name__ == "__main__":
    main()
