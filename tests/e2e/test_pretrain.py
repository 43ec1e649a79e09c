"""Task-adaptive pretraining: the masked-LM head against transformers, the masking, and
a short MLM run end to end (resume, export, fill-mask, fine-tuning from the export).

The model is a tiny random BERT with the real 21,128-token vocabulary (the decoder is tied to
that table, so the vocabulary is what the head's parity is about); one short run is shared by the
tests that need one.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sda_jax.hf.convert import load_pretrained_models, state_dict_from_params
from sda_jax.models.config import BertConfig
from sda_jax.models.masked_lm import BertForMaskedLM
from tests.conftest import TINY_RUN, flags_of, load_train_state, one_line_error, read_records, train_in_process

VOCAB = 21128
TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 64}


def hf_mlm(cls, config_cls, seed: int = 0, **extra):
    """A tiny transformers masked-LM model, O(1) random weights (LayerNorm included), eval mode."""
    torch.manual_seed(seed)
    model = cls(config_cls(vocab_size=VOCAB, attn_implementation="eager", **TINY, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def inputs(seed: int = 0, batch: int = 4, length: int = 24):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (batch, length)).astype(np.int32)
    types = rng.integers(0, 2, (batch, length)).astype(np.int32)
    mask = (np.arange(length)[None, :] < np.array([length, 17, 5, 11])[:, None]).astype(np.int32)
    return ids * mask, types * mask, mask


@functools.cache
def _apply(config: BertConfig, scan_layers: bool):
    return jax.jit(BertForMaskedLM(config, scan_layers=scan_layers).apply)


@pytest.mark.parametrize("kind", ["bert", "ernie"])
def test_mlm_logits_equal_transformers(tmp_path, kind):
    if kind == "bert":
        model = hf_mlm(transformers.BertForMaskedLM, transformers.BertConfig)
    else:
        model = hf_mlm(transformers.ErnieForMaskedLM, transformers.ErnieConfig, use_task_id=True)
    model.save_pretrained(tmp_path)
    config = BertConfig.from_json_file(tmp_path / "config.json")
    ids, types, mask = inputs()
    with torch.no_grad():
        names = ("input_ids", "token_type_ids", "attention_mask")
        expected = model(**{n: torch.from_numpy(x).long() for n, x in zip(names, (ids, types, mask))}).logits.numpy()
    for scan in (True,):  # the unrolled layout converts as the classifier's does (tests/models/test_models.py)
        [params], report = load_pretrained_models(tmp_path, config, [jax.random.key(0)], scan, masked_lm=True)
        assert not report.unused and not report.initialized, report.summary()
        ours = np.asarray(_apply(config, scan)({"params": params}, ids, types, mask))
        real = mask.astype(bool)
        delta = float(np.abs(ours[real] - expected[real]).max())
        print(f"parity: {kind} scan={scan} max |Δlogit| {delta:.2e} (logits up to {np.abs(expected[real]).max():.1f})")
        assert delta < 1e-5
        # The head on the gathered positions alone gives those rows' logits.
        positions = np.array([[0, 3, 7], [1, 2, 16], [4, 0, 0], [10, 5, 9]], np.int32)
        gathered = np.asarray(_apply(config, scan)({"params": params}, ids, types, mask, positions=positions))
        np.testing.assert_allclose(gathered, np.take_along_axis(ours, positions[..., None], 1), atol=1e-5)
        # And back: our params are the file's tensors, the tied decoder left to transformers.
        state = state_dict_from_params(params, config.model_type)
        reference = {k: v.numpy() for k, v in model.state_dict().items() if not k.startswith("cls.predictions.decoder")}
        assert state.keys() == reference.keys() - {f"{config.model_type}.embeddings.position_ids"}
        for key, value in state.items():
            np.testing.assert_array_equal(value, reference[key], err_msg=key)


def test_mlm_head_is_fresh_from_a_classifier_and_the_classifier_unused(tmp_path):
    classifier = hf_mlm(transformers.BertForSequenceClassification, transformers.BertConfig)
    classifier.save_pretrained(tmp_path)
    config = BertConfig.from_json_file(tmp_path / "config.json")
    [params], report = load_pretrained_models(tmp_path, config, [jax.random.key(0)], masked_lm=True)
    assert "masked-LM head" in report.summary() and "classifier.weight" in report.unused and "bert.pooler.dense.weight" in report.unused
    head = params["cls"]["predictions"]
    np.testing.assert_array_equal(head["transform"]["LayerNorm"]["scale"], np.ones(32))
    np.testing.assert_array_equal(head["bias"], np.zeros(VOCAB))
    assert 0.01 < float(jnp.std(head["transform"]["dense"]["kernel"])) < 0.03  # HF's N(0, 0.02)


# --- masking --------------------------------------------------------------------------------------

SPECIALS_CHECKED = ("[CLS]", "[SEP]", "[PAD]")


@pytest.fixture(scope="module")
def dev_inputs(afqmc_dir, bert_base_chinese_dir):
    """AFQMC's dev pairs, encoded as pretraining encodes them (about 100k tokens)."""
    from sda_jax.data import tokenization
    from sda_jax.data.clue_files import read_clue_file

    tokenizer = tokenization.load_tokenizer(bert_base_chinese_dir)
    examples = read_clue_file(afqmc_dir / "dev.json", ("0", "1"), require_labels=False, label_key=None)
    return examples, tokenization.encode(examples, tokenizer, 64), tokenizer


