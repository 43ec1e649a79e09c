"""The reference recipe's optimizer in optax: AdamW with its exact quirks, warmup schedule, Lookahead.

The reference builds `transformers.AdamW(correct_bias=False, eps=1e-8)` with two parameter groups
(no weight decay on biases and LayerNorm weights), wraps it in `Lookahead(k=5, alpha=1)` and steps
a `WarmupLinearSchedule`. Here: an optax chain for AdamW + schedule, and `lookahead_sync`, applied
by the train step after the optimizer update because Lookahead overwrites parameters rather than
adding an update (an optax update would not reproduce the reference's values bit for bit).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sda_jax.settings import OptimSettings

Params = Any


class ScaleByAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, *, bias_correction: bool) -> optax.GradientTransformation:
    """Adam's direction m / (sqrt(v) + eps), optionally without bias correction.

    `optax.scale_by_adam` always corrects the bias; the reference's `correct_bias=False` makes the
    first steps larger (m/sqrt(v) ≈ 3.2·sign(g) at step 1 for b2=0.999), so we need both forms.
    """

    def init(params: Params) -> ScaleByAdamState:
        # Two trees, not one shared twice: a donated state must not hold the same buffer twice.
        return ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update(grads: optax.Updates, state: ScaleByAdamState, params: Params | None = None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, grads)
        if bias_correction:
            step = count.astype(jnp.float32)
            mu_hat = jax.tree.map(lambda m: m / (1.0 - b1**step), mu)
            nu_hat = jax.tree.map(lambda v: v / (1.0 - b2**step), nu)
        else:
            mu_hat, nu_hat = mu, nu
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def decay_mask(params: Params) -> Params:
    """True where weight decay applies: not on biases, not on LayerNorm (the reference's no_decay)."""

    def wants_decay(path: tuple[Any, ...], _leaf: Any) -> bool:
        names = [str(getattr(key, "key", key)) for key in path]
        return names[-1] != "bias" and not any("LayerNorm" in name for name in names)

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def learning_rate_schedule(settings: OptimSettings, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over int(warmup_ratio · total) steps, then linear decay to 0 at total.

    As the reference's WarmupLinearSchedule stepped after each update, step 0 uses lr = 0.
    """
    warmup_steps = int(settings.warmup_ratio * total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, settings.learning_rate, max(warmup_steps, 1)),
            optax.linear_schedule(settings.learning_rate, 0.0, max(total_steps - warmup_steps, 1)),
        ],
        boundaries=[warmup_steps],
    )


def make_optimizer(settings: OptimSettings, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """AdamW of the reference (decoupled decay, groups by name) with optional gradient clipping.

    Its `update` takes the train step as a keyword: `tx.update(grads, state, params, step=step)`.

    Weight decay uses the parameter before the update (optax) where the reference decays the
    already-updated one: the two differ by lr²·wd·update, about 1e-14 relative here.
    """
    chain = []
    if settings.max_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(settings.max_grad_norm))
    chain += [
        scale_by_adam(
            settings.adam_b1, settings.adam_b2, settings.adam_eps, bias_correction=settings.adam_bias_correction
        ),
        optax.add_decayed_weights(settings.weight_decay, mask=decay_mask),
        scale_by_step_schedule(learning_rate_schedule(settings, total_steps)),
    ]
    return optax.chain(*chain)


def scale_by_step_schedule(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """Multiplies updates by −schedule(step), `step` being the train step given to `tx.update`.

    optax's own schedules count the optimizer's updates; the reference's scheduler counts train
    steps, fp16 steps skipped for overflow included, so the train step passes its step count.
    """

    def init(params: Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: optax.Updates, state: optax.EmptyState, params: Params | None = None, *, step, **extra):
        del params, extra
        learning_rate = schedule(step)
        return jax.tree.map(lambda u: -learning_rate * u, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def lookahead_sync(params: Params, slow_params: Params, num_updates: jax.Array, k: int, alpha: float):
    """Lookahead as the reference's wrapper does it, after the `num_updates`-th optimizer update.

    The reference syncs on updates 1, 1+k, 1+2k, ...; on the first it only copies the fast
    weights into the slow ones. A sync moves slow towards fast by alpha and resets fast to slow.
    Returns (params, slow_params).
    """

    def sync(operands):
        fast, slow = operands
        first = num_updates == 1
        new_slow = jax.tree.map(lambda f, s: jnp.where(first, f, s + alpha * (f - s)), fast, slow)
        return new_slow, new_slow

    return jax.lax.cond((num_updates - 1) % k == 0, sync, lambda operands: operands, (params, slow_params))
