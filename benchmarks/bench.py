"""Speed of sda-jax's train step against the PyTorch seed recipe, on the same device and batches.

    python -m benchmarks.bench                      # CPU: 4 layers / hidden 256, batch 64, 20 steps
    python -m benchmarks.bench --model base         # GPU: BERT-base, bf16
    python -m benchmarks.bench --quick              # CI-sized: a few steps of a tiny model

Forms, all on the same AFQMC batches (the host bucket sampler, seed 2021):

* `sda-jax`: our jitted, donated train step (bf16 on GPU, fp32 on CPU), one program per bucket;
* `torch seed`: the notebook as written: fp16 autocast + GradScaler (on CUDA; the notebook's CUDA
  autocast does nothing on CPU, so fp32 there), teacher/eval EMA as Python loops over parameters,
  batches padded to their own longest row (the notebook's Collator);
* `torch eager`: the best eager form: bf16 autocast (fp32 on CPU); the seed's AdamW (no bias
  correction, two groups) and Lookahead as multi-tensor `torch._foreach_*` ops (`ForeachAdamW`,
  `ForeachLookahead`: bit-identical to the seed's loops on CPU); teacher and eval EMA by
  `torch._foreach_lerp_`; inputs copied from pinned memory without blocking and the loss kept on the
  device, so the host never waits for the GPU within the timed steps (the seed reads the loss every
  step, as the notebook does);
* `torch compile`: the eager form with `torch.compile(dynamic=False)`: one static graph per bucket
  length for the forward (student and teacher forward passes and the loss, the student's backward
  compiled with it), plus one for the AdamW update (lr as a device tensor: no recompiles as it
  changes) and one for the averages' lerp; `mode="reduce-overhead"` (CUDA graphs, each step opened
  by `torch.compiler.cudagraph_mark_step_begin()`) on CUDA, inductor's default mode on CPU. Its
  warm-up runs each bucket length twice (CUDA graph trees record a graph on its second call). Its
  compilations count every graph (per bucket: forward; once: optimizer, averages).

sda-jax compiles through the runs' persistent compilation cache (and, on a GPU, XLA's autotuning
cache beside it), as training does; `--cold` compiles into an empty one.

Every form is built and compiled (warmed up on each bucket shape) first; then the forms take turns
over `--rounds` slices of the timed batches, so that drift in the machine's speed falls on all of
them alike. Each prints samples/s, non-padding tokens/s, ms/step, the ratio to the seed form, peak device
memory, compilations and compile time, and model FLOPs utilisation (real tokens only, so padding
counts as waste; needs the device's peak, known for H100/H200/A100 or given by --peak-tflops). The
table is appended to benchmarks/RESULTS.md with the device and date. Also measured: read +
tokenize + bucket of the AFQMC train set on one core, and how long the train loop waits for the
host per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from configs import default as default_config
from sda_jax import commands as sda_main
from sda_jax import kernels
from sda_jax.config import Settings
from sda_jax.data import bucketing, input_pipeline, splits, tokenization
from sda_jax.errors import InputError, exit_with_error
from sda_jax.models.bert import BertForSequenceClassification, flops_per_token, init_params
from sda_jax.models.config import BertConfig
from sda_jax.parallel import distributed
from sda_jax.step import precision
from sda_jax.step.model_axis import Models
from sda_jax.step.train_step import place_state_and_step

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks
MODELS = {
    "quick": {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128},
    "small": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024},
    "base": {},
}


def pipeline_seconds(settings: Settings) -> dict[str, float]:
    """Read + tokenize + bucket one epoch of the train set into `data.bucket_lengths` (run pinned
    to one core by the caller)."""
    tokenizer = tokenization.load_tokenizer(settings.model.dir)
    start = time.perf_counter()
    encoded = splits.read_split(settings.data, "train", tokenizer)
    batches = list(
        itertools.islice(
            input_pipeline.train_batches(
                encoded, batch_size=64, bucket_multiplier=settings.data.bucket_multiplier,
                bucket_lengths=settings.data.bucket_lengths, seed=settings.seed,
            ),
            input_pipeline.steps_per_epoch(len(encoded), 64),
        )
    )  # fmt: skip
    return {"seconds": time.perf_counter() - start, "examples": len(encoded), "batches": len(batches)}


def make_batches(settings: Settings, config: BertConfig, batch_size: int, count: int) -> tuple[list[dict[str, np.ndarray]], tuple[int, ...]]:
    """The first `count` train batches of the config's bucket sampler, and the bucket lengths a
    one-epoch run of this model on this platform would use (`bucket_policy`)."""
    encoded = splits.read_split(settings.data, "train", tokenization.load_tokenizer(settings.model.dir))
    lengths = bucketing.choose(settings.data, encoded.lengths, flops_per_token(config, settings.data.max_seq_len), jax.devices()[0].platform, 1.0).lengths
    stream = input_pipeline.train_batches(
        encoded, batch_size=batch_size, bucket_multiplier=settings.data.bucket_multiplier,
        bucket_lengths=lengths, seed=settings.seed,
    )  # fmt: skip
    return list(itertools.islice(stream, count)), lengths


def warmup_batches(pool, timed) -> list[dict[str, np.ndarray]]:
    """One batch of each padded length the timed batches use, so every form compiles beforehand."""
    needed = {b["input_ids"].shape[1] for b in timed}
    by_length = {}
    for batch in pool:
        by_length.setdefault(batch["input_ids"].shape[1], batch)
    return [by_length[length] for length in sorted(needed)]


def real_tokens(batches) -> int:
    return int(sum(b["attention_mask"].sum() for b in batches))


def model_flops(config: BertConfig, batches) -> float:
    """Model FLOPs of the SDA step on the real tokens: student forward+backward and teacher forward."""
    total = 0.0
    for batch in batches:
        lengths = batch["attention_mask"].sum(1)
        for length in lengths[lengths > 0]:
            total += int(length) * flops_per_token(config, int(length)) * 4 / 3
    return total


def parse_form(name: str) -> tuple[str, int, bool]:
    """A `--forms` entry as (kind, seeds, scan_layers): `jax` (layers scanned, the default),
    `jax-unrolled` (model.scan_layers=False), `jaxN` (N seeds in one program), `jax-pallas`
    (model.kernels=pallas: `sda_jax.kernels.fused_attention`'s and `sda_jax.kernels.fused_layer_norm`'s kernels; kind `jax-pallas`); `seed`, `eager`,
    `compile` (the PyTorch forms)."""
    if name in ("seed", "eager", "compile"):
        return name, 1, True
    if name == "jax-unrolled":
        return "jax", 1, False
    if name == "jax-pallas":
        return "jax-pallas", 1, True
    if name.startswith("jax") and (name[3:] == "" or (name[3:].isdigit() and int(name[3:]) >= 1)):
        return "jax", int(name[3:] or 1), True
    raise ValueError(f"unknown form {name!r}: jax, jax-unrolled, jax-pallas, jaxN, seed, eager or compile")


class JaxForm:
    """sda-jax's train step: compiled for every bucket shape up front, then timed on demand; with
    `seeds` > 1, the step of that many seeds trained side by side (`sweep.seed`)."""

    def __init__(
        self, settings: Settings, config: BertConfig, warmup, seeds: int = 1, scan: bool = True, pallas: bool = False
    ) -> None:
        platform = jax.devices()[0].platform
        dtype = precision.compute_dtype("auto", platform)
        forms = kernels.choose("pallas" if pallas else "auto", dtype, platform, config, settings.data.max_seq_len)
        model = BertForSequenceClassification(config=config, dtype=dtype, scan_layers=scan, forms=forms)
        models = Models.of_seeds(tuple(range(1, seeds + 1)))  # the model axis of a sweep over this many seeds
        self.mesh = distributed.make_mesh(models.count)
        # The eval EMA averages from step 1, so that the timed steps do all the recipe's work.
        settings = dataclasses.replace(settings, sda=dataclasses.replace(settings.sda, eval_ema_start_step=1))
        init_keys, dropout_keys = models.keys()
        params = models.stack([init_params(config, key, scan) for key in init_keys])
        self.state, self.step = place_state_and_step(params, model, settings, 10_000, self.mesh, models)
        self.rng = models.put(dropout_keys, self.mesh)
        self.dtype, self.host_wait, self.steps = np.dtype(dtype).name, 0.0, 0
        start = time.perf_counter()
        for _, batch in distributed.prefetch_to_mesh(iter(warmup), self.mesh):
            self.state, self.metrics = self.step(self.state, batch, self.rng)
        jax.block_until_ready(self.state)
        self.warmup_seconds = time.perf_counter() - start

    def time(self, batches) -> float:
        device_batches = distributed.prefetch_to_mesh(iter(batches), self.mesh)
        start = time.perf_counter()
        while True:
            waited = time.perf_counter()
            item = next(device_batches, None)
            self.host_wait += time.perf_counter() - waited
            if item is None:
                break
            self.state, self.metrics = self.step(self.state, item[1], self.rng)
        jax.block_until_ready(self.state)
        self.steps += len(batches)
        return time.perf_counter() - start

    def result(self) -> dict:
        stats = jax.devices()[0].memory_stats() or {}
        return {
            "peak_bytes": stats.get("peak_bytes_in_use"),
            "compilations": self.step.num_compilations,
            "compile_seconds": self.step.compile_seconds,
            "host_wait_ms_per_step": 1e3 * self.host_wait / self.steps,
            "dtype": self.dtype,
            "final_loss": float(np.mean(self.metrics["loss"])),
        }


class TorchForm:
    """The PyTorch recipe in one of its forms (seed, eager, compile), warmed up on every bucket shape."""

    def __init__(self, settings: Settings, config: BertConfig, warmup, form: str) -> None:
        import torch
        import transformers

        from reference.torch_reference import RecipeConfig, SdaTrainer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.on_gpu, self.form = device == "cuda", form
        self.precision = {"seed": "fp16", "eager": "bf16", "compile": "bf16"}[form] if self.on_gpu else "fp32"
        recipe = RecipeConfig.from_settings(
            settings, eval_ema_start_step=1, precision=self.precision, ema_impl="loop" if form == "seed" else "lerp",
            optimizer_impl="loop" if form == "seed" else "foreach", compile=form == "compile",
        )  # fmt: skip
        self.cuda = torch.cuda if self.on_gpu else None
        # All forms stay alive side by side, so torch's global peak would count the other forms'
        # models too: each form counts its own resident memory plus what its steps add on top.
        allocated_before = self.cuda.memory_allocated() if self.cuda else 0
        if self.cuda:
            self.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        hf_config = transformers.BertConfig(**config.to_hf_dict(settings.data.label_names), attn_implementation="sdpa")
        model = transformers.BertForSequenceClassification(hf_config).to(device)
        self.trainer = SdaTrainer(model, total_steps=10_000, config=recipe)
        self.sync = self.cuda.synchronize if self.cuda else (lambda: None)
        self.graphs_before = _dynamo_graphs()
        self.seconds, self.steps = 0.0, 0
        # CUDA graph trees warm a graph up on its first call and record it on the second: twice.
        warmup = warmup * 2 if form == "compile" else warmup
        start = time.perf_counter()
        for batch in self._inputs(warmup):
            self.trainer.step(batch, sync=form == "seed")
        self.sync()
        self.warmup_seconds, self.warmup_steps = time.perf_counter() - start, len(warmup)
        if self.cuda:
            self.resident_bytes = self.cuda.memory_allocated() - allocated_before
            self.peak_bytes = self.cuda.max_memory_allocated() - allocated_before

    def _inputs(self, batches):
        if self.form != "seed":
            return batches
        # The notebook's Collator pads each batch to its own longest row.
        trim = lambda b: {k: (v[:, : int(b["attention_mask"].sum(1).max())] if v.ndim == 2 else v) for k, v in b.items()}
        return [trim(b) for b in batches]

    def time(self, batches) -> float:
        batches = self._inputs(batches)
        if self.cuda:
            self.cuda.reset_peak_memory_stats()
            allocated_before = self.cuda.memory_allocated()
        start = time.perf_counter()
        for batch in batches:  # the fast forms return device tensors: no wait for the device per step
            self.metrics = self.trainer.step(batch, sync=self.form == "seed")
        self.sync()
        seconds = time.perf_counter() - start
        if self.cuda:
            added = self.cuda.max_memory_allocated() - allocated_before
            self.peak_bytes = max(self.peak_bytes, self.resident_bytes + added)
        self.seconds, self.steps = self.seconds + seconds, self.steps + len(batches)
        return seconds

    def result(self) -> dict:
        compiled = self.form == "compile"
        steady = self.seconds / self.steps
        return {
            "peak_bytes": self.peak_bytes if self.cuda else None,
            "compilations": _dynamo_graphs() - self.graphs_before if compiled else 0,
            # torch.compile compiles inside the first calls: their time beyond a steady step.
            "compile_seconds": max(0.0, self.warmup_seconds - self.warmup_steps * steady) if compiled else 0.0,
            "host_wait_ms_per_step": None,
            "dtype": self.precision,
            "final_loss": float(np.mean(self.metrics["loss"])),
        }


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def device_name() -> str:
    device = jax.devices()[0]
    return device.device_kind if device.platform != "cpu" else f"cpu ({os.cpu_count()} cores)"


def format_table(rows: list[dict], peak_tflops: float | None) -> str:
    seed = next((r for r in rows if r["form"] == "torch seed"), None)
    lines = [
        "| form | dtype | samples/s | non-pad tokens/s | ms/step | × seed | peak mem | compilations (s) | MFU | host wait ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{seed['seconds'] / r['seconds']:.2f}" if seed else "-"
        memory = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else "-"
        mfu = f"{100 * r['flops'] / r['seconds'] / (peak_tflops * 1e12):.1f}%" if peak_tflops else "-"
        wait = f"{r['host_wait_ms_per_step']:.2f}" if r["host_wait_ms_per_step"] is not None else "-"
        lines.append(
            f"| {r['form']} | {r['dtype']} | {r['samples'] / r['seconds']:.1f} | {r['tokens'] / r['seconds']:.0f} | "
            f"{1e3 * r['seconds'] / r['steps']:.1f} | {ratio} | {memory} | {r['compilations']} ({r['compile_seconds']:.1f}) | "
            f"{mfu} | {wait} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default: base on GPU, small on CPU")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per form")
    parser.add_argument(
        "--forms", default="jax,seed,eager,compile",
        help="comma list of jax, jax-unrolled (model.scan_layers=False), jaxN (N seeds in one program), seed, eager, compile",
    )
    parser.add_argument("--rounds", type=int, default=5, help="forms take turns over this many slices of the steps")
    parser.add_argument("--quick", action="store_true", help="CI-sized: tiny model, 4 steps, no append by default")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (known GPUs: automatic)")
    parser.add_argument("--no-append", action="store_true", help="print the table only")
    parser.add_argument("--bucket-lengths", default=None, help="e.g. 16,32,48,64 (default: what a run would use, bucket_policy)")
    parser.add_argument("--num-buckets", type=int, default=None, help="lengths to fit when --bucket-lengths is not given")
    parser.add_argument("--cold", action="store_true", help="compile into an empty cache (default: the runs' persistent cache)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--pipeline-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.form_specs = {f.strip(): parse_form(f.strip()) for f in args.forms.split(",") if f.strip()}
    except ValueError as err:
        parser.error(str(err))
    return args


def json_row(row: dict, peak_tflops: float | None, rows: list[dict]) -> dict:
    """One form's figures as numbers (what the table shows), for scripts."""
    seed = next((r for r in rows if r["form"] == "torch seed"), None)
    return {
        "form": row["form"], "dtype": row["dtype"], "ms_per_step": 1e3 * row["seconds"] / row["steps"],
        "samples_per_second": row["samples"] / row["seconds"], "x_seed": seed["seconds"] / row["seconds"] if seed else None,
        "mfu": row["flops"] / row["seconds"] / (peak_tflops * 1e12) if peak_tflops else None,
        "peak_bytes": row["peak_bytes"], "compilations": row["compilations"], "compile_seconds": row["compile_seconds"],
        "host_wait_ms_per_step": row["host_wait_ms_per_step"],
    }  # fmt: skip


