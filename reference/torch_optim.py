"""The seed recipe's optimizer pieces in PyTorch: transformers 4.0.1's AdamW, Lookahead, the warmup
schedule, and their multi-tensor (`torch._foreach_*`) forms for the benchmark's fast forms.

* `AdamW`: transformers 4.0.1's (removed from later releases), verbatim maths, as the notebook
  uses it: `AdamW(groups, lr, correct_bias=False, eps=1e-8)`, the weight decay applied to the
  already-updated parameter;
* `Lookahead`: the common (lonePatient) wrapper: a counter per group, slow weights created at the
  first sync, syncs on updates 1, 1+k, 1+2k, ...;
* `WarmupLinearSchedule`: LambdaLR, step/warmup during warmup, then linear decay to 0 at t_total;
* `ForeachAdamW`, `ForeachLookahead`, `lerp_averages`: the same arithmetic as one multi-tensor op
  per step for all parameters of a group (tests/reference/test_torch_reference.py: bit-identical on CPU).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.optim.lr_scheduler import LambdaLR


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


def adamw_foreach_update(groups) -> None:
    """`AdamW.step` above (correct_bias=False) for whole param groups, one multi-tensor op per op.

    `groups`: one (params, grads, exp_avgs, exp_avg_sqs, neg_lr, neg_lr_wd, beta1, beta2, eps) per
    group, with neg_lr = −lr and neg_lr_wd = −lr·weight_decay (None: the group has no decay). Both
    are Python floats (eager: the very kernels of `AdamW.step` with the same scalars, so on CPU the
    result is bit-identical) or 0-dim tensors (compiled: the schedule changes lr every step and a
    tensor does not recompile; then addcdiv's value·m/denom is spelled (−lr·m)/denom in the same
    order, and the decay p + (−lr·wd)·p as a multiply and an add, which can round differently from
    `add_(alpha=)`'s fused multiply-add).
    """
    for params, grads, exp_avgs, exp_avg_sqs, neg_lr, neg_lr_wd, beta1, beta2, eps in groups:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)  # eps added to sqrt(v): no bias correction
        torch._foreach_add_(denom, eps)
        if isinstance(neg_lr, torch.Tensor):
            update = torch._foreach_mul(exp_avgs, neg_lr)
            torch._foreach_div_(update, denom)
            torch._foreach_add_(params, update)
            if neg_lr_wd is not None:  # decoupled decay of the already-updated parameter
                torch._foreach_add_(params, torch._foreach_mul(params, neg_lr_wd))
        else:
            torch._foreach_addcdiv_(params, exp_avgs, denom, value=neg_lr)
            if neg_lr_wd is not None:
                torch._foreach_add_(params, params, alpha=neg_lr_wd)


class ForeachAdamW(torch.optim.Optimizer):
    """`AdamW` (transformers 4.0.1, correct_bias=False) as multi-tensor ops: `adamw_foreach_update`.

    Same groups, hyper-parameters and maths: no bias correction, eps added to sqrt(v), decoupled
    weight decay applied to the already-updated parameter, parameters without a gradient skipped.
    (`torch.optim.AdamW(fused=True)` always corrects the bias: another algorithm.) The per-parameter
    step counter of `AdamW` is not kept: without bias correction nothing reads it.

    `compile_mode` None runs the update eagerly, with the Python-float lr (bit-identical to `AdamW` on
    CPU). Otherwise the update is `torch.compile(dynamic=False, mode=compile_mode)`d, as PyTorch's
    recipe for compiling `optimizer.step` with an LR scheduler: lr lives in 0-dim device tensors
    refilled before each step, so no recompilation; the moments and those tensors are marked as static
    addresses, so that CUDA graphs (reduce-overhead) update them in place without copies.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 compile_mode: str | None = None):  # fmt: skip
        if correct_bias:
            raise NotImplementedError("ForeachAdamW is the recipe's AdamW(correct_bias=False)")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)
        self.compiled = compile_mode is not None
        self._update = (
            torch.compile(adamw_foreach_update, dynamic=False, mode=compile_mode)
            if self.compiled
            else adamw_foreach_update
        )
        self._lr_tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        groups = []
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if self.compiled:
                        torch._dynamo.mark_static_address(state["exp_avg"])
                        torch._dynamo.mark_static_address(state["exp_avg_sq"])
            decay = group["weight_decay"] > 0.0
            neg_lr, neg_lr_wd = -group["lr"], -group["lr"] * group["weight_decay"]
            if self.compiled:
                if index not in self._lr_tensors:
                    self._lr_tensors[index] = tuple(torch.zeros((), device=params[0].device) for _ in range(2))
                    for t in self._lr_tensors[index]:
                        torch._dynamo.mark_static_address(t)
                lr_tensor, lr_wd_tensor = self._lr_tensors[index]
                lr_tensor.fill_(neg_lr)  # the float32 rounding a Scalar gets inside a kernel
                lr_wd_tensor.fill_(neg_lr_wd)
                neg_lr, neg_lr_wd = lr_tensor, lr_wd_tensor
            beta1, beta2 = group["betas"]
            groups.append((
                params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params], neg_lr, neg_lr_wd if decay else None,
                beta1, beta2, group["eps"],
            ))  # fmt: skip
        if groups:
            self._update(groups)
        return loss


class ForeachLookahead(Lookahead):
    """`Lookahead` with its slow-weight sync as multi-tensor ops: the same arithmetic, bit-identical.

    With alpha = 1 the sync sets slow = slow + (fast − slow) and copies it into fast: the identity
    up to the rounding of that sum, kept exactly. It runs on updates 1, 1+k, ... only, so it stays
    eager (outside any compiled or CUDA-graphed region).
    """

    @torch.no_grad()
    def update(self, group):
        fast = group["params"]
        for p in fast:
            param_state = self.state[p]
            if "slow_param" not in param_state:
                param_state["slow_param"] = p.detach().clone()
        slow = [self.state[p]["slow_param"] for p in fast]
        diff = torch._foreach_sub(fast, slow)
        torch._foreach_mul_(diff, self.alpha)
        torch._foreach_add_(slow, diff)
        torch._foreach_copy_(fast, slow)


def lerp_averages(averages: list[torch.Tensor], params: list[torch.Tensor], weight) -> None:
    """averages ← lerp(averages, params, weight), one `torch._foreach_lerp_` for all tensors.

    The same average as the seed's `s.sub_((1 − d)·(s − p))` (weight w = 1 − d) and its EMA's
    `(1 − d)·p + d·e`, rounded differently: lerp computes s + w·(p − s) for w < 0.5 and
    p − (1 − w)·(p − s) otherwise (the teacher's first steps), each as one fused multiply-add in
    torch's vectorised CPU kernel, where the seed rounds the product and the sum (the eval EMA: two
    products and a sum). They differ by an ulp or so of the average per update (tests/
    test_torch_reference.py measures it). `weight` is a Python float (eager) or a 0-dim tensor
    (compiled: the teacher's weight changes every step, and a tensor does not recompile).
    """
    if isinstance(weight, torch.Tensor):
        torch._foreach_lerp_(averages, params, [weight] * len(averages))
    else:
        torch._foreach_lerp_(averages, params, weight)


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
