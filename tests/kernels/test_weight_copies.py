"""The 16-bit weight copies of the train state (`sda_jax/kernels/weight_copies.py`): a step that reads
them computes what a step that casts its float32 weights at use computes, bit for bit, and
leaves copies that are the casts of its new weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax import kernels
from sda_jax.data.tokenization import Encoded
from sda_jax.evaluation import evaluate
from sda_jax.kernels import weight_copies
from sda_jax.models.bert import BertForSequenceClassification, init_params
from sda_jax.models.masked_lm import BertForMaskedLM, init_mlm_params
from sda_jax.parallel import distributed
from sda_jax.step import mlm_step, sda
from sda_jax.step.hyperparameters import Hyperparameters
from sda_jax.step.model_axis import Models
from sda_jax.step.train_step import create_train_state, train_step
from tests.conftest import settings_with, tiny_model

CONFIG = tiny_model()


def _batch(step: int) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(100 + step), 2)
    mask = (jnp.arange(16)[None, :] < jnp.array([16, 11, 7, 13])[:, None]).astype(jnp.int32)
    return {
        "input_ids": jax.random.randint(keys[0], (4, 16), 1, 100) * mask, "token_type_ids": (jnp.arange(16) >= 6)[None].repeat(4, 0).astype(jnp.int32) * mask,
        "attention_mask": mask, "labels": jax.random.randint(keys[1], (4,), 0, 2), "weights": jnp.ones((4,), jnp.float32),
    }  # fmt: skip


@pytest.mark.parametrize(
    "dtype, layers, scan_layers, teacher", [(jnp.bfloat16, 2, True, "window"), (jnp.float16, 1, False, "vote")]
)
def test_a_step_reading_the_copies_is_a_step_casting_at_use(dtype, layers, scan_layers, teacher):
    """Two steps with dropout, from the same state, with its copies and without them (the state
    with `weight_copies=None` casts at use, as every step did before): every parameter set, the
    optimizer state (fp16: the loss scale too) and the loss bit for bit; the copies are the casts
    of the new parameters. Scanned layers with a window teacher's copy; a vote teacher, which
    keeps none."""
    config = CONFIG.replace(num_hidden_layers=layers)
    model = BertForSequenceClassification(config, dtype=dtype, scan_layers=scan_layers, forms=kernels.XLA)
    settings = settings_with(sda__teacher=teacher, sda__teacher_window=2)
    params = init_params(config, jax.random.key(0), scan_layers=scan_layers)
    state = create_train_state(params, Hyperparameters.of(settings, 100), settings, compute_dtype=dtype, weight_copies=True)
    assert state.weight_copies is not None and (state.weight_copies.teacher is None) == (teacher == "vote")
    step = jax.jit(lambda state, batch: train_step(state, batch, jax.random.key(1), model=model, settings=settings))
    with_copies, at_use = state, state.replace(weight_copies=None)
    for i in range(2):
        with_copies, metrics = step(with_copies, _batch(i))
        at_use, want_metrics = step(at_use, _batch(i))
        np.testing.assert_array_equal(metrics["loss"], want_metrics["loss"])
    assert at_use.weight_copies is None
    jax.tree.map(np.testing.assert_array_equal, with_copies.replace(weight_copies=None), at_use)
    want = weight_copies.WeightCopies.of(
        at_use.params, None if teacher == "vote" else at_use.teacher.one_model(), dtype
    )  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, with_copies.weight_copies, want)
    assert all(c.dtype == dtype for c in jax.tree.leaves(with_copies.weight_copies))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), at_use.params, state.params)
    assert max(jax.tree.leaves(moved)) > 0


def test_copies_are_the_weight_matrices_only_and_float32_keeps_none():
    params = init_params(CONFIG, jax.random.key(0))
    copies = weight_copies.of(params, jnp.bfloat16)
    paths = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(copies)]
    assert paths and all(path[-1] == "kernel" for path in paths)
    assert ("bert", "embeddings", "word_embeddings", "embedding") not in paths
    settings = settings_with()
    state = create_train_state(params, Hyperparameters.of(settings, 100), settings, compute_dtype=jnp.float32)
    assert state.weight_copies is None


def test_the_copy_passes_its_gradient_to_the_float32_weights():
    """`substitute` reads the copy forward and gives the float32 leaf the cast's gradient."""
    w = jax.random.normal(jax.random.key(0), (8, 4))
    x = jax.random.normal(jax.random.key(1), (3, 8)).astype(jnp.bfloat16)
    copy = weight_copies.of({"dense": {"kernel": w}}, jnp.bfloat16)

    def loss(params, copies):
        kernel = weight_copies.substitute(params, copies)["dense"]["kernel"]
        return jnp.sum((x @ kernel.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)

    got = jax.grad(loss)({"dense": {"kernel": w}}, copy)
    want = jax.grad(loss)({"dense": {"kernel": w}}, None)
    assert got["dense"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(got["dense"]["kernel"], want["dense"]["kernel"])
    # The forward reads the copy, not the float32 leaf (here made to differ).
    stale = {"dense": {"kernel": jnp.zeros_like(w)}}
    assert float(loss(stale, copy)) == float(loss({"dense": {"kernel": w}}, None)) > 0


def test_evaluation_scores_sets_cast_once_as_it_scored_them_cast_at_use():
    """A 16-bit evaluation casts each set's weight matrices once (`weight_copies.cast`) and its
    programs read them: every example's logits of a one-model set and of a vote, bit for bit
    those of the program that casts at use."""
    model = BertForSequenceClassification(CONFIG, dtype=jnp.bfloat16, forms=kernels.XLA)
    params, other = (init_params(CONFIG, jax.random.key(i)) for i in range(2))
    vote = sda.VoteTeacher(snapshots=jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other))
    sets = (sda.Current(params), vote)
    programs = evaluate.EvalPrograms(model, distributed.make_mesh(1), Models.of_seeds((0,)), (16,), 4, None)
    cast = programs.cast_fn(sets)
    assert cast[0].params["bert"]["pooler"]["dense"]["kernel"].dtype == jnp.bfloat16
    assert cast[1].snapshots["bert"]["embeddings"]["word_embeddings"]["embedding"].dtype == jnp.float32
    abstract = programs.cast(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sets))
    assert jax.tree.map(lambda x: x.dtype, abstract) == jax.tree.map(lambda x: x.dtype, cast)
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 17, size=10).astype(np.int32)
    token_ids = rng.integers(1, 100, size=(10, 16)).astype(np.int32) * (np.arange(16) < lengths[:, None])
    encoded = Encoded(token_ids, lengths, np.minimum(lengths, 5).astype(np.int32), None, list(range(10)), 0)
    got = programs.logits(sets, encoded)
    at_use = evaluate.EvalPrograms(model, distributed.make_mesh(1), Models.of_seeds((0,)), (16,), 4, None)
    at_use.cast_fn = lambda tree: tree  # the sets as the train state holds them: cast in each batch's program
    want = at_use.logits(sets, encoded)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (1, 10, 2)
        np.testing.assert_array_equal(g, w)


