"""Adversarial training on the word-embedding table (FGM, PGD), inside the jitted train step.

As the reference's toolbox does it: the perturbation is added to the embedding *parameters*
along the normalised gradient of the loss, the loss is differentiated again at the perturbed
point, and those gradients are added to the clean ones before the optimizer update.

* FGM: one attack, r = epsilon · g / ‖g‖.
* PGD: `steps` attacks of size alpha, each along the gradient at the previous perturbation, the
  accumulated r projected back onto the ball ‖r‖ ≤ epsilon; the gradients of the last one count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

WORD_EMBEDDING_PATH = ("bert", "embeddings", "word_embeddings", "embedding")

GradFn = Callable[[Any, int], tuple[Any, Any]]  # (params, attack index) -> (grads, aux)


def word_embeddings(tree: Any) -> jax.Array:
    return traverse_util.flatten_dict(tree)[WORD_EMBEDDING_PATH]


def with_word_embeddings(tree: Any, value: jax.Array) -> Any:
    """A copy of the params tree whose word-embedding table is `value` (other leaves shared)."""
    flat = traverse_util.flatten_dict(tree)
    flat[WORD_EMBEDDING_PATH] = value
    return traverse_util.unflatten_dict(flat)


def _unit(g: jax.Array) -> jax.Array:
    """g / ‖g‖ over the whole table; zero when the norm is zero or not finite (nothing to follow)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
    ok = (norm > 0) & jnp.isfinite(norm)
    return jnp.where(ok, g / jnp.where(ok, norm, 1.0), 0.0)


def fgm_perturbation(grad: jax.Array, epsilon: float) -> jax.Array:
    return epsilon * _unit(grad)


def pgd_perturbation(r: jax.Array, grad: jax.Array, alpha: float, epsilon: float) -> jax.Array:
    """One PGD ascent step from r, projected onto the epsilon-ball."""
    r = r + alpha * _unit(grad)
    norm = jnp.sqrt(jnp.sum(jnp.square(r)))
    return jnp.where(norm > epsilon, epsilon * r / jnp.maximum(norm, 1e-30), r)


def adversarial_gradients(
    grad_fn: GradFn, params: Any, clean_grads: Any, *, method: str, epsilon: float, alpha: float, steps: int
) -> Any:
    """Clean gradients plus those of the loss at the adversarially perturbed embeddings."""
    table = word_embeddings(params)
    grad = word_embeddings(clean_grads)
    if method == "fgm":
        adv_grads, _ = grad_fn(with_word_embeddings(params, table + fgm_perturbation(grad, epsilon)), 1)
    elif method == "pgd":
        r = jnp.zeros_like(table)
        for attack in range(1, steps + 1):
            r = pgd_perturbation(r, grad, alpha, epsilon)
            adv_grads, _ = grad_fn(with_word_embeddings(params, table + r), attack)
            grad = word_embeddings(adv_grads)
    else:
        raise ValueError(f"unknown adversarial method {method!r}")
    return jax.tree.map(jnp.add, clean_grads, adv_grads)
