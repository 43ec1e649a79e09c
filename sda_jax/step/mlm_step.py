"""Masked-LM pretraining's state and its jitted steps: AdamW on the predicted tokens' cross-entropy, and the held-out sums.

`mlm_train_step(state, batch, rng)` is pure and jitted once per bucket length with the state
donated; `mlm_eval_step` gives a held-out batch's summed loss, correct argmaxes and count.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sda_jax.config import Settings
from sda_jax.data.masking import max_predictions
from sda_jax.kernels import weight_copies
from sda_jax.models.masked_lm import mlm_loss
from sda_jax.parallel import distributed
from sda_jax.step import optim
from sda_jax.step.hyperparameters import Hyperparameters

Params = Any


@flax.struct.dataclass
class MlmState:
    step: jax.Array  # int32: train steps taken
    params: Params  # BertForMaskedLM's
    opt_state: optax.OptState
    hyper: Hyperparameters  # the schedule and weight decay as arrays: the programs depend on neither
    weight_copies: weight_copies.Copies | None  # the 16-bit weight matrices the products read, where the model's forms keep them

    def parameter_sets(self) -> tuple[Any, ...]:
        return (self.params,)


def create_state(
    params: Params, hyper: Hyperparameters, settings: Settings, compute_dtype: Any = jnp.float32, copies: bool = False
) -> MlmState:
    """The state before step 1 (`copies`: with the 16-bit weight copies the model's forms read)."""
    copies = weight_copies.of(params, compute_dtype) if copies else None
    return MlmState(step=jnp.zeros([], jnp.int32), params=params, opt_state=optim.make_optimizer(settings.optim).init(params),
                    hyper=hyper, weight_copies=copies)  # fmt: skip


def _forward(model: Any, params: Params, batch: dict[str, jax.Array], **kwargs) -> jax.Array:
    inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    return model.apply({"params": params}, *inputs, positions=batch["mlm_positions"], **kwargs)


def mlm_train_step(
    state: MlmState, batch: dict[str, jax.Array], rng: jax.Array, *, model: Any, settings: Settings
) -> tuple[MlmState, dict[str, jax.Array]]:
    """One AdamW step on the mean cross-entropy of the batch's predicted tokens. Pure."""
    rngs = {"dropout": jax.random.fold_in(rng, state.step)}

    def loss_fn(params):
        logits = _forward(model, weight_copies.substitute(params, state.weight_copies), batch, deterministic=False, rngs=rngs)
        loss, correct, count = mlm_loss(logits, batch["mlm_targets"], batch["mlm_weights"])
        return loss, correct / jnp.maximum(count, 1.0)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    tx = optim.make_optimizer(settings.optim, weight_decay=state.hyper.weight_decay)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, learning_rate=state.hyper.schedule(state.step))
    params = optax.apply_updates(state.params, updates)
    copies = None if state.weight_copies is None else weight_copies.of(params, weight_copies.dtype_of(state.weight_copies))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, weight_copies=copies)
    return new_state, {"loss": loss, "accuracy": accuracy}


def mlm_eval_step(params: Params, batch: dict[str, jax.Array], *, model: Any) -> dict[str, jax.Array]:
    """The summed cross-entropy, correct argmaxes and count of a held-out batch's predicted tokens."""
    loss, correct, count = mlm_loss(_forward(model, params, batch, deterministic=True), batch["mlm_targets"], batch["mlm_weights"])
    return {"nll": loss * count, "correct": correct, "count": count}


def abstract_state(
    param_shapes: Any, settings: Settings, total_steps: int, compute_dtype: Any, mesh: Any, models: Any, copies: bool = False
) -> Any:
    """The state's shapes and shardings, with nothing allocated (`run.prepare`'s memory check)."""
    create = functools.partial(create_state, settings=settings, compute_dtype=compute_dtype, copies=copies)
    shapes = jax.eval_shape(create, param_shapes, models.hyperparameters(settings, total_steps))
    return models.abstract(shapes, mesh)


def abstract_batch(settings: Settings, length: int, mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """A device batch of `length` tokens with its predictions, for compiling ahead."""
    rows, sharding = settings.train.batch_size, distributed.batch_sharding(mesh)
    predictions = max_predictions(length, settings.pretrain.mask_prob)
    matrix = lambda dtype: jax.ShapeDtypeStruct((rows, predictions), dtype, sharding=sharding)
    batch = distributed.abstract_batch(rows, length, mesh)
    return {**batch, "mlm_positions": matrix(np.int32), "mlm_targets": matrix(np.int32), "mlm_weights": matrix(np.float32)}