def _mask(encoded, words, tokenizer, epoch, seed=2021, **changes):
    import dataclasses

    from sda_jax.config import PretrainSettings
    from sda_jax.data import masking

    specials = sorted(set(tokenizer.all_special_ids))
    return masking.mask(
        encoded, words, dataclasses.replace(PretrainSettings(), **changes), mask_id=tokenizer.mask_token_id,
        random_ids=np.setdiff1d(np.arange(len(tokenizer)), specials), seed=seed, epoch=epoch,
    )  # fmt: skip


def test_masking_statistics_on_a_fixed_seed(dev_inputs):
    from sda_jax.data import masking

    _, encoded, tokenizer = dev_inputs
    specials = sorted(set(tokenizer.all_special_ids))
    words = masking.token_words(encoded, specials)
    masked = _mask(encoded, words, tokenizer, epoch=0)
    predicted = masked.weights > 0
    rows = np.nonzero(predicted)[0]
    positions = masked.positions[predicted]
    candidates = int((words >= 0).sum())
    rate = predicted.sum() / candidates
    original = encoded.token_ids[rows, positions]
    shown = masked.token_ids[rows, positions]
    as_mask = np.mean(shown == tokenizer.mask_token_id)
    kept = np.mean(shown == original)
    randomised = 1.0 - as_mask - kept
    n = predicted.sum()
    print(f"masking: {n} of {candidates} candidate tokens predicted ({rate:.4f}); [MASK] {as_mask:.4f}, random {randomised:.4f}, kept {kept:.4f}")
    assert abs(rate - 0.15) < 0.005  # rounded per input: the rounding averages out over 4,316 inputs
    sigma = np.sqrt(0.1 * 0.9 / n)
    assert abs(as_mask - 0.8) < 4 * np.sqrt(0.16 / n) and abs(kept - 0.1) < 4 * sigma and abs(randomised - 0.1) < 4 * sigma
    np.testing.assert_array_equal(masked.targets[predicted], original)
    special_ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS_CHECKED]
    assert not np.isin(original, special_ids).any()  # no special is ever predicted
    unchanged = np.ones(encoded.token_ids.shape, bool)
    unchanged[rows, positions] = False
    np.testing.assert_array_equal(masked.token_ids[unchanged], encoded.token_ids[unchanged])
    assert not np.isin(shown[shown != original], [*special_ids, tokenizer.unk_token_id]).any()  # random tokens are no specials
    again, other = _mask(encoded, words, tokenizer, epoch=0), _mask(encoded, words, tokenizer, epoch=1)
    np.testing.assert_array_equal(again.token_ids, masked.token_ids)
    np.testing.assert_array_equal(again.positions, masked.positions)
    chosen = lambda m: {(row, pos) for row, pos in zip(np.nonzero(m.weights)[0], m.positions[m.weights > 0], strict=True)}
    overlap = len(chosen(other) & chosen(masked)) / n
    assert overlap < 0.25  # every epoch draws anew: ~15% of one epoch's predictions are the next one's by chance


