"""The fast forms of the PyTorch reference (`tests/torch_reference.py`) against its seed form.

The benchmark's `torch eager` and `torch compile` forms swap the seed's per-parameter loops for
multi-tensor ops (`ForeachAdamW`, `ForeachLookahead`, `torch._foreach_lerp_` averages) and compile
the step. These tests pin down that they still run the seed recipe:

* the foreach optimizer is the seed's AdamW + Lookahead bit for bit (eager, on CPU the same kernels
  with the same scalars);
* its compiled spelling (lr as a 0-dim tensor) differs from it by float32 rounding only;
* lerp averages are the seed's averages up to rounding: a few ulps of the averaged weights;
* the compiled step (inductor on CPU; CUDA graphs cannot run here) matches the eager one and does
  not recompile when lr or the teacher's weight change.

A tiny BERT (1 layer, hidden 32, vocabulary 100) with weights N(0, 0.2), on synthetic batches.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import transformers

from reference.torch_optim import ForeachAdamW, adamw_foreach_update
from reference.torch_reference import RecipeConfig, SdaTrainer
from sda_jax.config import Settings

ARCH = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
EPS32 = float(np.finfo(np.float32).eps)  # 2^-23: the gap between 1 and the next float32
KEY_BIAS = "attention.self.key.bias"  # zero exact gradient: Adam moves it on rounding noise alone


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    config = transformers.BertConfig(**ARCH, num_labels=2, attn_implementation="eager")
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, 0.2)
    return model


def batches(count: int, rows: int = 8, length: int = 16, padding_rows: tuple[int, ...] = ()) -> list[dict]:
    """sda_jax-style batches: padded rows of random tokens, and weight-0 padding rows on request."""
    rng = np.random.default_rng(2021)
    out = []
    for step in range(count):
        lengths = rng.integers(4, length + 1, rows)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        second = (np.arange(length)[None] >= (lengths // 2)[:, None]).astype(np.int32) * mask
        weights = np.ones(rows, np.float32)
        if step in padding_rows:
            weights[rows // 2 :] = 0.0
        out.append({
            "input_ids": rng.integers(1, ARCH["vocab_size"], (rows, length)).astype(np.int32) * mask,
            "token_type_ids": second, "attention_mask": mask,
            "labels": rng.integers(0, 2, rows).astype(np.int32), "weights": weights,
        })  # fmt: skip
    return out


def trainer(**overrides) -> SdaTrainer:
    fields = {"learning_rate": 1e-3, "warmup_ratio": 0.0, "eval_ema_start_step": 2, **overrides}
    return SdaTrainer(tiny_model(), total_steps=20, config=RecipeConfig.from_settings(Settings(), **fields))


def named(trainer: SdaTrainer) -> dict[str, dict[str, np.ndarray]]:
    """Student, teacher and eval EMA of a trainer, as numpy arrays by parameter name."""
    as_numpy = lambda pairs: {n: t.detach().numpy().copy() for n, t in pairs}
    return {
        "student": as_numpy(trainer.student.named_parameters()),
        "teacher": as_numpy(trainer.teacher.named_parameters()),
        "eval_ema": as_numpy(trainer.eval_ema_params().items()),
    }


def test_foreach_optimizer_is_the_seed_adamw_and_lookahead_bit_for_bit() -> None:
    """7 steps (Lookahead syncs on updates 1 and 6, step 3 on a half-padding batch): identical."""
    seed, fast = trainer(optimizer_impl="loop"), trainer(optimizer_impl="foreach")
    assert type(fast.optimizer.optimizer) is ForeachAdamW and not fast.optimizer.optimizer.compiled
    for batch in batches(7, padding_rows=(2,)):
        assert seed.step(batch) == fast.step(batch)
    ours, theirs = named(fast), named(seed)
    for which in ours:
        for name, value in theirs[which].items():
            np.testing.assert_array_equal(ours[which][name], value, err_msg=f"{which} {name}")
    # The optimizer's own state too: Adam's moments and Lookahead's slow weights.
    for p, q in zip(seed.student.parameters(), fast.student.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                fast.optimizer.fast_state[q][key], seed.optimizer.fast_state[p][key], rtol=0, atol=0
            )
        torch.testing.assert_close(
            fast.optimizer.state[q]["slow_param"], seed.optimizer.state[p]["slow_param"], rtol=0, atol=0
        )
    moved = max(np.abs(ours["student"][n] - named(trainer())["student"][n]).max() for n in ours["student"])
    assert moved > 1e-3  # a comparison of weights that trained, not of the initial ones


def test_compiled_optimizer_maths_is_the_seed_adamw_up_to_rounding() -> None:
    """`adamw_foreach_update` with lr as 0-dim tensors (its compiled spelling), run eagerly, against
    the Python-float spelling (the seed's kernels): 5 steps with a changing lr, decay on and off.

    Only the decay's p + (−lr·wd)·p can round differently (a multiply and an add where the seed's
    `add_(alpha=)` fuses them), by at most an ulp of p per step: 5 steps, so at most 5 ulps.
    """
    gen = torch.Generator().manual_seed(0)
    shapes = [(33, 7), (64,), (5, 5, 3)]
    initial = [0.2 * torch.randn(s, generator=gen) for s in shapes]
    state = {spelling: ([p.clone() for p in initial], [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes])
             for spelling in ("float", "tensor")}  # fmt: skip
    for step in range(5):
        # Gradients from 1e-9 (below Adam's eps) to 1: the step is lr·m/(√v + eps) over that range.
        grads = [torch.randn(s, generator=gen) * 10.0 ** -torch.randint(0, 10, s, generator=gen) for s in shapes]
        lr = 1e-3 * (1.0 - step / 10)
        scalars = {"float": (-lr, -lr * 0.01), "tensor": (torch.tensor(-lr), torch.tensor(-lr * 0.01))}
        for spelling, (neg_lr, neg_lr_wd) in scalars.items():
            p, m, v = state[spelling]
            adamw_foreach_update([
                (p[:2], grads[:2], m[:2], v[:2], neg_lr, neg_lr_wd, 0.9, 0.999, 1e-8),  # decayed group
                (p[2:], grads[2:], m[2:], v[2:], neg_lr, None, 0.9, 0.999, 1e-8),  # no-decay group
            ])  # fmt: skip
    worst = 0.0
    for a, b, start in zip(state["tensor"][0], state["float"][0], initial):
        assert (b - start).abs().max() > 1e-3  # 5 steps of ~lr each
        worst = max(worst, float(((a - b).abs() / (EPS32 * b.abs())).max()))
    print(f"torch reference: compiled-spelling AdamW vs seed AdamW, 5 steps: max diff {worst:.2f} ulp of the weight")
    assert worst <= 5.0
    for a, b in zip(state["tensor"][1] + state["tensor"][2], state["float"][1] + state["float"][2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the moments do not depend on lr


def test_lerp_averages_are_the_seed_averages_up_to_rounding() -> None:
    """Teacher and eval EMA by `torch._foreach_lerp_` against the seed's loops, over 8 steps.

    kd_coeff 0, so that the teacher does not feed back into the student: the students stay
    bit-identical and the averages differ by their own rounding alone. Each update rounds at most
    ~2 ulps of the larger of the average and the student weight in either spelling (lerp's one
    rounding of a fused multiply-add and of p − s; the seed's two or three), and averaging shrinks
    earlier errors, so 8 updates differ by at most 16 such ulps (weights near 0: ulps of 0.01).
    """
    loop, lerp = trainer(kd_coeff=0.0, ema_impl="loop"), trainer(kd_coeff=0.0, ema_impl="lerp")
    for batch in batches(8):
        loop_metrics, lerp_metrics = loop.step(batch), lerp.step(batch)
        assert loop_metrics["ce"] == lerp_metrics["ce"]
    ours, theirs = named(lerp), named(loop)
    for name, value in theirs["student"].items():
        np.testing.assert_array_equal(ours["student"][name], value, err_msg=name)
    for which in ("teacher", "eval_ema"):
        worst_ulps = worst_abs = 0.0
        for name, value in theirs[which].items():
            assert not np.array_equal(value, theirs["student"][name]), name  # an average, not a copy
            diff = np.abs(ours[which][name] - value)
            scale = np.maximum(np.maximum(np.abs(value), np.abs(theirs["student"][name])), 0.01)
            worst_abs = max(worst_abs, float(diff.max()))
            worst_ulps = max(worst_ulps, float((diff / (EPS32 * scale)).max()))
        print(f"torch reference: lerp vs loop {which}, 8 steps: max diff {worst_abs:.2e} ({worst_ulps:.1f} ulp)")
        assert 0.0 < worst_ulps <= 16.0, (which, worst_ulps)  # 0: lerp would not be what ran


def test_compiled_step_matches_eager_on_cpu_and_compiles_once() -> None:
    """The `torch compile` form (inductor's default mode on CPU) for 2 steps against the eager form.

    Compiled kernels sum in other orders: losses and gradients agree to float32 rounding, and Adam's
    step lr·m/(√v + eps) carries that relative error, more where |g| is near eps (key biases,
    whose exact gradient is 0, move on rounding noise alone and are left out: see
    tests/e2e/test_parity.py). So, as tests/e2e/test_parity.py allows sda-jax against the reference: losses
    to 1e-6, each tensor's update to 1e-3 relative in norm and weights to 3e-5 elementwise (lr is
    1e-3, an Adam step ~3e-3). Step 2 changes lr and the teacher's weight and runs the eval EMA's
    first lerp: it may add no graph.
    """
    reason = _inductor_unavailable()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    from torch._dynamo.utils import counters

    initial = named(trainer())["student"]
    eager = trainer(ema_impl="lerp", optimizer_impl="foreach", eval_ema_start_step=1)
    compiled = trainer(ema_impl="lerp", optimizer_impl="foreach", eval_ema_start_step=1, compile=True)
    assert compiled.compile_mode == "default" and not compiled.cuda_graphs
    assert compiled.optimizer.optimizer.compiled
    graphs = []
    for batch in batches(2):
        expected, got = eager.step(batch), compiled.step(batch)
        graphs.append(int(counters["stats"]["unique_graphs"]))
        for key in expected:
            assert abs(got[key] - expected[key]) <= 1e-6, (key, got, expected)
    # The forward (+ backward), the optimizer update, the averages' lerp: 3 graphs, none added by step 2.
    assert graphs[1] == graphs[0] >= 3, graphs
    ours, theirs = named(compiled), named(eager)
    for which in ours:
        worst_abs = worst_rel = 0.0
        for name, value in theirs[which].items():
            if name.endswith(KEY_BIAS):
                continue
            diff = ours[which][name] - value
            worst_abs = max(worst_abs, float(np.abs(diff).max()))
            moved = np.linalg.norm(theirs["student"][name] - initial[name])
            worst_rel = max(worst_rel, float(np.linalg.norm(diff) / moved))
        print(
            f"torch reference: compiled vs eager {which}, 2 steps: update rel diff {worst_rel:.2e}, max abs diff {worst_abs:.2e}"
        )
        assert worst_rel <= 1e-3 and worst_abs <= 3e-5, (which, worst_rel, worst_abs)


def _inductor_unavailable() -> str | None:
    """Why torch.compile's CPU backend cannot run here (no C++ compiler), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # an older torch
        found = shutil.which("g++") or shutil.which("clang++")
        return None if found else f"torch {torch.__version__}: no C++ compiler (g++, clang++) for inductor"
    try:
        get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - any failure to find one means no inductor on CPU
        return f"torch {torch.__version__}: inductor has no usable C++ compiler: {error}"
    return None
