"""The seed notebook's SDA recipe in PyTorch, on `transformers.BertForSequenceClassification`.

A faithful, self-contained re-statement of `../shared/reference/seed_notebook_afqmc_sda_pytorch.txt`
(transformers 4.0.1, torch 1.6), for parity tests against sda-jax and for benchmarks:

* the optimizer of `tests/torch_optim.py`: transformers 4.0.1's `AdamW(groups, lr,
  correct_bias=False, eps=1e-8)` with two groups (no decay on names containing `bias` or
  `LayerNorm.weight`), `Lookahead(optimizer, k=5, alpha=1)`, `WarmupLinearSchedule`;
* SDA: the teacher is a deep copy of the student in eval mode, moved after every step by
  `s.sub_((1 - decay) * (s - p))` with decay min(0.995, (1 + t) / (10 + t)); the loss is
  CE + kd_coeff · MSELoss(student logits, teacher logits);
* the evaluation EMA (decay 0.999) is a copy of the student at `eval_ema_start_step` and is updated
  after every later step, as sda_jax does (see `sda_jax.step.sda.EvalEma`).

It consumes the batches of `sda_jax.data.input_pipeline` (dicts of numpy arrays with a `weights` row
mask): padding rows (weight 0) are sliced off, so partial batches give sda_jax's weighted means.

Benchmark switches (the seed is precision fp16, ema_impl loop, optimizer_impl loop, no compile):

* `precision`: fp32 | fp16 (autocast + GradScaler, the seed) | bf16 (autocast);
* `ema_impl`: loop (the seed's Python loops) | foreach (the same arithmetic as `torch._foreach_*`
  ops, bit-identical) | lerp (`torch._foreach_lerp_`: the same averages, rounded differently, see
  `lerp_averages`);
* `optimizer_impl`: loop (`AdamW` + `Lookahead` above) | foreach (`ForeachAdamW` +
  `ForeachLookahead`: the same maths as multi-tensor ops, one kernel per op for a whole group);
* `compile`: `torch.compile(dynamic=False)` of the step's forward (student forward, teacher forward,
  losses; AOTAutograd compiles the student's backward with it), one graph per batch shape, and, with
  the foreach optimizer and lerp averages, of the optimizer update and the averages' updates;
  `compile_mode` auto is "reduce-overhead" (CUDA graphs) on CUDA and inductor's default on CPU.

From the repository root:

    python -m reference.torch_reference --steps 30 --precision fp16 --ema-impl foreach \\
        --override num_hidden_layers=2 --override hidden_size=128   # a from-scratch mini BERT
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from reference.torch_optim import (
    AdamW,
    ForeachAdamW,
    ForeachLookahead,
    Lookahead,
    WarmupLinearSchedule,
    lerp_averages,
)
from sda_jax.config import Settings

PRECISIONS = ("fp32", "fp16", "bf16")
EMA_IMPLS = ("loop", "foreach", "lerp")
OPTIMIZER_IMPLS = ("loop", "foreach")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
NO_DECAY = ("bias", "LayerNorm.weight")


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """The notebook's hyper-parameters under sda-jax's names (`from_settings` takes them from a run's
    settings, whose defaults are the seed's), and how the PyTorch step runs."""

    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    adam_eps: float
    lookahead_k: int | None  # None: no Lookahead
    lookahead_alpha: float
    teacher_decay: float
    kd_coeff: float
    eval_ema_decay: float
    eval_ema_start_step: int
    precision: str = "fp32"  # fp32 | fp16 (autocast + GradScaler) | bf16 (autocast)
    ema_impl: str = "loop"  # loop | foreach | lerp: teacher and eval-EMA updates
    optimizer_impl: str = "loop"  # loop | foreach: AdamW + Lookahead
    compile: bool = False  # torch.compile the forward (+ backward), and the foreach/lerp updates
    compile_mode: str = "auto"  # torch.compile mode; auto: reduce-overhead on CUDA, default elsewhere

    @classmethod
    def from_settings(cls, settings: Settings, **changes) -> RecipeConfig:
        """The recipe of `settings` (optim.*, sda.*), with `changes` to any field."""
        optim, sda = settings.optim, settings.sda
        recipe = dict(
            learning_rate=optim.learning_rate, warmup_ratio=optim.warmup_ratio, weight_decay=optim.weight_decay,
            adam_eps=optim.adam_eps, lookahead_k=optim.lookahead_k, lookahead_alpha=optim.lookahead_alpha,
            teacher_decay=sda.teacher_decay, kd_coeff=sda.kd_coeff, eval_ema_decay=sda.eval_ema_decay,
            eval_ema_start_step=sda.eval_ema_start_step,
        )  # fmt: skip
        return cls(**{**recipe, **changes})

    def __post_init__(self):
        for name, allowed in (("precision", PRECISIONS), ("ema_impl", EMA_IMPLS),
                              ("optimizer_impl", OPTIMIZER_IMPLS), ("compile_mode", COMPILE_MODES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {allowed}")


def build_optimizer(model: torch.nn.Module, total_steps: int, config: RecipeConfig, compile_mode: str | None = None):
    """The notebook's AdamW (two groups) wrapped in Lookahead, and its warmup-linear schedule.

    With `optimizer_impl` foreach: `ForeachAdamW` (its update compiled with `compile_mode`, unless
    None) in `ForeachLookahead`.
    """
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not any(nd in n for nd in NO_DECAY)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if any(nd in n for nd in NO_DECAY)], "weight_decay": 0.0},
    ]
    if config.optimizer_impl == "foreach":
        optimizer = ForeachAdamW(
            groups, lr=config.learning_rate, correct_bias=False, eps=config.adam_eps, compile_mode=compile_mode
        )
        lookahead = ForeachLookahead
    else:
        optimizer = AdamW(groups, lr=config.learning_rate, correct_bias=False, eps=config.adam_eps)
        lookahead = Lookahead
    if config.lookahead_k:
        optimizer = lookahead(optimizer, config.lookahead_k, config.lookahead_alpha)
    schedule = WarmupLinearSchedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    return optimizer, schedule