def test_whole_word_masking_masks_every_character_of_a_word_or_none(dev_inputs):
    import jieba

    from sda_jax.data import masking, tokenization
    from sda_jax.data.clue_files import Examples

    examples, encoded, tokenizer = dev_inputs
    head = Examples(examples.text_a[:400], examples.text_b[:400], None, list(range(400)), "dev")
    inputs = tokenization.encode(head, tokenizer, 64)
    words = masking.jieba_words(head, inputs, tokenizer, sorted(set(tokenizer.all_special_ids)))
    masked = _mask(inputs, words, tokenizer, epoch=3, whole_word_masking=True)
    chosen = np.zeros(inputs.token_ids.shape, bool)
    chosen[np.nonzero(masked.weights)[0], masked.positions[masked.weights > 0]] = True
    multi = 0
    for row in range(len(inputs)):
        for word in np.unique(words[row][words[row] >= 0]):
            members = chosen[row, words[row] == word]
            assert members.all() or not members.any(), (row, word)
            multi += members.all() and members.size > 1
    # The groups are jieba's words: row 0's first sentence, segmented, gives its first word's size.
    first = next(iter(jieba.cut(head.text_a[0])))
    assert (words[0] == words[0, 1]).sum() == len(first)
    rate = chosen.sum() / (words >= 0).sum()
    print(f"whole-word masking: {rate:.4f} of the tokens, {multi} words of several characters masked whole")
    assert multi > 50 and 0.12 < rate <= 0.15


# --- a short run: resume, export, fill-mask, fine-tuning from the export ------------------------------

