"""The seed notebook's SDA recipe in PyTorch, on `transformers.BertForSequenceClassification`.

A faithful, self-contained re-statement of `../shared/reference/seed_notebook_afqmc_sda_pytorch.txt`
(transformers 4.0.1, torch 1.6), for parity tests against sda-jax and for benchmarks:

* `AdamW`: transformers 4.0.1's, used as `AdamW(groups, lr, correct_bias=False, eps=1e-8)`, with
  the weight decay applied to the already-updated parameter, and two groups (no decay on names
  containing `bias` or `LayerNorm.weight`);
* `Lookahead(optimizer, k=5, alpha=1)`: the common (lonePatient) wrapper — a counter per group,
  slow weights created at the first sync, syncs on updates 1, 1+k, 1+2k, ...;
* `WarmupLinearSchedule`: LambdaLR, step/warmup during warmup, then linear decay to 0 at t_total;
* SDA: the teacher is a deep copy of the student in eval mode, moved after every step by
  `s.sub_((1 - decay) * (s - p))` with decay min(0.995, (1 + t) / (10 + t)); the loss is
  CE + kd_coeff · MSELoss(student logits, teacher logits);
* the evaluation EMA (decay 0.999) is a copy of the student at `eval_ema_start_step` and is updated
  after every later step, as sda_jax does (see `sda_jax.distill.eval_ema_decay`).

It consumes the batches of `sda_jax.input_pipeline` (dicts of numpy arrays with a `weights` row
mask): padding rows (weight 0) are sliced off, so partial batches give sda_jax's weighted means.

Benchmark switches: `precision` fp32 | fp16 (autocast + GradScaler, the seed) | bf16 (autocast);
`ema_impl` loop (the seed's Python loop) | foreach (`torch._foreach_*`); `compile` (torch.compile
of the two forward passes). From the repository root:

    python -m benchmarks.torch_reference --steps 30 --precision fp16 --ema-impl foreach \\
        --override num_hidden_layers=2 --override hidden_size=128   # a from-scratch mini BERT
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import pathlib
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.optim.lr_scheduler import LambdaLR

PRECISIONS = ("fp32", "fp16", "bf16")
EMA_IMPLS = ("loop", "foreach")
NO_DECAY = ("bias", "LayerNorm.weight")


class AdamW(torch.optim.Optimizer):
    """`transformers.AdamW` of transformers 4.0.1 (removed from later releases), verbatim maths."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    bias_correction1 = 1.0 - beta1 ** state["step"]
                    bias_correction2 = 1.0 - beta2 ** state["step"]
                    step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
                p.addcdiv_(exp_avg, denom, value=-step_size)
                # Decoupled decay of the already-updated parameter, as 4.0.1 did.
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


class Lookahead(torch.optim.Optimizer):
    """The lonePatient Lookahead wrapper the notebook imports (`extra_optim.Lookahead`).

    Like the original it skips `Optimizer.__init__` (a subclass only for isinstance checks, e.g.
    LambdaLR's); `defaults` and `zero_grad` delegate to the wrapped optimizer so that torch 2.x's
    GradScaler and schedulers work with it.
    """

    def __init__(self, optimizer, k=5, alpha=0.5):
        self.optimizer = optimizer
        self.k = k
        self.alpha = alpha
        self.param_groups = self.optimizer.param_groups
        self.state = defaultdict(dict)
        self.fast_state = self.optimizer.state
        self.defaults = self.optimizer.defaults
        for group in self.param_groups:
            group["counter"] = 0

    def update(self, group):
        for fast in group["params"]:
            param_state = self.state[fast]
            if "slow_param" not in param_state:
                param_state["slow_param"] = torch.zeros_like(fast.data)
                param_state["slow_param"].copy_(fast.data)
            slow = param_state["slow_param"]
            slow += (fast.data - slow) * self.alpha
            fast.data.copy_(slow)

    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        for group in self.param_groups:
            if group["counter"] == 0:
                self.update(group)
            group["counter"] += 1
            if group["counter"] >= self.k:
                group["counter"] = 0
        return loss

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


class WarmupLinearSchedule(LambdaLR):
    """pytorch-transformers' schedule: lr · step/warmup, then lr · (t_total − step)/(t_total − warmup)."""

    def __init__(self, optimizer, warmup_steps, t_total, last_epoch=-1):
        self.warmup_steps = warmup_steps
        self.t_total = t_total
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step):
        if step < self.warmup_steps:
            return float(step) / float(max(1, self.warmup_steps))
        return max(0.0, float(self.t_total - step) / float(max(1.0, self.t_total - self.warmup_steps)))


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """The notebook's hyper-parameters (sda-jax names); defaults are the seed's."""

    learning_rate: float = 2e-5
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    lookahead_k: int = 5
    lookahead_alpha: float = 1.0
    teacher_decay: float = 0.995
    kd_coeff: float = 1.0
    eval_ema_decay: float = 0.999
    eval_ema_start_step: int = 500
    precision: str = "fp32"  # fp32 | fp16 (autocast + GradScaler) | bf16 (autocast)
    ema_impl: str = "loop"  # loop | foreach: teacher and eval-EMA updates
    compile: bool = False  # torch.compile the student's and the teacher's forward

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.ema_impl not in EMA_IMPLS:
            raise ValueError(f"ema_impl {self.ema_impl!r} is not one of {EMA_IMPLS}")


