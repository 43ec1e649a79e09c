"""The data path: file reading (clue_files), tokenization and truncation, the bucketed batch order (input_pipeline)."""

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from sda_jax.data import input_pipeline
from sda_jax.data.clue_files import read_clue_file
from sda_jax.data.input_pipeline import epoch_order, eval_batches, make_batch, steps_per_epoch, train_batches
from sda_jax.data.tokenization import Encoded, encode, load_tokenizer
from sda_jax.errors import InputError

BATCH = 64
MULTIPLIER = 4
BUCKETS = (16, 32, 48, 64, 96, 128)
PAD = 0


# ----------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def tokenizer(bert_base_chinese_dir):
    return load_tokenizer(bert_base_chinese_dir)


@pytest.fixture(scope="module")
def afqmc_train(afqmc_dir):
    return read_clue_file(afqmc_dir / "train.json", ["0", "1"], require_labels=True)


@pytest.fixture(scope="module")
def afqmc_lengths(afqmc_train, tokenizer):
    return encode(afqmc_train, tokenizer, 128).lengths


@pytest.fixture(params=["synthetic", "afqmc"])
def lengths(request):
    """Token lengths to bucket: 1000 synthetic ones (1000 % 64 = 40: one partial batch) or AFQMC's."""
    if request.param == "afqmc":
        return request.getfixturevalue("afqmc_lengths")
    return np.random.default_rng(0).integers(2, 101, size=1000).astype(np.int32)