def main() -> None:
    args = parse_args()
    # As training does: compiled programs (and a GPU's autotuning) come from the persistent cache.
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp() if args.cold else sda_main.compilation_cache_dir())
    # Read when JAX creates its GPU client (below, not at import): by default it would take 75% of
    # the GPU's memory up front and leave the PyTorch forms too little.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    config = default_config.get_config()
    if args.bucket_lengths:
        config.data.bucket_lengths = tuple(int(n) for n in args.bucket_lengths.split(","))
    if args.num_buckets:
        config.data.num_buckets = args.num_buckets
    try:
        settings = Settings.from_config(config)
    except InputError as err:  # e.g. --bucket-lengths not ending at data.max_seq_len
        exit_with_error(err)
    if args.pipeline_only:
        print(json.dumps(pipeline_seconds(settings)))
        return
    on_gpu = jax.devices()[0].platform == "gpu"
    model_name = "quick" if args.quick else args.model or ("base" if on_gpu else "small")
    steps = 4 if args.quick else args.steps
    bert = BertConfig.from_json_file(settings.model.dir / "config.json", **MODELS[model_name])
    batches, buckets = make_batches(settings, bert, args.batch_size, 64 + steps)
    # One core for the host pipeline, as the target says: a child pinned to CPU 0.
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-m", "benchmarks.bench", "--pipeline-only", f"--bucket-lengths={','.join(map(str, buckets))}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    pipeline = json.loads(pinned.stdout.strip().splitlines()[-1])

    timed = batches[64 : 64 + steps]
    warmup = warmup_batches(batches[:64], timed)
    names = {"seed": "torch seed", "eager": "torch eager", "compile": "torch compile"}
    forms = {}
    for form, (kind, seeds, scan) in args.form_specs.items():
        if kind in ("jax", "jax-pallas"):
            names[form] = "sda-jax" + ("" if scan else ", unrolled") + ("" if seeds == 1 else f", {seeds} seeds")
            names[form] += ", Pallas kernels" if kind == "jax-pallas" else ""
            forms[form] = JaxForm(settings, bert, warmup, seeds, scan, pallas=kind == "jax-pallas")
        else:
            forms[form] = TorchForm(settings, bert, warmup, form)
        print(f"{names[form]}: ready ({forms[form].warmup_seconds:.1f} s of warm-up)", flush=True)
    # Forms take turns, a slice of the timed batches each, so that drift in the machine's speed
    # (±20% over minutes on shared CPUs) falls on every form alike.
    rounds = max(1, min(args.rounds, len(timed)))
    seconds = dict.fromkeys(forms, 0.0)
    for r in range(rounds):
        for form, runner in forms.items():
            seconds[form] += runner.time(timed[r::rounds])
    rows = []
    for form, runner in forms.items():
        result = runner.result()
        result.update(form=names[form], seconds=seconds[form], steps=len(timed), samples=int(sum(b["weights"].sum() for b in timed)),
                      tokens=real_tokens(timed), flops=model_flops(bert, timed))  # fmt: skip
        rows.append(result)
        print(f"{names[form]}: {1e3 * result['seconds'] / len(timed):.1f} ms/step, final loss {result['final_loss']:.4f}", flush=True)
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    header = (
        f"## {datetime.date.today().isoformat()}: {device_name()}, model {model_name} "
        f"({bert.num_hidden_layers} layers, hidden {bert.hidden_size}), batch {args.batch_size}, {len(timed)} timed steps, "
        f"buckets {','.join(map(str, buckets))}\n\n"
        f"Command: `python -m benchmarks.bench {' '.join(sys.argv[1:])}`. Input pipeline (read + tokenize + bucket "
        f"{pipeline['examples']} train examples into {pipeline['batches']} batches, one core): "
        f"{pipeline['seconds']:.2f} s. Forms timed in {rounds} interleaved rounds.\n"
    )
    table = format_table(rows, peak)
    print("\n" + header + "\n" + table)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps([json_row(r, peak, rows) for r in rows], indent=2) + "\n")
    if not (args.no_append or args.quick):
        with RESULTS.open("a", encoding="utf-8") as results:
            results.write("\n" + header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