def torch_batch(
    batch: dict[str, np.ndarray], device: torch.device, non_blocking: bool = False
) -> dict[str, torch.Tensor]:
    """An sda_jax.data.input_pipeline batch as torch tensors, without its padding (weight-0) rows.

    `non_blocking` (CUDA): copied from pinned host memory without waiting for the device.
    """
    real = np.asarray(batch["weights"]) > 0
    keep = slice(None) if real.all() else real
    names = ("input_ids", "token_type_ids", "attention_mask", "labels")
    arrays = {n: torch.from_numpy(np.asarray(batch[n])[keep]) for n in names}
    if non_blocking and device.type == "cuda":
        return {n: a.pin_memory().to(device, non_blocking=True).long() for n, a in arrays.items()}
    return {n: a.to(device=device, dtype=torch.long) for n, a in arrays.items()}


class SdaTrainer:
    """One SDA train step at a time, exactly as the notebook's loop body (minus its dev evaluation).

    `student` is the model being trained (in train mode), `teacher` its EMA copy (eval mode),
    `eval_ema_params()` the evaluation EMA's tensors (the student's before its start step).

    With `config.compile`: `_losses` (both forward passes and the loss; its backward comes with it
    through AOTAutograd) is `torch.compile(dynamic=False)`d, so every batch shape gets its own static
    graph, and so are `ForeachAdamW`'s update and, with ema_impl lerp, `lerp_averages` (lr and
    averaging weights as 0-dim device tensors). Under CUDA graphs (reduce-overhead, max-autotune)
    each step starts with `torch.compiler.cudagraph_mark_step_begin()`, the averages are marked as
    static addresses, and no output of a graphed function is kept past its step (the metrics are
    copied out at once); the Lookahead sync (every k updates) and the GradScaler run eagerly.
    """

    def __init__(self, model: transformers.BertForSequenceClassification, total_steps: int, config: RecipeConfig):
        self.config = config
        self.student = model.train()
        self.device = next(model.parameters()).device
        self.compile_mode = None
        if config.compile:
            on_cuda = self.device.type == "cuda"
            self.compile_mode = config.compile_mode if config.compile_mode != "auto" else (
                "reduce-overhead" if on_cuda else "default"
            )  # fmt: skip
            # One graph per batch shape (bucket length): more than dynamo's default 8 may be needed.
            dynamo = torch._dynamo.config
            limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.6
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
        self.cuda_graphs = self.compile_mode in CUDA_GRAPH_MODES and self.device.type == "cuda"
        self.optimizer, self.schedule = build_optimizer(model, total_steps, config, self.compile_mode)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.global_step = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._teacher_params = list(self.teacher.parameters())
        self._eval_ema: list[torch.Tensor] | None = None
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.precision)
        compile_fn = lambda fn: torch.compile(fn, dynamic=False, mode=self.compile_mode)
        self._losses_fn = compile_fn(self._losses) if config.compile else self._losses
        self._lerp_fn = lerp_averages
        if config.ema_impl == "lerp" and config.compile:
            self._lerp_fn = compile_fn(lerp_averages)
            self._teacher_weight = self._static(torch.zeros((), device=self.device))
            self._eval_ema_weight = self._static(torch.full((), 1.0 - config.eval_ema_decay, device=self.device))
            # Plain-tensor aliases of the teacher's parameters: the eval EMA's tensors are plain too,
            # so both averages share one graph.
            self._teacher_params = [self._static(p.detach()) for p in self._teacher_params]

    def _static(self, tensor: torch.Tensor) -> torch.Tensor:
        torch._dynamo.mark_static_address(tensor)
        return tensor

    def _losses(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        """The notebook's forward: the student's logits, the teacher's (no grad), CE + kd_coeff · MSE."""
        dtype = self._autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.student(**inputs).logits
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits
            ce = F.cross_entropy(logits, labels)
            kd = F.mse_loss(logits, teacher_logits)
            loss = ce + self.config.kd_coeff * kd
        return loss, ce, kd

    def step(self, batch: dict[str, np.ndarray], sync: bool = True) -> dict:
        """Trains on one sda_jax batch; returns the loss, CE and KD terms (as the notebook logs them).

        sync=False: the host never waits for the device: the batch is copied from pinned memory
        without blocking, and the terms come back as 0-dim device tensors (copies, which later
        steps leave alone), not floats.
        """
        inputs = torch_batch(batch, self.device, non_blocking=not sync)
        labels = inputs.pop("labels")
        if self.cuda_graphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        loss, ce, kd = self._losses_fn(inputs, labels)
        if not sync:
            terms = torch.stack([loss, ce, kd]).detach()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad()
        self.global_step += 1
        self._update_averages()
        if not sync:
            return dict(zip(("loss", "ce", "kd"), terms.unbind()))
        return {"loss": loss.item(), "ce": ce.item(), "kd": kd.item()}

    @torch.no_grad()
    def _update_averages(self) -> None:
        t, c = self.global_step, self.config
        one_minus_decay = 1.0 - min(c.teacher_decay, (1 + t) / (10 + t))
        compiled_lerp = c.ema_impl == "lerp" and c.compile
        if c.ema_impl == "loop":  # the notebook's code
            for s_param, param in zip(self._teacher_params, self._params):
                s_param.sub_(one_minus_decay * (s_param - param))
        elif c.ema_impl == "foreach":  # the same arithmetic, one kernel per op for all tensors
            diff = torch._foreach_sub(self._teacher_params, self._params)
            torch._foreach_mul_(diff, one_minus_decay)
            torch._foreach_sub_(self._teacher_params, diff)
        elif compiled_lerp:
            self._teacher_weight.fill_(one_minus_decay)
            self._lerp_fn(self._teacher_params, self._params, self._teacher_weight)
        else:
            self._lerp_fn(self._teacher_params, self._params, one_minus_decay)
        if t == c.eval_ema_start_step:  # the notebook's EMA(model, 0.999) registers a copy
            self._eval_ema = [p.detach().clone() for p in self._params]
            if compiled_lerp:
                for e in self._eval_ema:
                    self._static(e)
        elif t > c.eval_ema_start_step:
            d = c.eval_ema_decay
            if c.ema_impl == "loop":  # the notebook's EMA.update
                for i, param in enumerate(self._params):
                    self._eval_ema[i] = ((1.0 - d) * param + d * self._eval_ema[i]).clone()
            elif c.ema_impl == "foreach":
                torch._foreach_mul_(self._eval_ema, d)
                torch._foreach_add_(self._eval_ema, torch._foreach_mul(self._params, 1.0 - d))
            else:
                self._lerp_fn(self._eval_ema, self._params, self._eval_ema_weight if compiled_lerp else 1.0 - d)

    def eval_ema_params(self) -> dict[str, torch.Tensor]:
        """The evaluation EMA by parameter name (the student itself before the start step)."""
        names = [n for n, p in self.student.named_parameters() if p.requires_grad]
        tensors = self._params if self._eval_ema is None else self._eval_ema
        return {n: t.detach() for n, t in zip(names, tensors)}


def _cli() -> None:
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import default
    from sda_jax.data import input_pipeline, splits, tokenization

    defaults = default.get_config()
    parser = argparse.ArgumentParser(description="Time the PyTorch SDA reference on AFQMC batches.")
    parser.add_argument("--model-dir", default=defaults.model.dir, help="HF folder; random init when it has no weights")
    parser.add_argument("--train-file", default=defaults.data.train_file)
    parser.add_argument("--override", action="append", default=[], metavar="KEY=INT", help="HF config field")
    parser.add_argument("--batch-size", type=int, default=defaults.train.batch_size)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument(
        "--warmup-steps", type=int, default=5, help="untimed steps before (at least one per bucket length)"
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--ema-impl", choices=EMA_IMPLS, default="loop")
    parser.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default="loop")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model_dir = pathlib.Path(args.model_dir)
    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.override)}
    hf_config = transformers.BertConfig.from_pretrained(
        model_dir, num_labels=len(defaults.data.label_names), attn_implementation="eager", **overrides
    )
    has_weights = not overrides and any((model_dir / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    cls = transformers.BertForSequenceClassification
    model = cls.from_pretrained(model_dir, config=hf_config) if has_weights else cls(hf_config)
    model.to(args.device)

    defaults.data.train_file = args.train_file
    data = Settings.from_config(defaults).data
    encoded = splits.read_split(data, "train", tokenization.load_tokenizer(model_dir))
    timed = list(
        itertools.islice(
            input_pipeline.train_batches(
                encoded, batch_size=args.batch_size, bucket_multiplier=data.bucket_multiplier,
                bucket_lengths=input_pipeline.fit_bucket_lengths(encoded.lengths, data.num_buckets or 8, data.max_seq_len),
                seed=args.seed,
            ),
            args.steps,
        )
    )  # fmt: skip
    # Untimed: one step per bucket length the timed steps use (torch.compile specialises on it), then more.
    first_of_each_length = list({b["input_ids"].shape[1]: b for b in reversed(timed)}.values())
    warmup = first_of_each_length + timed[: max(0, args.warmup_steps - len(first_of_each_length))]
    if args.compile:  # CUDA graph trees warm a graph up on its first call and record it on the second
        warmup = first_of_each_length + warmup
    config = RecipeConfig.from_settings(
        Settings.from_config(defaults),
        eval_ema_start_step=len(warmup),  # timed steps run in the steady state: both EMAs on
        precision=args.precision, ema_impl=args.ema_impl, optimizer_impl=args.optimizer_impl, compile=args.compile,
        compile_mode=args.compile_mode,
    )  # fmt: skip
    trainer = SdaTrainer(model, len(warmup) + len(timed), config)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for batch in warmup:
        trainer.step(batch)
    sync()
    start = time.perf_counter()
    losses = [trainer.step(batch)["loss"] for batch in timed]
    sync()
    seconds = time.perf_counter() - start
    samples = sum(int(b["weights"].sum()) for b in timed)
    report = {
        "device": args.device, "precision": args.precision, "ema_impl": args.ema_impl,
        "optimizer_impl": args.optimizer_impl, "compile": args.compile, "compile_mode": trainer.compile_mode,
        "batch_size": args.batch_size, "steps": args.steps, "seconds": seconds, "samples_per_second": samples / seconds,
        "final_loss": losses[-1] if losses else None, "pretrained": has_weights,
    }  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    _cli()