def marked(lengths: np.ndarray) -> Encoded:
    """An Encoded whose row i holds the token i + 1 at every real position, so batches reveal
    which example each row came from."""
    lengths = np.asarray(lengths, dtype=np.int32)
    n = len(lengths)
    positions = np.arange(lengths.max())
    token_ids = np.where(positions < lengths[:, None], np.arange(1, n + 1)[:, None], PAD)
    return Encoded(
        token_ids=token_ids.astype(np.int32),
        lengths=lengths,
        type0_lengths=np.maximum(lengths // 2, 1).astype(np.int32),
        labels=(np.arange(n) % 3).astype(np.int32),
        ids=list(range(n)),
        pad_id=PAD,
    )


def example_ids(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Indices of the real (weight 1) rows of a batch built from `marked`."""
    return batch["input_ids"][batch["weights"] == 1, 0] - 1


def check_batch(batch: dict[str, np.ndarray], encoded: Encoded, buckets=BUCKETS) -> None:
    width = batch["input_ids"].shape[1]
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert batch[key].shape == (BATCH, width) and batch[key].dtype == np.int32
    assert batch["labels"].shape == (BATCH,) and batch["labels"].dtype == np.int32
    assert batch["weights"].shape == (BATCH,) and batch["weights"].dtype == np.float32
    assert set(np.unique(batch["weights"])) <= {0.0, 1.0}

    real = batch["weights"] == 1
    assert real[: real.sum()].all(), "padding rows come after the real rows"
    ids = example_ids(batch)
    lengths = encoded.lengths[ids]
    assert width in buckets
    assert lengths.max() <= width
    smaller = [b for b in buckets if b < width]
    assert not smaller or lengths.max() > smaller[-1], "not the smallest bucket that fits"
    np.testing.assert_array_equal(batch["attention_mask"][real].sum(axis=1), lengths)
    np.testing.assert_array_equal(batch["labels"][real], encoded.labels[ids])
    for key in ("input_ids", "token_type_ids", "attention_mask", "labels"):
        assert not batch[key][~real].any(), f"padding rows must be zero in {key}"


def first_epoch(encoded: Encoded, seed: int = 3) -> list[dict[str, np.ndarray]]:
    steps = steps_per_epoch(len(encoded), BATCH)
    batches = train_batches(encoded, batch_size=BATCH, bucket_multiplier=MULTIPLIER, bucket_lengths=BUCKETS, seed=seed)
    return list(itertools.islice(batches, steps))


def write_lines(path: Path, rows: list) -> Path:
    """Write JSON lines; a str row is written verbatim (to make malformed lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tokens(tokenizer, encoded: Encoded, row: int) -> list[str]:
    return tokenizer.convert_ids_to_tokens(encoded.token_ids[row, : encoded.lengths[row]].tolist())


# ----------------------------------------------------------------------------- bucketing


def _padded_tokens(lengths, buckets) -> int:
    return int(np.asarray(buckets)[np.searchsorted(buckets, lengths)].sum())


@pytest.mark.parametrize("num_buckets", [1, 2, 3, 4])
def test_fitted_bucket_lengths_pad_least(num_buckets):
    rng = np.random.default_rng(num_buckets)
    lengths = np.concatenate([rng.integers(3, 12, 300), rng.integers(20, 24, 100), rng.integers(2, 30, 50)])
    fitted = input_pipeline.fit_bucket_lengths(lengths, num_buckets, max_len=30)
    assert fitted[-1] == 30 and len(fitted) <= num_buckets and list(fitted) == sorted(set(fitted))
    # Brute force over every set of num_buckets - 1 lengths below 30.
    best = min(
        _padded_tokens(lengths, (*below, 30)) for below in itertools.combinations(range(2, 30), num_buckets - 1)
    )
    assert _padded_tokens(lengths, fitted) == best


def test_fitted_bucket_lengths_on_afqmc(afqmc_lengths):
    lengths = np.minimum(afqmc_lengths, 64)
    fitted = input_pipeline.fit_bucket_lengths(lengths, 8, max_len=64)
    assert len(fitted) == 8 and fitted[-1] == 64
    # Fewer padding tokens than evenly spaced buckets with the same compile count, and more buckets
    # never pad more.
    assert _padded_tokens(lengths, fitted) < _padded_tokens(lengths, (8, 16, 24, 32, 40, 48, 56, 64))
    assert input_pipeline.padded_fraction(lengths, fitted) <= input_pipeline.padded_fraction(
        lengths, input_pipeline.fit_bucket_lengths(lengths, 4, max_len=64)
    )
    few = input_pipeline.fit_bucket_lengths(np.array([5, 5, 9]), 8, max_len=64)
    assert few == (5, 9, 64)  # no more lengths than help


def test_steps_per_epoch(afqmc_train):
    assert len(afqmc_train) == 34_334
    assert steps_per_epoch(len(afqmc_train), 64) == 537
    assert steps_per_epoch(64, 64) == 1
    assert steps_per_epoch(65, 64) == 2


def test_one_epoch_visits_every_example_once(lengths):
    encoded = marked(lengths)
    batches = first_epoch(encoded)
    assert len(batches) == math.ceil(len(lengths) / BATCH)
    seen = np.concatenate([example_ids(batch) for batch in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(lengths)))
    for batch in batches:
        check_batch(batch, encoded)


def test_partial_batch_is_filled_with_zero_weight_rows():
    encoded = marked(np.random.default_rng(1).integers(2, 101, size=1000))
    real_rows = [int(batch["weights"].sum()) for batch in first_epoch(encoded)]
    assert sorted(real_rows) == [1000 % BATCH] + [BATCH] * (1000 // BATCH)


def test_order_is_a_function_of_seed_and_epoch(lengths):
    def order(seed: int, epoch: int) -> list[np.ndarray]:
        return epoch_order(lengths, batch_size=BATCH, bucket_multiplier=MULTIPLIER, seed=seed, epoch=epoch)

    def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    assert same(order(7, 2), order(7, 2))
    assert not same(order(7, 2), order(7, 3))
    assert not same(order(7, 2), order(8, 2))


def test_batches_are_length_sorted_within_chunks(lengths):
    batches = epoch_order(lengths, batch_size=BATCH, bucket_multiplier=MULTIPLIER, seed=5, epoch=0)
    chunks = [batches[i : i + MULTIPLIER] for i in range(0, len(batches), MULTIPLIER)]
    shuffled_chunks = 0
    for chunk in chunks:
        by_length = sorted(chunk, key=lambda b: lengths[b].min())
        for shorter, longer in itertools.pairwise(by_length):
            assert lengths[shorter].max() <= lengths[longer].min()
        shuffled_chunks += [id(b) for b in by_length] != [id(b) for b in chunk]
    assert shuffled_chunks > 0, "the batches of a chunk should come in random order"

    def mean_padding(order: list[np.ndarray]) -> float:
        return float(np.mean(np.concatenate([lengths[b].max() - lengths[b] for b in order])))

    permutation = np.random.default_rng(0).permutation(len(lengths))
    random_batches = [permutation[i : i + BATCH] for i in range(0, len(lengths), BATCH)]
    assert mean_padding(batches) < 0.5 * mean_padding(random_batches)


def test_start_step_equals_skipping_batches(monkeypatch):
    encoded = marked(np.random.default_rng(2).integers(2, 101, size=1000))
    per_epoch = steps_per_epoch(len(encoded), BATCH)

    def run(start_step: int):
        return train_batches(
            encoded,
            batch_size=BATCH,
            bucket_multiplier=MULTIPLIER,
            bucket_lengths=BUCKETS,
            seed=11,
            start_step=start_step,
        )

    reference = list(itertools.islice(run(0), 2 * per_epoch + 4))
    assert not np.array_equal(example_ids(reference[0]), example_ids(reference[per_epoch]))
    for start in (1, per_epoch - 2, per_epoch, per_epoch + 3, 2 * per_epoch - 1):
        resumed = list(itertools.islice(run(start), 4))
        for got, want in zip(resumed, reference[start : start + 4], strict=True):
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])

    calls = []
    real_make_batch = input_pipeline.make_batch

    def counting_make_batch(*args, **kwargs):
        calls.append(1)
        return real_make_batch(*args, **kwargs)

    monkeypatch.setattr(input_pipeline, "make_batch", counting_make_batch)
    next(run(per_epoch + 3))
    assert len(calls) == 1, "skipped batches must not be built"


def test_eval_batches_cover_each_example_once_in_file_order(lengths):
    encoded = marked(lengths)
    batches = list(eval_batches(encoded, batch_size=BATCH, bucket_lengths=BUCKETS))
    assert len(batches) == math.ceil(len(lengths) / BATCH)
    seen = np.concatenate([example_ids(batch) for batch in batches])
    np.testing.assert_array_equal(seen, np.arange(len(lengths)))
    for batch in batches:
        check_batch(batch, encoded)
    assert batches[-1]["weights"].sum() == len(lengths) - BATCH * (len(batches) - 1)


def test_eval_order_visits_by_length_and_restores_file_order(lengths):
    encoded = marked(lengths)
    order = input_pipeline.eval_order(encoded)
    batches = list(eval_batches(encoded, batch_size=BATCH, bucket_lengths=BUCKETS, order=order))
    seen = np.concatenate([example_ids(batch) for batch in batches])
    np.testing.assert_array_equal(seen, order)
    assert np.all(np.diff(encoded.lengths[order]) >= 0)
    restored = np.empty_like(seen)
    restored[order] = seen
    np.testing.assert_array_equal(restored, np.arange(len(lengths)))
    # Sorted, the batches pad less than in file order.
    widths = lambda bs: sum(b["input_ids"].shape[1] for b in bs)
    assert widths(batches) < widths(list(eval_batches(encoded, batch_size=BATCH, bucket_lengths=BUCKETS)))


def test_make_batch_copies_rows_and_token_types():
    encoded = marked(np.array([5, 9, 3, 12]))
    indices = np.array([3, 0, 2])
    # A bucket wider than the stored rows (12) must still work.
    batch = make_batch(encoded, indices, batch_size=BATCH, bucket_lengths=(8, 40))
    assert batch["input_ids"].shape == (BATCH, 40)
    for row, index in enumerate(indices):
        length, type0 = encoded.lengths[index], encoded.type0_lengths[index]
        expected_ids = np.zeros(40, dtype=np.int32)
        expected_ids[:length] = index + 1
        np.testing.assert_array_equal(batch["input_ids"][row], expected_ids)
        expected_types = (np.arange(40) >= type0) & (np.arange(40) < length)
        np.testing.assert_array_equal(batch["token_type_ids"][row], expected_types)
    check_batch(batch, encoded, buckets=(8, 40))


# ----------------------------------------------------------------------------- tokenization


def test_pair_layout_and_token_types(tmp_path, tokenizer):
    path = write_lines(tmp_path / "pair.json", [{"sentence1": "你好吗", "sentence2": "很好", "label": "1"}])
    encoded = encode(read_clue_file(path, ["0", "1"], require_labels=True), tokenizer, 32)
    assert tokens(tokenizer, encoded, 0) == ["[CLS]", "你", "好", "吗", "[SEP]", "很", "好", "[SEP]"]
    batch = make_batch(encoded, np.array([0]), batch_size=2, bucket_lengths=(16,))
    np.testing.assert_array_equal(batch["token_type_ids"][0], [0] * 5 + [1] * 3 + [0] * 8)
    np.testing.assert_array_equal(batch["attention_mask"][0], [1] * 8 + [0] * 8)
    np.testing.assert_array_equal(batch["labels"], [1, 0])
    np.testing.assert_array_equal(batch["weights"], [1.0, 0.0])


def test_longest_first_truncation(tmp_path, tokenizer):
    rows = [
        {"sentence1": "一二三四五六七八九十", "sentence2": "甲乙丙"},  # 10 + 3 > 7: the first loses 6
        {"sentence1": "甲乙", "sentence2": "一二三四五六七八九十"},  # the second loses 5
        {"sentence1": "一二三四五六", "sentence2": "甲乙丙丁戊己"},  # both too long: 3 + 4 (tie)
    ]
    path = write_lines(tmp_path / "long.json", rows)
    encoded = encode(read_clue_file(path, ["0"], require_labels=False), tokenizer, 10)
    assert tokens(tokenizer, encoded, 0) == ["[CLS]", *"一二三四", "[SEP]", *"甲乙丙", "[SEP]"]
    assert tokens(tokenizer, encoded, 1) == ["[CLS]", *"甲乙", "[SEP]", *"一二三四五", "[SEP]"]
    assert encoded.lengths.tolist() == [10, 10, 10]
    # On a tie the tokenizers library keeps the extra token in the second text.
    reference = tokenizer([rows[2]["sentence1"]], [rows[2]["sentence2"]], truncation="longest_first", max_length=10)
    assert tokens(tokenizer, encoded, 2) == tokenizer.convert_ids_to_tokens(reference["input_ids"][0])


def test_reference_truncation_cuts_the_tail_and_reappends_sep(tmp_path, tokenizer):
    rows = [
        {"sentence1": "一二三四五六七八九十", "sentence2": "甲乙丙"},  # a alone fills the budget: b is gone
        {"sentence1": "甲乙", "sentence2": "一二三四五六七八九十"},  # b keeps its first 5 tokens
        {"sentence1": "一二三四五六七", "sentence2": "甲乙"},  # a ends at position 8: [SEP] [SEP], no b token
        {"sentence1": "一二三", "sentence2": "甲乙"},  # short: untouched
        {"sentence1": "一二三四五六七八", "sentence2": "甲"},  # a has exactly max_seq_len - 2 tokens
    ]
    path = write_lines(tmp_path / "long.json", rows)
    encoded = encode(read_clue_file(path, ["0"], require_labels=False), tokenizer, 10, truncation="reference")
    assert tokens(tokenizer, encoded, 0) == ["[CLS]", *"一二三四五六七八", "[SEP]"]
    assert tokens(tokenizer, encoded, 1) == ["[CLS]", *"甲乙", "[SEP]", *"一二三四五", "[SEP]"]
    assert tokens(tokenizer, encoded, 2) == ["[CLS]", *"一二三四五六七", "[SEP]", "[SEP]"]
    assert tokens(tokenizer, encoded, 3) == ["[CLS]", *"一二三", "[SEP]", *"甲乙", "[SEP]"]
    assert tokens(tokenizer, encoded, 4) == ["[CLS]", *"一二三四五六七八", "[SEP]"]
    batch = make_batch(encoded, np.arange(5), batch_size=5, bucket_lengths=(10,))
    # Token types as the Collator cuts them: the first max_seq_len of the untruncated pair's.
    assert batch["token_type_ids"][0].tolist() == [0] * 10
    assert batch["token_type_ids"][1].tolist() == [0] * 4 + [1] * 6
    assert batch["token_type_ids"][2].tolist() == [0] * 9 + [1]
    assert batch["token_type_ids"][3].tolist() == [0] * 5 + [1] * 3 + [0] * 2
    assert batch["token_type_ids"][4].tolist() == [0] * 10
    # Single sentences: both rules cut the same way.
    single = write_lines(tmp_path / "single.json", [{"sentence1": row["sentence1"]} for row in rows])
    examples = read_clue_file(single, ["0"], require_labels=False)
    for rule in ("longest_first", "reference"):
        assert tokens(tokenizer, encode(examples, tokenizer, 6, truncation=rule), 0) == ["[CLS]", *"一二三四", "[SEP]"]


def _collator(ids: list[int], types: list[int], max_seq_len: int, sep_id: int) -> tuple[list[int], list[int]]:
    """The seed notebook's Collator.pad_and_truncate for one row, as written there."""
    if len(ids) <= max_seq_len:
        return ids, types
    return ids[: max_seq_len - 1] + [sep_id], types[:max_seq_len]


def test_reference_truncation_equals_the_notebook_collator_on_afqmc(afqmc_train, tokenizer):
    encoded = encode(afqmc_train, tokenizer, 64, truncation="reference")
    longest_first = encode(afqmc_train, tokenizer, 64)
    # The notebook encodes untruncated (encode_plus without max_length), then cuts in the Collator.
    full = tokenizer(afqmc_train.text_a, afqmc_train.text_b)
    changed = no_second = 0
    for row, (ids, types) in enumerate(zip(full["input_ids"], full["token_type_ids"], strict=True)):
        want_ids, want_types = _collator(ids, types, 64, tokenizer.sep_token_id)
        length, type0 = encoded.lengths[row], encoded.type0_lengths[row]
        assert encoded.token_ids[row, :length].tolist() == want_ids, row
        assert [0] * type0 + [1] * (length - type0) == want_types, row
        ours = longest_first.token_ids[row, : longest_first.lengths[row]].tolist()
        changed += ours != want_ids
        no_second += len(ids) > 64 and 1 not in want_types[:-1]
    # The counts the README states for the train split.
    assert (changed, no_second) == (259, 24)


AWKWARD_TEXTS = [
    "花呗怎么还款",
    "Hello World 123",
    "花呗 Huabei 账单2019年",
    "  前后有空格  ",
    "",
    "***",
    "√2≥1┃◎",
    "é à ñ Ä",
    "emoji😀测试",
    "x\ufeffy",
    "[SEP]里面[UNK]",
    "tab\there\r\nnewline",
    "控制\x07字符\x00",
    "全角＋＝～￣，。！",
    "\u3000全角空格",
    "龘𠀀𪚥",
    "ABC大写abc",
    "一二三四五六七八九十" * 5,
]


@pytest.mark.parametrize("max_seq_len", [4, 8, 16, 64])
def test_encode_matches_tokenizer_call(tmp_path, tokenizer, max_seq_len):
    pairs = list(itertools.product(AWKWARD_TEXTS, AWKWARD_TEXTS[::-1][:7]))
    path = write_lines(tmp_path / "awkward.json", [{"sentence1": a, "sentence2": b} for a, b in pairs])
    encoded = encode(read_clue_file(path, ["0"], require_labels=False), tokenizer, max_seq_len)
    reference = tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=max_seq_len
    )
    batch = make_batch(encoded, np.arange(len(pairs)), batch_size=len(pairs), bucket_lengths=(max_seq_len,))
    for row, (ids, types) in enumerate(zip(reference["input_ids"], reference["token_type_ids"], strict=True)):
        assert encoded.token_ids[row, : encoded.lengths[row]].tolist() == ids, pairs[row]
        assert batch["token_type_ids"][row, : len(types)].tolist() == types, pairs[row]

    single = write_lines(tmp_path / "single.json", [{"sentence1": a} for a in AWKWARD_TEXTS])
    encoded = encode(read_clue_file(single, ["0"], require_labels=False), tokenizer, max_seq_len)
    reference = tokenizer(AWKWARD_TEXTS, truncation="longest_first", max_length=max_seq_len)
    for row, ids in enumerate(reference["input_ids"]):
        assert encoded.token_ids[row, : encoded.lengths[row]].tolist() == ids, AWKWARD_TEXTS[row]


def test_encode_matches_tokenizer_call_on_afqmc_train(afqmc_train, tokenizer):
    max_seq_len = 40  # short enough that many pairs get truncated
    encoded = encode(afqmc_train, tokenizer, max_seq_len)
    reference = tokenizer(afqmc_train.text_a, afqmc_train.text_b, truncation="longest_first", max_length=max_seq_len)
    ref_lengths = np.fromiter(map(len, reference["input_ids"]), dtype=np.int32)
    np.testing.assert_array_equal(encoded.lengths, ref_lengths)
    assert (ref_lengths == max_seq_len).sum() > 1000
    mask = np.arange(encoded.token_ids.shape[1]) < encoded.lengths[:, None]
    np.testing.assert_array_equal(
        encoded.token_ids[mask], np.fromiter(itertools.chain.from_iterable(reference["input_ids"]), np.int32)
    )
    type_ones = np.fromiter(map(sum, reference["token_type_ids"]), dtype=np.int32)
    np.testing.assert_array_equal(encoded.lengths - encoded.type0_lengths, type_ones)
    np.testing.assert_array_equal(encoded.labels, afqmc_train.labels)


def test_single_sentence_file(tmp_path, tokenizer):
    rows = [{"sentence1": "今天天气很好", "label": "1"}, {"sentence1": "", "label": "0"}]
    path = write_lines(tmp_path / "single.json", rows)
    examples = read_clue_file(path, ["0", "1"], require_labels=True)
    assert examples.text_b is None
    encoded = encode(examples, tokenizer, 5)
    assert tokens(tokenizer, encoded, 0) == ["[CLS]", *"今天天", "[SEP]"]
    assert tokens(tokenizer, encoded, 1) == ["[CLS]", "[SEP]"]
    batch = make_batch(encoded, np.array([0, 1]), batch_size=2, bucket_lengths=(8,))
    assert not batch["token_type_ids"].any()


def test_labels_map_to_indices(tmp_path):
    rows = [{"sentence1": "x", "label": label} for label in ["c", "a", "b", "c"]]
    examples = read_clue_file(write_lines(tmp_path / "abc.json", rows), ["a", "b", "c"], require_labels=True)
    assert examples.labels.dtype == np.int32 and examples.labels.tolist() == [2, 0, 1, 2]
    rows = [{"sentence1": "x", "sentence2": "y", "label": label} for label in [1, 0, "1"]]
    examples = read_clue_file(write_lines(tmp_path / "int.json", rows), ["0", "1"], require_labels=True)
    assert examples.labels.tolist() == [1, 0, 1]


def test_unlabelled_rows_keep_their_ids(tmp_path, afqmc_dir):
    rows = [{"id": 10, "sentence1": "a", "sentence2": "b"}, {"id": "x7", "sentence1": "c", "sentence2": "d"}]
    examples = read_clue_file(write_lines(tmp_path / "test.json", rows), ["0", "1"], require_labels=False)
    assert examples.labels is None and examples.ids == [10, "x7"]
    rows = [{"sentence1": "a"}, {"sentence1": "b"}]
    assert read_clue_file(write_lines(tmp_path / "noid.json", rows), ["0"], require_labels=False).ids == [0, 1]

    test = read_clue_file(afqmc_dir / "test.json", ["0", "1"], require_labels=False)
    assert len(test) == 3861 and test.labels is None and test.ids[:3] == [0, 1, 2]
    dev = read_clue_file(afqmc_dir / "dev.json", ["0", "1"], require_labels=False)
    assert len(dev) == 4316 and dev.labels is not None and set(dev.labels.tolist()) == {0, 1}


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.json"
    rows = [json.dumps({"sentence1": "花呗", "sentence2": "借呗", "label": "0"}, ensure_ascii=False)] * 2
    path.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n\r\n").encode("utf-8"))
    examples = read_clue_file(path, ["0", "1"], require_labels=True)
    assert examples.text_a == ["花呗", "花呗"] and examples.text_b == ["借呗", "借呗"]


GOOD = {"sentence1": "花呗", "sentence2": "借呗", "label": "0"}


@pytest.mark.parametrize(
    ("rows", "line", "phrase"),
    [
        ([GOOD, '{"sentence1": "a", '], 2, "malformed JSON"),
        ([GOOD, '{"sentence1": "a"} trailing'], 2, "malformed JSON"),
        ([GOOD, '["a", "b"]'], 2, "JSON object"),
        ([GOOD, GOOD, {"sentence2": "b", "label": "0"}], 3, "'sentence1'"),
        ([GOOD, {"sentence1": 5, "sentence2": "b", "label": "0"}], 2, "must be a string"),
        ([GOOD, {"sentence1": "a", "sentence2": "b"}], 2, "missing 'label'"),
        ([{"sentence1": "a", "sentence2": "b", "label": "2"}], 1, "['0', '1']"),
        ([GOOD, {"sentence1": "a", "label": "0"}], 2, "'sentence2'"),
        ([GOOD, GOOD, '{"sentence1": "a", "sentence2": "b\\ud800", "label": "0"}'], 3, "surrogate"),
        ([{"sentence1": "a", "label": "0"}, GOOD], 2, "'sentence2'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, rows, line, phrase):
    path = write_lines(tmp_path / "bad.json", ["", *rows])  # a leading blank line counts as line 1
    with pytest.raises(InputError) as err:
        read_clue_file(path, ["0", "1"], require_labels=True)
    assert f"{path}:{line + 1}:" in str(err.value) and phrase in str(err.value)
    assert "\n" not in str(err.value)


def test_labels_present_in_only_some_rows(tmp_path):
    path = write_lines(tmp_path / "mixed.json", [{"sentence1": "a"}, {"sentence1": "b", "label": "0"}])
    with pytest.raises(InputError, match=r"mixed\.json:2: .*'label'"):
        read_clue_file(path, ["0"], require_labels=False)


def test_gbk_file_is_rejected(tmp_path):
    path = tmp_path / "gbk.json"
    lines = ['{"sentence1": "abc", "sentence2": "def", "label": "0"}', json.dumps(GOOD, ensure_ascii=False)]
    path.write_bytes("\n".join(lines).encode("gbk"))
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}:2: .*UTF-8.*GBK"):
        read_clue_file(path, ["0", "1"], require_labels=True)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_rejected(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: no examples"):
        read_clue_file(path, ["0", "1"], require_labels=True)


def test_missing_file_and_vocab(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'nope.json'}: no such file")):
        read_clue_file(tmp_path / "nope.json", ["0", "1"], require_labels=True)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'no_model'}: no such folder")):
        load_tokenizer(tmp_path / "no_model")
    (tmp_path / "model").mkdir()
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'model' / 'vocab.txt'}: no such file")):
        load_tokenizer(tmp_path / "model")


def test_max_seq_len_too_small(tmp_path, tokenizer):
    examples = read_clue_file(write_lines(tmp_path / "p.json", [GOOD]), ["0", "1"], require_labels=True)
    with pytest.raises(InputError, match=r"data\.max_seq_len"):
        encode(examples, tokenizer, 3)
