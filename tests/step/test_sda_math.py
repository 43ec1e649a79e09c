"""The SDA formulas, optimizer pieces and loss scaling against values computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sda_jax.config import OptimSettings
from sda_jax.step import optim, precision, sda


def test_teacher_decay_ramp_then_cap():
    # (1 + t) / (10 + t): 2/11 at t=1, 11/20 at t=10; the cap 0.995 binds from t = 1790 on.
    np.testing.assert_allclose(sda.EmaTeacher.decay(1, 0.995), 2 / 11, rtol=1e-6)
    np.testing.assert_allclose(sda.EmaTeacher.decay(10, 0.995), 11 / 20, rtol=1e-6)
    np.testing.assert_allclose(sda.EmaTeacher.decay(1789, 0.995), 1790 / 1799, rtol=1e-6)
    np.testing.assert_allclose(sda.EmaTeacher.decay(5000, 0.995), 0.995, rtol=1e-6)


def test_ema_update_matches_reference_formula():
    teacher = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
    student = {"w": jnp.array([0.0, 4.0]), "b": jnp.array(-1.0)}
    decay = 2 / 11
    out = sda.ema_update(student, teacher, decay)
    # The reference: s_param.sub_((1 - decay) * (s_param - param)).
    for name, s_param in teacher.items():
        expected = np.asarray(s_param) - (1 - decay) * (np.asarray(s_param) - np.asarray(student[name]))
        np.testing.assert_allclose(out[name], expected, rtol=1e-6)


def test_eval_ema_copies_student_until_start_then_averages():
    ema = sda.EvalEma(params=jnp.array([5.0]), decay=0.999, start_step=500)
    assert float(ema.decay_at(499)) == 0.0
    assert float(ema.decay_at(500)) == 0.0
    assert float(ema.decay_at(501)) == pytest.approx(0.999)
    assert float(ema.update(jnp.array([7.0]), jnp.int32(3)).params[0]) == 7.0
    averaged = ema.update(jnp.array([7.0]), jnp.int32(501)).params[0]
    np.testing.assert_allclose(averaged, 0.999 * 5.0 + 0.001 * 7.0, rtol=1e-6)


def test_sda_loss_hand_computed_with_padding_row():
    student = jnp.array([[2.0, 0.0], [0.0, 1.0], [9.0, -9.0]])
    teacher = jnp.array([[1.0, 1.0], [0.0, 3.0], [0.0, 0.0]])
    labels = jnp.array([0, 0, 1])
    weights = jnp.array([1.0, 1.0, 0.0])  # the third row is batch padding
    ce_rows = [np.log(1 + np.exp(-2.0)), np.log(1 + np.exp(1.0))]
    ce = np.mean(ce_rows)
    kd = ((2 - 1) ** 2 + (0 - 1) ** 2 + 0**2 + (1 - 3) ** 2) / 4
    loss, (got_ce, got_kd) = sda.sda_loss(student, teacher, labels, weights, kd_coeff=0.5)
    np.testing.assert_allclose(got_ce, ce, rtol=1e-6)
    np.testing.assert_allclose(got_kd, kd, rtol=1e-6)
    np.testing.assert_allclose(loss, ce + 0.5 * kd, rtol=1e-6)


def test_kd_term_has_no_gradient_through_teacher():
    labels, weights = jnp.array([1]), jnp.array([1.0])
    grad = jax.grad(lambda t: sda.sda_loss(jnp.array([[0.3, 0.1]]), t, labels, weights, 1.0)[0])(
        jnp.array([[1.0, 2.0]])
    )
    np.testing.assert_array_equal(grad, 0.0)


def _settings(**overrides):
    values = {
        "learning_rate": 1e-3, "warmup_ratio": 0.1, "weight_decay": 0.01, "adam_b1": 0.9, "adam_b2": 0.999, "adam_eps": 1e-8,
        "adam_bias_correction": False, "lookahead_k": None, "lookahead_alpha": 1.0, "max_grad_norm": None,
    }  # fmt: skip
    values.update(overrides)
    return OptimSettings(**values)


def test_schedule_warmup_from_zero_then_linear_decay():
    schedule = optim.Schedule.create(_settings(), total_steps=100)  # warmup 10 steps
    np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 55, 100)], [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9)


@pytest.mark.parametrize("total_steps, warmup_ratio", [(100, 0.1), (537, 0.05), (7, 0.0), (20, 0.1), (3, 1.0)])
def test_schedule_equals_optax_joined_linear_schedules(total_steps, warmup_ratio):
    """The traced schedule is optax's formula, to float32 rounding (XLA may fuse a multiply-add
    differently when the step counts are constants)."""
    settings = _settings(learning_rate=2e-5, warmup_ratio=warmup_ratio)
    warmup = int(warmup_ratio * total_steps)
    expected = optax.join_schedules(
        [
            optax.linear_schedule(0.0, 2e-5, max(warmup, 1)),
            optax.linear_schedule(2e-5, 0.0, max(total_steps - warmup, 1)),
        ],
        boundaries=[warmup],
    )
    schedule = jax.jit(optim.Schedule.create(settings, total_steps).__call__)
    steps = jnp.arange(total_steps + 2)
    np.testing.assert_allclose(jax.vmap(schedule)(steps), jax.vmap(expected)(steps), rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_adamw_step_matches_hand_computation(bias_correction):
    settings = _settings(adam_bias_correction=bias_correction, warmup_ratio=0.0)
    tx = optim.make_optimizer(settings)
    params = {"dense": {"kernel": jnp.array([1.0, -1.0]), "bias": jnp.array([0.5])}, "LayerNorm": {"scale": jnp.array([2.0])}}
    grads = {"dense": {"kernel": jnp.array([0.1, 0.2]), "bias": jnp.array([-0.3])}, "LayerNorm": {"scale": jnp.array([0.4])}}
    updates, _ = tx.update(grads, tx.init(params), params, learning_rate=1e-3)

    def expected(g, p, decays):
        m, v = 0.1 * g, 0.001 * g * g
        if bias_correction:
            m, v = m / 0.1, v / 0.001
        return -1e-3 * (m / (np.sqrt(v) + 1e-8) + (0.01 * p if decays else 0.0))

    np.testing.assert_allclose(updates["dense"]["kernel"], expected(np.array([0.1, 0.2]), np.array([1.0, -1.0]), True), rtol=1e-5)
    np.testing.assert_allclose(updates["dense"]["bias"], expected(np.array([-0.3]), np.array([0.5]), False), rtol=1e-5)
    np.testing.assert_allclose(updates["LayerNorm"]["scale"], expected(np.array([0.4]), np.array([2.0]), False), rtol=1e-5)


def test_lookahead_syncs_on_updates_1_then_every_k():
    slow = {"w": jnp.array([0.0])}
    fast = {"w": jnp.array([10.0])}
    # Update 1: slow := fast, nothing moves.
    p, s = optim.lookahead_sync(fast, slow, jnp.int32(1), 5, 0.5)
    assert float(p["w"][0]) == 10.0 and float(s["w"][0]) == 10.0
    # Update 2..5: no sync.
    p, s = optim.lookahead_sync({"w": jnp.array([20.0])}, s, jnp.int32(4), 5, 0.5)
    assert float(p["w"][0]) == 20.0 and float(s["w"][0]) == 10.0
    # Update 6: slow += 0.5 (fast - slow), fast := slow.
    p, s = optim.lookahead_sync({"w": jnp.array([20.0])}, s, jnp.int32(6), 5, 0.5)
    assert float(p["w"][0]) == 15.0 and float(s["w"][0]) == 15.0


def test_loss_scale_halves_on_overflow_and_doubles_after_interval():
    scale = precision.LossScale.create(1024.0, growth_interval=2)
    scale = scale.adjust(jnp.array(False))
    assert float(scale.scale) == 512.0 and int(scale.good_steps) == 0
    scale = scale.adjust(jnp.array(True))
    assert float(scale.scale) == 512.0 and int(scale.good_steps) == 1
    scale = scale.adjust(jnp.array(True))
    assert float(scale.scale) == 1024.0 and int(scale.good_steps) == 0
    assert not bool(precision.all_finite({"a": jnp.array([1.0, jnp.inf])}))
    assert bool(precision.all_finite({"a": jnp.array([1.0, 2.0])}))


def test_learning_rate_is_the_argument_given_to_the_update():
    # The train step passes schedule(train step), so fp16 steps skipped for overflow still move
    # the schedule, as the reference's scheduler (which counted train steps) did.
    tx = optim.scale_by_learning_rate_argument()
    updates = {"w": jnp.array([2.0])}
    state = tx.init(updates)
    for rate in (0.0, 3e-4, 1e-3):
        scaled, state = tx.update(updates, state, learning_rate=jnp.float32(rate))
        np.testing.assert_allclose(scaled["w"], -2.0 * rate, rtol=1e-6)