RUN = {
    **{k: v for k, v in TINY_RUN.items() if k != "train.eval_all_params"},
    "train.max_steps": 24, "train.log_every": 3, "train.eval_every": 12, "train.checkpoint_every": 6,
}  # fmt: skip


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, afqmc_dir):
    """The first rows of AFQMC's files: 150 train and 50 test pairs (13 steps an epoch), 60 dev pairs held out."""
    folder = tmp_path_factory.mktemp("afqmc_head")
    for name, rows in (("train", 150), ("dev", 60), ("test", 50)):
        lines = (afqmc_dir / f"{name}.json").read_text(encoding="utf-8").splitlines()[:rows]
        (folder / f"{name}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {f"data.{name}_file": folder / f"{name}.json" for name in ("train", "dev", "test")}


def pretrain_args(workdir, data, *extra):
    return ["--config", "configs/afqmc_tapt.py", f"--workdir={workdir}", *flags_of({**RUN, **data}), *extra]


@pytest.fixture(scope="module")
def tapt_run(tmp_path_factory, small_data, cli):
    workdir = tmp_path_factory.mktemp("tapt") / "run"
    result = cli.run("sda_jax.pretrain", *pretrain_args(workdir, small_data, "--config.train.plot_curves=True"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_metrics_and_summary_have_the_held_out_masked_lm_figures(tapt_run):
    dev = read_records(tapt_run, "dev")
    assert [r["step"] for r in dev] == [12, 24]
    assert {"loss", "accuracy", "perplexity", "predicted_tokens"} <= dev[0].keys()
    assert dev[0]["perplexity"] == pytest.approx(np.exp(dev[0]["loss"]))
    assert {"loss", "accuracy", "learning_rate"} <= read_records(tapt_run, "train")[0].keys()
    summary = json.loads((tapt_run / "summary.json").read_text())
    assert summary["best_heldout_accuracy"] == max(r["accuracy"] for r in dev) and summary["best_heldout_perplexity"] > 1
    assert (tapt_run / "training_curves.png").stat().st_size > 10_000 and any((tapt_run / "tensorboard").iterdir())


def test_sigkill_then_resume_is_bit_identical(tapt_run, tmp_path, small_data, cli):
    import signal
    import time

    workdir = tmp_path / "run"
    process = cli.start("sda_jax.pretrain", *pretrain_args(workdir, small_data))
    folder = workdir / "checkpoints" / "train"
    deadline = time.time() + 300
    while not (folder.is_dir() and any(p.name.isdigit() and int(p.name) >= 6 for p in folder.iterdir())):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    resumed = cli.run("sda_jax.pretrain", *pretrain_args(workdir, small_data), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint of step" in resumed.stdout
    final, reference = load_train_state(workdir, 24), load_train_state(tapt_run, 24)
    assert final.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(final[key], reference[key], err_msg=key)
    assert (workdir / "metrics.jsonl").read_text() == (tapt_run / "metrics.jsonl").read_text()


def test_export_fills_masks_and_fine_tunes(tapt_run, tmp_path, small_data, capsys):
    from sda_jax.export import export

    out = tmp_path / "tapt"
    info = export(tapt_run, out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"] and info["params"] == "student"
    model, loading = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "BertForMaskedLM"
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    answers = transformers.pipeline("fill-mask", model=str(out))("花呗怎么[MASK]款")
    assert len(answers) == 5 and all(a["sequence"].startswith("花 呗 怎 么") for a in answers)
    # Fine-tuning from it: the encoder loaded, the masked-LM head unused, pooler and classifier fresh.
    architecture = {f"model.{k}": None for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")}
    finetune = tmp_path / "finetune"
    summary = train_in_process(finetune, {**RUN, **small_data, **architecture, "model.dir": out, "model.from_scratch": False,
                                          "train.max_steps": 6, "train.eval_every": 6})  # fmt: skip
    printed = capsys.readouterr().out
    assert "Unused checkpoint tensors" in printed and "cls.predictions" in printed and "Fresh classifier" in printed
    assert summary["steps"] == 6
    classifier = tmp_path / "classifier"
    export(finetune, classifier)
    assert type(transformers.AutoModelForSequenceClassification.from_pretrained(classifier)).__name__ == "BertForSequenceClassification"


def test_bad_input_is_one_line_naming_the_file_or_key(tmp_path, small_data, cli):
    broken = tmp_path / "dev.json"
    broken.write_text('{"sentence1": "a", "sentence2": "b"}\n{"sentence1": \n', encoding="utf-8")
    result = cli.run("sda_jax.pretrain", *pretrain_args(tmp_path / "run", {**small_data, "data.dev_file": broken}))
    one_line_error(result, f"{broken}:2", "malformed JSON")
    assert not (tmp_path / "run").exists()
    # The console script's `sda-jax pretrain` is the same command.
    result = cli.run("sda_jax.cli", "pretrain", *pretrain_args(tmp_path / "run", small_data, "--config.pretrain.heldout_split=train"))
    one_line_error(result, "pretrain.heldout_split")


def test_a_workdir_holds_one_kind_of_run(tapt_run, tmp_path):
    import shutil

    from sda_jax.config import Settings
    from sda_jax.errors import InputError
    from sda_jax.workdir.layout import Workdir

    shutil.copytree(tapt_run / "model", tmp_path / "model")
    workdir = Workdir(tmp_path)
    assert workdir.is_masked_lm()
    with workdir.lock() as lock, pytest.raises(InputError, match="holds a masked-LM pretraining run"):
        workdir.prepare(Settings(), fresh=False, lock=lock)  # sda_jax.train's
