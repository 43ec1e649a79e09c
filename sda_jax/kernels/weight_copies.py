"""16-bit copies of the weight matrices, kept in the train state and written where they are updated.

Under autocast every product reads its weight matrix in the compute dtype. Cast at use, each step
reads every float32 matrix of the student and of the teacher and writes a 16-bit copy (scanned
layers: per layer and use, from the float32 stack). Kept in the train state, the copies are
written by the kernels that update the float32 values (AdamW's, the teacher's average), which
read those values anyway, and the products read them: the casts leave the step. A copy is
exactly `kernel.astype(dtype)`, what the products computed at use before, so the step's values
and gradients are the same (the gradient of a copy is widened to float32 as autodiff widens the
cast's). float32 models keep none.

The copies are part of the state that train checkpoints hold, so that a resumed run reads what
the saved one would have read.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp

Params = Any
Copies = dict  # the 16-bit weight matrices, nested as in the parameters (their `kernel` leaves only)


def _is_weight_matrix(path: tuple[str, ...]) -> bool:
    # What the model casts to the compute dtype at use: every `Dense` kernel (embedding tables and
    # LayerNorm, biases, are read in float32 as autocast reads them).
    return path[-1] == "kernel"


def of(params: Params, dtype: Any) -> Copies:
    """The `dtype` copy of every weight matrix of `params`."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {path: leaf.astype(dtype) for path, leaf in flat.items() if _is_weight_matrix(path)}
    )


def cast(tree: Any, dtype: Any) -> Any:
    """`tree` (of arrays or their `jax.ShapeDtypeStruct`s) with every weight matrix in `dtype`:
    what evaluation scores, each parameter set cast once per evaluation, not once per batch."""

    def leaf(path, x):
        if not _is_weight_matrix(tuple(str(getattr(key, "key", getattr(key, "name", key))) for key in path)):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(leaf, tree)


@jax.custom_vjp
def _read_copy(weights: jax.Array, copy: jax.Array) -> jax.Array:
    del weights
    return copy


def _read_copy_fwd(weights: jax.Array, copy: jax.Array):
    del weights
    return copy, None


def _read_copy_bwd(_, gradient: jax.Array):
    # Autodiff's gradient of the cast at use: the 16-bit gradient widened to the float32 weights'.
    return gradient.astype(jnp.float32), jnp.zeros_like(gradient)


_read_copy.defvjp(_read_copy_fwd, _read_copy_bwd)


def substitute(params: Params, copies: Copies | None) -> Params:
    """`params` with each weight matrix replaced by its copy (none: `params`); gradients with
    respect to `params` are those of the casts at use."""
    if copies is None:
        return params
    flat = flax.traverse_util.flatten_dict(params)
    for path, copy in flax.traverse_util.flatten_dict(copies).items():
        flat[path] = _read_copy(flat[path], copy)
    return flax.traverse_util.unflatten_dict(flat)


class WeightCopies(flax.struct.PyTreeNode):
    """The copies the train step's products read: the student's, and the teacher's when it is one model."""

    student: Copies
    teacher: Copies | None  # None for an ensemble teacher (the vote), whose members are cast at use

    @classmethod
    def of(cls, student: Params, teacher: Params | None, dtype: Any) -> WeightCopies:
        return cls(student=of(student, dtype), teacher=None if teacher is None else of(teacher, dtype))

    def dtype(self) -> Any:
        return dtype_of(self.student)


def dtype_of(copies: Copies) -> Any:
    """The compute dtype the copies are in."""
    return jax.tree.leaves(copies)[0].dtype
