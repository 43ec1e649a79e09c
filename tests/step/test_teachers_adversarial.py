"""The SDA paper's teacher variants and FGM/PGD adversarial training, against hand computations.

Also, through the command line: a vote teacher is scored on dev as the vote (the mean logits of
its snapshots) and cannot be exported as one model.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax import export, kernels
from sda_jax.config import Settings
from sda_jax.data import input_pipeline, splits, tokenization
from sda_jax.errors import InputError
from sda_jax.models.bert import BertForSequenceClassification, init_params
from sda_jax.models.config import BertConfig
from sda_jax.step import adversarial, optim, sda
from sda_jax.step.hyperparameters import Hyperparameters
from sda_jax.step.train_step import create_train_state, train_step
from sda_jax.workdir.checkpoints import read_train_state
from sda_jax.workdir.layout import Workdir
from tests.conftest import TINY_RUN, settings_of, settings_with, tiny_model, train_in_process

CONFIG = tiny_model(vocab_size=21128, num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def batches(afqmc_dir, bert_base_chinese_dir):
    tokenizer = tokenization.load_tokenizer(bert_base_chinese_dir)
    data = Settings().data
    encoded = tokenization.encode(splits.read_examples(data, "dev"), tokenizer, 32)
    stream = input_pipeline.eval_batches(encoded, batch_size=16, bucket_lengths=(32,))
    return [next(stream) for _ in range(4)]


def make_step(**overrides):
    model = BertForSequenceClassification(CONFIG)
    settings = settings_with(**overrides)
    state = create_train_state(init_params(CONFIG, jax.random.key(0)), Hyperparameters.of(settings, 100), settings, compute_dtype=jnp.float32)
    step = jax.jit(lambda state, batch, rng: train_step(state, batch, rng, model=model, settings=settings))
    return model, state, step


def logits_of(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])


def expected_kd(student_logits, teacher_logits, weights):
    real = np.asarray(weights) > 0
    return np.mean((np.asarray(student_logits)[real] - np.asarray(teacher_logits)[real]) ** 2)


@pytest.mark.parametrize("teacher", ["ema", "window", "vote"])
def test_teacher_variants_match_hand_computation(batches, teacher):
    model, state, step = make_step(sda__teacher=teacher, sda__teacher_window=2)
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
    expected_members = [students[-2], students[-1]] if teacher != "ema" else None
    if teacher == "window":
        expected = jax.tree.map(lambda a, b: (a + b) / 2, *expected_members)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.teacher.one_model(), expected)
    if teacher == "vote":
        assert state.teacher.one_model() is None  # an ensemble: no one model
        assert sda.plain(state.teacher) is state.teacher  # evaluation runs its snapshots' vote
        jax.tree.map(np.testing.assert_array_equal, state.teacher.snapshots, jax.tree.map(lambda a, b: jnp.stack([a, b]), *expected_members))
    else:
        assert isinstance(sda.plain(state.teacher), sda.Current)  # one model: scored as its parameters


def test_snapshot_ring_buffer():
    window = sda.make_teacher("window", {"w": jnp.array([0.0])}, decay_cap=0.995, window=3)
    for step, value in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]:
        window = window.update({"w": jnp.array([value])}, jnp.int32(step))
    np.testing.assert_array_equal(window.snapshots["w"][:, 0], [3.0, 4.0, 2.0])
    np.testing.assert_allclose(window.one_model()["w"], [3.0])


def test_vote_logits_are_the_mean_of_its_members_logits():
    vote = sda.make_teacher("vote", {"w": jnp.array([1.0])}, decay_cap=0.995, window=2)
    vote = vote.update({"w": jnp.array([3.0])}, jnp.int32(1))
    forward = lambda params: jnp.stack([params["w"] ** 2, -params["w"]], axis=-1)  # nonlinear in the params
    np.testing.assert_allclose(vote.logits(forward), [[5.0, -2.0]])  # mean of (9, -3) and (1, -1)
    window = sda.WindowTeacher(snapshots=vote.snapshots)
    np.testing.assert_allclose(window.logits(forward), [[4.0, -2.0]])  # forward of the mean parameter, 2


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
    _, plain_state, plain_step = make_step(optim__learning_rate=5e-3)
    _, state, step = make_step(
        optim__learning_rate=5e-3, adversarial__method=method, adversarial__epsilon=1.0, adversarial__alpha=0.4,
        adversarial__steps=3,
    )  # fmt: skip
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


# --- A vote teacher in a run ----------------------------------------------------------------------

VOTE_RUN = {
    **TINY_RUN, "train.max_steps": 12, "train.eval_every": 12, "train.log_every": 4, "train.eval_all_params": True,
    "sda.teacher": "vote", "sda.teacher_window": 3, "model.dtype": "float32",
}  # fmt: skip


@pytest.fixture(scope="module")
def vote_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vote") / "run"
    train_in_process(workdir, VOTE_RUN)
    return workdir


def test_vote_teacher_is_scored_as_the_mean_logits_of_its_snapshots(vote_run, bert_base_chinese_dir):
    dev_records = [json.loads(line) for line in (vote_run / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in dev_records if r["split"] == "dev" and r["params"] == "teacher" and r["step"] == 12)
    snapshots = read_train_state(Workdir(vote_run).train_checkpoints, 12)["teacher"]["snapshots"]
    config = BertConfig.from_json_file(vote_run / "model" / "config.json")
    model = BertForSequenceClassification(config)
    dev = splits.read_split(settings_of(VOTE_RUN).data, "dev", tokenization.load_tokenizer(bert_base_chinese_dir))
    apply = jax.jit(lambda params, batch: model.apply(
        {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    ))  # fmt: skip
    logits_per_snapshot = []
    for k in range(3):
        params = jax.tree.map(lambda s, k=k: s[k], snapshots)
        batches = input_pipeline.eval_batches(dev, batch_size=256, bucket_lengths=(64,))
        logits_per_snapshot.append(np.concatenate([np.asarray(apply(params, b))[b["weights"] > 0] for b in batches]))
    vote = np.mean(logits_per_snapshot, axis=0)
    assert not np.allclose(logits_per_snapshot[0], logits_per_snapshot[2])  # the snapshots differ
    accuracy = float(np.mean(vote.argmax(-1) == dev.labels))
    shifted = vote - vote.max(-1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(vote)), dev.labels]))
    assert logged["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert logged["loss"] == pytest.approx(loss, rel=1e-5)
    # ... and not what the parameter mean (a window teacher) would score: apart by far more than
    # float32 rounding of the logits (the snapshots of 12 steps are close, so the gap is small).
    mean_params = jax.tree.map(lambda s: s.mean(0), snapshots)
    batches = input_pipeline.eval_batches(dev, batch_size=256, bucket_lengths=(64,))
    window = np.concatenate([np.asarray(apply(mean_params, b))[b["weights"] > 0] for b in batches])
    assert np.abs(window - vote).max() > 100 * np.finfo(np.float32).eps * np.abs(vote).max()


def test_vote_teacher_cannot_be_exported_as_one_model(vote_run, tmp_path):
    with pytest.raises(InputError) as refused:
        export.export(vote_run, tmp_path / "teacher", "teacher")
    message = str(refused.value)
    assert "not one model" in message and "--params eval_ema" in message and "sda.teacher=window" in message
    assert not (tmp_path / "teacher").exists()
    assert export.export(vote_run, tmp_path / "student", "student")["params"] == "student"


def test_lookahead_with_alpha_one_is_skipped_and_changes_nothing(batches):
    """The recipe's Lookahead(k=5, alpha=1): each sync sets slow := fast, fast := slow, so sda-jax
    keeps no slow weights and runs no sync: bit-identical to no Lookahead at all.

    The reference computes slow + 1 · (fast − slow), which in float32 gives back fast except
    where the subtraction rounds (the two far apart in magnitude, e.g. of opposite signs near
    zero): measured here, 7.5e-4 of the synced weights, each by about one float32 ulp.
    """
    _, with_lookahead, step = make_step(optim__lookahead_k=5, optim__lookahead_alpha=1.0)
    _, without, plain_step = make_step(optim__lookahead_k=None)
    assert with_lookahead.slow_params is None
    rng = jax.random.key(3)
    slow, differing, total = None, 0, 0
    for i in range(12):
        with_lookahead, _ = step(with_lookahead, batches[i % len(batches)], rng)
        without, _ = plain_step(without, batches[i % len(batches)], rng)
        fast = with_lookahead.params
        slow = fast if slow is None else slow
        synced, slow = optim.lookahead_sync(fast, slow, jnp.int32(i + 1), 5, 1.0)
        for a, b in zip(jax.tree.leaves(synced), jax.tree.leaves(fast), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(a, b, rtol=2**-22, atol=1e-9)  # the reference's rounding: an ulp or so
            if i % 5 == 0:  # a sync step (updates 1, 6, 11)
                differing, total = differing + int(np.sum(a != b)), total + a.size
    jax.tree.map(np.testing.assert_array_equal, with_lookahead, without)
    print(f"lookahead: the reference's alpha=1 syncs move {differing} of {total} synced weights, by rounding")
    assert differing < 2e-3 * total


def test_lookahead_with_other_alpha_keeps_slow_weights(batches):
    _, state, step = make_step(optim__lookahead_k=2, optim__lookahead_alpha=0.5)
    assert state.slow_params is not None
    rng = jax.random.key(3)
    state, _ = step(state, batches[0], rng)  # update 1: slow := fast
    jax.tree.map(np.testing.assert_array_equal, state.slow_params, state.params)
    after_1 = state.params
    state, _ = step(state, batches[1], rng)  # update 2: no sync
    state, _ = step(state, batches[2], rng)  # update 3: sync, halfway back towards step 1's weights
    jax.tree.map(np.testing.assert_array_equal, state.slow_params, state.params)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, after_1)
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("teacher", ["ema", "vote"])
def test_16_bit_train_step_sums_nothing_in_16_bits(batches, dtype, teacher):
    """Gradient sums (bias gradients above all, over batch × length rows) stay float32: with JAX
    told to refuse 16-bit sums, the whole step, FGM included, still traces."""
    model = BertForSequenceClassification(CONFIG, dtype=dtype, forms=kernels.XLA)
    settings = settings_with(sda__teacher=teacher, adversarial__method="fgm")
    params, hyper = init_params(CONFIG, jax.random.key(0)), Hyperparameters.of(settings, 100)
    state = create_train_state(params, hyper, settings, compute_dtype=dtype, weight_copies=True)
    step = lambda state, batch: train_step(state, batch, jax.random.key(1), model=model, settings=settings)
    previous = jax.config.jax_allow_f16_reductions
    jax.config.update("jax_allow_f16_reductions", False)
    try:
        new_state, metrics = jax.eval_shape(step, state, batches[0])
    finally:
        jax.config.update("jax_allow_f16_reductions", previous)
    assert new_state.params["classifier"]["bias"].dtype == jnp.float32 and metrics["loss"].dtype == jnp.float32
    assert (new_state.loss_scale is not None) == (dtype == jnp.float16)


def test_an_eval_ema_that_never_starts_is_not_kept(vote_run):
    """The run ends (step 12) before sda.eval_ema_start_step (500): the eval EMA would be the
    student at every step, so the state keeps none and evaluation scores the student for it."""
    state = read_train_state(Workdir(vote_run).train_checkpoints, 12)
    assert state.get("eval_ema") is None and "params" in state and "teacher" in state
    dev = [json.loads(line) for line in (vote_run / "metrics.jsonl").read_text().splitlines()]
    by_name = {r["params"]: r for r in dev if r["split"] == "dev" and r["step"] == 12}
    assert {k: v for k, v in by_name["eval_ema"].items() if k != "params"} == {
        k: v for k, v in by_name["student"].items() if k != "params"
    }
