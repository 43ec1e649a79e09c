"""The reference recipe's optimizer in optax: AdamW with its exact quirks, warmup schedule, Lookahead.

The reference builds `transformers.AdamW(correct_bias=False, eps=1e-8)` with two parameter groups
(no weight decay on biases and LayerNorm weights), wraps it in `Lookahead(k=5, alpha=1)` and steps
a `WarmupLinearSchedule`. Here: an optax chain for AdamW scaled by the learning rate of a
`Schedule` held in the train state, and `lookahead_sync`, applied by the train step after the
optimizer update because Lookahead overwrites parameters rather than adding an update (an optax
update would not reproduce the reference's values bit for bit).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sda_jax.config import OptimSettings

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


class Schedule(flax.struct.PyTreeNode):
    """Linear warmup from 0 over `warmup_steps`, then linear decay to 0 at `total_steps`.

    The numbers are arrays in the train state, not constants of the compiled step, so runs of
    other lengths (max_steps, num_epochs, data size) or peak rates share their compiled programs
    and the persistent compilation cache. As the reference's WarmupLinearSchedule stepped after
    each update, step 0 uses lr = 0. The formula is optax's `join_schedules` of two
    `linear_schedule`s (equal to float32 rounding; tested).
    """

    peak: jax.Array  # float32
    warmup_steps: jax.Array  # int32: int(warmup_ratio * total_steps)
    total_steps: jax.Array  # int32

    @classmethod
    def create(cls, settings: OptimSettings, total_steps: int) -> Schedule:
        return cls(
            peak=jnp.asarray(settings.learning_rate, jnp.float32),
            warmup_steps=jnp.asarray(int(settings.warmup_ratio * total_steps), jnp.int32),
            total_steps=jnp.asarray(total_steps, jnp.int32),
        )

    def __call__(self, step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.int32)
        warmup_span = jnp.maximum(self.warmup_steps, 1)
        decay_span = jnp.maximum(self.total_steps - self.warmup_steps, 1)
        warming = (0.0 - self.peak) * (1 - jnp.clip(step, 0, warmup_span) / warmup_span) + self.peak
        decaying = self.peak * (1 - jnp.clip(step - self.warmup_steps, 0, decay_span) / decay_span)
        return jnp.where(step < self.warmup_steps, warming, decaying)


def make_optimizer(settings: OptimSettings, weight_decay: jax.Array | float | None = None) -> optax.GradientTransformationExtraArgs:
    """AdamW of the reference (decoupled decay, groups by name) with optional gradient clipping.

    Its `update` takes the learning rate as a keyword, `tx.update(grads, state, params,
    learning_rate=lr)`: the train step computes it from its own step count and the run's
    `Schedule`, so that fp16 steps skipped for overflow still move the schedule (as the
    reference's scheduler, which counts train steps, not updates).

    Weight decay uses the parameter before the update (optax) where the reference decays the
    already-updated one: the two differ by lr²·wd·update, about 1e-14 relative here. `weight_decay`
    (an array of the train state, see `hyperparameters`) stands in for `settings.weight_decay`.
    """
    chain = []
    if settings.max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(settings.max_grad_norm))
    chain += [
        scale_by_adam(
            settings.adam_b1, settings.adam_b2, settings.adam_eps, bias_correction=settings.adam_bias_correction
        ),
        optax.add_decayed_weights(settings.weight_decay if weight_decay is None else weight_decay, mask=decay_mask),
        scale_by_learning_rate_argument(),
    ]
    return optax.chain(*chain)


def scale_by_learning_rate_argument() -> optax.GradientTransformationExtraArgs:
    """Multiplies updates by −learning_rate, the `learning_rate` given to `tx.update`."""

    def init(params: Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: optax.Updates, state: optax.EmptyState, params: Params | None = None, *, learning_rate, **extra):
        del params, extra
        return jax.tree.map(lambda u: -learning_rate * u, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def uses_lookahead(settings: OptimSettings) -> bool:
    """Whether Lookahead changes anything: with alpha = 1 each sync sets slow := fast, fast := slow.

    The reference's Lookahead(k=5, alpha=1) is such a no-op (up to the rounding of
    slow + (fast - slow), which is exact whenever the two are within a factor of two), so
    no slow weights are kept and no sync runs.
    """
    return settings.lookahead_k is not None and settings.lookahead_alpha != 1.0


def lookahead_sync(params: Params, slow_params: Params, num_updates: jax.Array, k: int, alpha: float):
    """Lookahead as the reference's wrapper does it, after the `num_updates`-th optimizer update.

    The reference syncs on updates 1, 1+k, 1+2k, ...; on the first it only copies the fast
    weights into the slow ones. A sync moves slow towards fast by alpha and resets fast to slow.
    Returns (params, slow_params). An elementwise select rather than `lax.cond`: a cond on a
    device value makes the GPU host wait for it every step and splits CUDA graphs.
    """
    sync = (num_updates - 1) % k == 0
    first = num_updates == 1

    def sync_leaf(fast, slow):
        synced = jnp.where(first, fast, slow + alpha * (fast - slow))
        return jnp.where(sync, synced, fast), jnp.where(sync, synced, slow)

    pairs = jax.tree.map(sync_leaf, params, slow_params)
    is_pair = lambda x: isinstance(x, tuple)
    return jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair), jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