def test_a_masked_lm_step_reading_the_copies_is_a_step_casting_at_use():
    """Pretraining's step (bf16, dropout, one layer): the same state, loss and accuracy bit for bit
    with the copies and without them; the copies follow the weights."""
    config = CONFIG.replace(num_hidden_layers=1)
    model = BertForMaskedLM(config, jnp.bfloat16, False, forms=kernels.XLA)
    settings = settings_with()
    params = init_mlm_params(config, jax.random.key(0), scan_layers=False)
    state = mlm_step.create_state(params, Hyperparameters.of(settings, 100), settings, compute_dtype=jnp.bfloat16, copies=True)
    assert state.weight_copies is not None
    assert mlm_step.create_state(params, Hyperparameters.of(settings, 100), settings).weight_copies is None
    batch = _batch(0)
    batch = {**batch, "mlm_positions": jnp.tile(jnp.arange(0, 16, 4), (4, 1)), "mlm_targets": batch["input_ids"][:, ::4],
             "mlm_weights": jnp.ones((4, 4), jnp.float32)}  # fmt: skip
    step = jax.jit(
        lambda state, batch: mlm_step.mlm_train_step(state, batch, jax.random.key(1), model=model, settings=settings)
    )
    with_copies, at_use = state, state.replace(weight_copies=None)
    for _ in range(2):
        with_copies, metrics = step(with_copies, batch)
        at_use, want_metrics = step(at_use, batch)
        jax.tree.map(np.testing.assert_array_equal, metrics, want_metrics)
    jax.tree.map(np.testing.assert_array_equal, with_copies.replace(weight_copies=None), at_use)
    jax.tree.map(
        np.testing.assert_array_equal, with_copies.weight_copies, weight_copies.of(at_use.params, jnp.bfloat16)
    )
