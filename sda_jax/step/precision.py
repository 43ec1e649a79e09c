"""Compute dtype choice and fp16 dynamic loss scaling (the torch GradScaler's rules, as a pytree).

Parameters, optimizer state and both EMAs stay float32; only the forward/backward matmuls run in
the compute dtype. bfloat16 has float32's range and needs no scaling. float16 does: the loss is
multiplied by `scale` before differentiation, gradients are divided by it, and a step whose
gradients are not finite is skipped (parameters untouched) while the scale halves; after
`growth_interval` finite steps in a row the scale doubles.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def compute_dtype(name: str, platform: str) -> jnp.dtype:
    """`auto` is bfloat16 on accelerators and float32 on CPU, where bf16 matmuls are emulated."""
    if name == "auto":
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


@flax.struct.dataclass
class LossScale:
    scale: jax.Array  # float32 scalar multiplying the loss
    good_steps: jax.Array  # int32: finite steps since the last change of scale
    growth_interval: int = flax.struct.field(pytree_node=False, default=2000)

    @classmethod
    def create(cls, initial_scale: float, growth_interval: int) -> LossScale:
        return cls(
            scale=jnp.asarray(initial_scale, jnp.float32),
            good_steps=jnp.zeros([], jnp.int32),
            growth_interval=growth_interval,
        )

    def adjust(self, grads_finite: jax.Array) -> LossScale:
        """Halve on overflow; double after `growth_interval` finite steps in a row."""
        grown = self.good_steps + 1 >= self.growth_interval
        scale = jnp.where(grads_finite, jnp.where(grown, self.scale * 2.0, self.scale), self.scale * 0.5)
        good_steps = jnp.where(grads_finite & ~grown, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good_steps)


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))