def build_optimizer(model: torch.nn.Module, total_steps: int, config: RecipeConfig):
    """The notebook's AdamW (two groups) wrapped in Lookahead, and its warmup-linear schedule."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not any(nd in n for nd in NO_DECAY)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if any(nd in n for nd in NO_DECAY)], "weight_decay": 0.0},
    ]
    optimizer = AdamW(groups, lr=config.learning_rate, correct_bias=False, eps=config.adam_eps)
    if config.lookahead_k:
        optimizer = Lookahead(optimizer, config.lookahead_k, config.lookahead_alpha)
    schedule = WarmupLinearSchedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    return optimizer, schedule


def torch_batch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """An sda_jax.input_pipeline batch as torch tensors, without its padding (weight-0) rows."""
    real = np.asarray(batch["weights"]) > 0
    keep = slice(None) if real.all() else real
    names = ("input_ids", "token_type_ids", "attention_mask", "labels")
    return {n: torch.from_numpy(np.asarray(batch[n])[keep]).to(device=device, dtype=torch.long) for n in names}


class SdaTrainer:
    """One SDA train step at a time, exactly as the notebook's loop body (minus its dev evaluation).

    `student` is the model being trained (in train mode), `teacher` its EMA copy (eval mode),
    `eval_ema_params()` the evaluation EMA's tensors (the student's before its start step).
    """

    def __init__(self, model: transformers.BertForSequenceClassification, total_steps: int, config: RecipeConfig):
        self.config = config
        self.student = model.train()
        self.device = next(model.parameters()).device
        self.optimizer, self.schedule = build_optimizer(model, total_steps, config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.global_step = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._teacher_params = list(self.teacher.parameters())
        self._eval_ema: list[torch.Tensor] | None = None
        self._student_fn = torch.compile(self.student) if config.compile else self.student
        self._teacher_fn = torch.compile(self.teacher) if config.compile else self.teacher
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.precision)
        self._autocast = lambda: torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """Trains on one sda_jax batch; returns the loss, CE and KD terms (as the notebook logs them)."""
        inputs = torch_batch(batch, self.device)
        labels = inputs.pop("labels")
        with self._autocast():
            logits = self._student_fn(**inputs).logits
            with torch.no_grad():
                teacher_logits = self._teacher_fn(**inputs).logits
            ce = F.cross_entropy(logits, labels)
            kd = F.mse_loss(logits, teacher_logits)
            loss = ce + self.config.kd_coeff * kd
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad()
        self.global_step += 1
        self._update_averages()
        return {"loss": loss.item(), "ce": ce.item(), "kd": kd.item()}

    @torch.no_grad()
    def _update_averages(self) -> None:
        t, c = self.global_step, self.config
        one_minus_decay = 1.0 - min(c.teacher_decay, (1 + t) / (10 + t))
        if c.ema_impl == "loop":  # the notebook's code
            for s_param, param in zip(self._teacher_params, self._params):
                s_param.sub_(one_minus_decay * (s_param - param))
        else:  # the same arithmetic, one kernel per op for all tensors
            diff = torch._foreach_sub(self._teacher_params, self._params)
            torch._foreach_mul_(diff, one_minus_decay)
            torch._foreach_sub_(self._teacher_params, diff)
        if t == c.eval_ema_start_step:  # the notebook's EMA(model, 0.999) registers a copy
            self._eval_ema = [p.detach().clone() for p in self._params]
        elif t > c.eval_ema_start_step:
            d = c.eval_ema_decay
            if c.ema_impl == "loop":  # the notebook's EMA.update
                for i, param in enumerate(self._params):
                    self._eval_ema[i] = ((1.0 - d) * param + d * self._eval_ema[i]).clone()
            else:
                torch._foreach_mul_(self._eval_ema, d)
                torch._foreach_add_(self._eval_ema, torch._foreach_mul(self._params, 1.0 - d))

    def eval_ema_params(self) -> dict[str, torch.Tensor]:
        """The evaluation EMA by parameter name (the student itself before the start step)."""
        names = [n for n, p in self.student.named_parameters() if p.requires_grad]
        tensors = self._params if self._eval_ema is None else self._eval_ema
        return {n: t.detach() for n, t in zip(names, tensors)}


def _cli() -> None:
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import default
    from sda_jax import input_pipeline, splits, tokenization
    from sda_jax.settings import Settings

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
    parser.add_argument("--compile", action="store_true")
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
                bucket_lengths=splits.bucket_lengths(data, encoded), seed=args.seed,
            ),
            args.steps,
        )
    )  # fmt: skip
    # Untimed: one step per bucket length the timed steps use (torch.compile specialises on it), then more.
    first_of_each_length = list({b["input_ids"].shape[1]: b for b in reversed(timed)}.values())
    warmup = first_of_each_length + timed[: max(0, args.warmup_steps - len(first_of_each_length))]
    optim, sda = defaults.optim, defaults.sda
    config = RecipeConfig(
        learning_rate=optim.learning_rate, warmup_ratio=optim.warmup_ratio, weight_decay=optim.weight_decay,
        adam_eps=optim.adam_eps, lookahead_k=optim.lookahead_k, lookahead_alpha=optim.lookahead_alpha,
        teacher_decay=sda.teacher_decay, kd_coeff=sda.kd_coeff, eval_ema_decay=sda.eval_ema_decay,
        eval_ema_start_step=len(warmup),  # timed steps run in the steady state: both EMAs on
        precision=args.precision, ema_impl=args.ema_impl, compile=args.compile,
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
        "device": args.device, "precision": args.precision, "ema_impl": args.ema_impl, "compile": args.compile,
        "batch_size": args.batch_size, "steps": args.steps, "seconds": seconds, "samples_per_second": samples / seconds,
        "final_loss": losses[-1] if losses else None, "pretrained": has_weights,
    }  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    _cli()
