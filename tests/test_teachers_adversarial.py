"""The SDA paper's teacher variants and FGM/PGD adversarial training, against hand computations."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax import adversarial, distill, input_pipeline, optim
from sda_jax.models import BertConfig, BertForSequenceClassification, init_params
from sda_jax.settings import OptimSettings
from sda_jax.train import StepConfig, create_train_state, train_step

CONFIG = BertConfig(
    vocab_size=21128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip
OPTIM = OptimSettings(
    learning_rate=1e-3, warmup_ratio=0.0, weight_decay=0.01, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
    adam_bias_correction=True, lookahead_k=0, lookahead_alpha=1.0, max_grad_norm=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def batches(afqmc_dir, bert_base_chinese_dir):
    tokenizer = input_pipeline.load_tokenizer(bert_base_chinese_dir)
    examples = input_pipeline.read_clue_file(afqmc_dir / "dev.json", ["0", "1"], require_labels=True)
    encoded = input_pipeline.encode(examples, tokenizer, 32)
    stream = input_pipeline.eval_batches(encoded, batch_size=16, bucket_lengths=(32,))
    return [next(stream) for _ in range(4)]


def make_step(learning_rate=1e-3, **step_options):
    model = BertForSequenceClassification(CONFIG)
    tx = optim.make_optimizer(dataclasses.replace(OPTIM, learning_rate=learning_rate), total_steps=100)
    config = StepConfig(
        kd_coeff=1.0, teacher_decay=0.995, eval_ema_decay=0.999, eval_ema_start_step=0, lookahead_k=0,
        lookahead_alpha=1.0, loss_scaling=False, **step_options,
    )  # fmt: skip
    state = create_train_state(init_params(CONFIG, jax.random.key(0)), tx, config)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config))
    return model, state, step


def logits_of(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])


def expected_kd(student_logits, teacher_logits, weights):
    real = np.asarray(weights) > 0
    return np.mean((np.asarray(student_logits)[real] - np.asarray(teacher_logits)[real]) ** 2)


@pytest.mark.parametrize("teacher", ["ema", "window", "vote"])
def test_teacher_variants_match_hand_computation(batches, teacher):
    model, state, step = make_step(teacher=teacher, teacher_window=2)
    students = [state.params]
    rng = jax.random.key(1)
    for t, batch in enumerate(batches[:3], start=1):
        # The teacher this step distils from, computed by hand from the students seen so far.
        if teacher == "ema":
            expected_teacher = students[0]
            for i, student in enumerate(students[1:], start=1):
                expected_teacher = jax.tree.map(
                    lambda e, s, i=i: e - (1 - min(0.995, (1 + i) / (10 + i))) * (e - s), expected_teacher, student
                )
            teacher_logits = logits_of(model, expected_teacher, batch)
        else:
            window = ([students[0]] * 2 + students[1:])[-2:]  # initial params fill the empty slots
            if teacher == "window":
                teacher_logits = logits_of(model, jax.tree.map(lambda a, b: (a + b) / 2, *window), batch)
            else:
                teacher_logits = (logits_of(model, window[0], batch) + logits_of(model, window[1], batch)) / 2
        student_logits = logits_of(model, state.params, batch)  # dropout is off
        state, metrics = step(state, batch, rng)
        np.testing.assert_allclose(metrics["kd"], expected_kd(student_logits, teacher_logits, batch["weights"]), rtol=2e-4, atol=1e-9)
        students.append(state.params)
        assert float(metrics["kd"]) > 0 or t == 1
    if teacher != "ema":
        expected = jax.tree.map(lambda a, b: (a + b) / 2, students[-2], students[-1])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.teacher_params, expected)


def test_snapshot_ring_buffer():
    snapshots = distill.init_snapshots({"w": jnp.array([0.0])}, 3)
    for step, value in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]:
        snapshots = distill.push_snapshot(snapshots, {"w": jnp.array([value])}, jnp.int32(step))
    np.testing.assert_array_equal(snapshots["w"][:, 0], [3.0, 4.0, 2.0])
    np.testing.assert_allclose(distill.snapshot_average(snapshots)["w"], [3.0])


def test_perturbation_norms():
    grad = jax.random.normal(jax.random.key(0), (50, 8))
    r = adversarial.fgm_perturbation(grad, 0.7)
    np.testing.assert_allclose(jnp.linalg.norm(r), 0.7, rtol=1e-5)
    np.testing.assert_allclose(r / 0.7, grad / jnp.linalg.norm(grad), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(adversarial.fgm_perturbation(jnp.zeros((3, 2)), 1.0)).max()) == 0.0
    r = jnp.zeros_like(grad)
    norms = []
    for _ in range(5):
        r = adversarial.pgd_perturbation(r, grad, alpha=0.3, epsilon=1.0)
        norms.append(float(jnp.linalg.norm(r)))
    np.testing.assert_allclose(norms, [0.3, 0.6, 0.9, 1.0, 1.0], rtol=1e-5)


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_adversarial_training_changes_gradients_and_loss_still_falls(batches, method):
    _, plain_state, plain_step = make_step(learning_rate=5e-3)
    _, state, step = make_step(learning_rate=5e-3, adversarial_method=method, adversarial_epsilon=1.0, adversarial_alpha=0.4, adversarial_steps=3)
    rng = jax.random.key(2)
    plain_next, _ = plain_step(plain_state, batches[0], rng)
    losses = []
    for i in range(40):
        state, metrics = step(state, batches[i % len(batches)], rng)
        losses.append(float(metrics["ce"]))
        if i == 0:
            moved = np.abs(np.asarray(state.params["classifier"]["kernel"]) - np.asarray(plain_next.params["classifier"]["kernel"]))
            assert moved.max() > 0  # the adversarial gradients changed the update
    # Same four batches in the first and the last cycle: the clean cross-entropy has come down.
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses
