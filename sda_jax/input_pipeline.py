"""Host-side input pipeline: CLUE JSON-lines files -> token ids -> padded, length-bucketed batches.

Reproduces the PyTorch reference's bucket sampler (random permutation, chunks of
`batch_size * bucket_multiplier` sorted by length, batches of a chunk shuffled) as a pure
function of (seed, epoch), so a resumed run sees exactly the batches it would have seen. Every
batch has a fixed row count and a width taken from a small set of bucket lengths, so the jitted
step compiles once per bucket; padding rows carry weight 0.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from sda_jax.errors import InputError

if TYPE_CHECKING:
    import tokenizers
    import transformers

_UTF8_BOM = "\ufeff"
_JSON_DECODER = json.JSONDecoder()


@dataclass(frozen=True, eq=False)
class Examples:
    """The rows of one data file, in file order."""

    text_a: list[str]
    text_b: list[str] | None  # None for single-sentence data sets
    labels: np.ndarray | None  # int32 class indices; None when the file has no labels
    ids: list  # the file's id field, else the 0-based example index
    path: str
    empty_text_lines: tuple[int, ...] = ()  # lines with an empty sentence: kept, but worth a note

    def __len__(self) -> int:
        return len(self.text_a)


@dataclass(frozen=True, eq=False)
class Encoded:
    """Tokenized examples, stored padded so that a batch is a single fancy-indexed copy.

    Row i of `token_ids` is `[CLS] a [SEP] b [SEP]` (or `[CLS] a [SEP]`) followed by `pad_id` up to
    the longest row. Token type is 0 for the first `type0_lengths[i]` positions and 1 for the rest
    of the row, so no separate type array is stored.
    """

    token_ids: np.ndarray  # int32 [N, max(lengths)]
    lengths: np.ndarray  # int32 [N]
    type0_lengths: np.ndarray  # int32 [N]: len([CLS] a [SEP])
    labels: np.ndarray | None  # int32 [N]
    ids: list
    pad_id: int

    def __len__(self) -> int:
        return len(self.lengths)


def read_clue_file(
    path: str | Path,
    label_names: Sequence[str],
    *,
    require_labels: bool,
    text_a_key: str = "sentence1",
    text_b_key: str = "sentence2",
    label_key: str = "label",
    id_key: str = "id",
) -> Examples:
    """Read a CLUE-style JSON-lines file; any problem raises `InputError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        raise InputError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{data[err.start]:02x}); the file must be "
            "UTF-8 encoded (GBK or other encodings are not accepted)"
        ) from None
    text = text.removeprefix(_UTF8_BOM)

    label_index = {str(name): i for i, name in enumerate(label_names)}
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list[int] = []
    ids: list = []
    linenos: list[int] = []
    # Line of the first example, and whether it had text_b / a label: every later row must agree.
    first_lineno = 0
    has_b = has_label = False
    # split("\n"), not splitlines(): JSON strings may legally contain U+2028 and similar breaks.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line or line.isspace():
            continue
        where = f"{path}:{lineno}"
        try:
            row = _parse_json_line(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")

        a = row.get(text_a_key)
        if a is None:
            raise InputError(f"{where}: missing {text_a_key!r}")
        b = row.get(text_b_key)
        label = row.get(label_key)
        if not first_lineno:
            first_lineno, has_b, has_label = lineno, b is not None, label is not None
        if (b is not None) != has_b:
            raise InputError(
                f"{where}: {'has' if b is not None else 'missing'} {text_b_key!r}, but line "
                f"{first_lineno} {'has' if has_b else 'has no'} {text_b_key!r} (all rows must agree)"
            )
        if not isinstance(a, str) or (b is not None and not isinstance(b, str)):
            key = text_a_key if not isinstance(a, str) else text_b_key
            raise InputError(f"{where}: {key!r} must be a string")
        if label is None and require_labels:
            raise InputError(f"{where}: missing {label_key!r}")
        if (label is not None) != has_label:
            raise InputError(
                f"{where}: {'has' if label is not None else 'missing'} {label_key!r}, but line "
                f"{first_lineno} {'has' if has_label else 'has no'} {label_key!r} (all rows must agree)"
            )
        if label is not None:
            index = label_index.get(str(label))
            if index is None:
                raise InputError(f"{where}: {label_key} {label!r} is not one of the allowed labels {list(label_index)}")
            labels.append(index)
        ids.append(row.get(id_key, len(text_a)))
        linenos.append(lineno)
        text_a.append(a)
        if b is not None:
            text_b.append(b)

    if not text_a:
        raise InputError(f"{path}: no examples (the file is empty or blank)")
    try:
        # JSON escapes can spell lone surrogates ("\ud800"), which no tokenizer accepts; one
        # encode of everything finds out cheaply whether any row needs looking at.
        "".join(itertools.chain(text_a, text_b)).encode("utf-8")
    except UnicodeEncodeError:
        rows = zip(text_a, text_b, strict=True) if has_b else zip(text_a)
        bad = next(i for i, texts in enumerate(rows) if not _encodable("".join(texts)))
        raise InputError(f"{path}:{linenos[bad]}: text contains a lone UTF-16 surrogate (invalid Unicode)") from None
    empty = [lineno for lineno, a, b in zip(linenos, text_a, text_b or itertools.repeat("x")) if not a or not b]
    return Examples(
        text_a=text_a,
        text_b=text_b if has_b else None,
        labels=np.asarray(labels, dtype=np.int32) if has_label else None,
        ids=ids,
        path=str(path),
        empty_text_lines=tuple(empty),
    )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_json_line(line: str) -> object:
    """`json.loads`, minus its wrapper overhead in the common case (~30% of reading AFQMC)."""
    try:
        value, end = _JSON_DECODER.raw_decode(line)
    except json.JSONDecodeError:
        # Leading whitespace, or a real error that json.loads reports the same way.
        return json.loads(line)
    if end != len(line) and not line[end:].isspace():
        raise json.JSONDecodeError("Extra data", line, end)
    return value


def load_tokenizer(model_dir: Path) -> transformers.PreTrainedTokenizerFast:
    """The fast (Rust-backed) WordPiece tokenizer from a model folder's vocab.txt."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: no such folder (expected a BERT model folder with vocab.txt)")
    if not (model_dir / "vocab.txt").is_file():
        raise InputError(f"{model_dir / 'vocab.txt'}: no such file")
    # Imported here because importing transformers takes about a second, which the bucketing
    # code and its tests do not need to pay.
    import transformers

    return transformers.BertTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)


class _Ragged(NamedTuple):
    """Token sequences of many texts: text i is `flat[starts[i] : starts[i] + lengths[i]]`."""

    flat: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def rows(self, begin: int, end: int) -> _Ragged:
        return _Ragged(self.flat, self.starts[begin:end], self.lengths[begin:end])


def encode(examples: Examples, tokenizer: transformers.PreTrainedTokenizerFast, max_seq_len: int) -> Encoded:
    """Tokenize like `tokenizer(a, b, truncation="longest_first", max_length=max_seq_len)`.

    The result is identical to that call (the tests check it on the whole AFQMC train set), but
    it is several times faster: see `_tokenize`.
    """
    num_special = 2 if examples.text_b is None else 3
    if max_seq_len < num_special + 1:
        raise InputError(f"data.max_seq_len: {max_seq_len} leaves no room for text (need > {num_special})")
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        # A previous `tokenizer(...)` call leaves its truncation settings on the shared backend;
        # we need the untruncated token counts to truncate the pair ourselves.
        backend = copy.deepcopy(backend)
        backend.no_truncation()
        backend.no_padding()

    n = len(examples)
    if examples.text_b is None:
        tokens_a = _tokenize(backend, examples.text_a)
        keep_a = np.minimum(tokens_a.lengths, max_seq_len - 2)
        keep_b = np.zeros_like(keep_a)
    else:
        both = _tokenize(backend, examples.text_a + examples.text_b)
        tokens_a, tokens_b = both.rows(0, n), both.rows(n, 2 * n)
        keep_a, keep_b = _longest_first(tokens_a.lengths, tokens_b.lengths, max_seq_len - 3)

    type0_lengths = keep_a + 2
    lengths = type0_lengths + keep_b + (num_special - 2)
    rows = np.arange(n)
    token_ids = np.full((n, int(lengths.max())), tokenizer.pad_token_id, dtype=np.int32)
    token_ids[:, 0] = tokenizer.cls_token_id
    token_ids[rows, type0_lengths - 1] = tokenizer.sep_token_id
    _scatter(token_ids, tokens_a, keep_a, first_col=np.ones(n, dtype=np.int64))
    if examples.text_b is not None:
        token_ids[rows, lengths - 1] = tokenizer.sep_token_id
        _scatter(token_ids, tokens_b, keep_b, first_col=type0_lengths)
    return Encoded(
        token_ids=token_ids,
        lengths=lengths.astype(np.int32),
        type0_lengths=type0_lengths.astype(np.int32),
        labels=examples.labels,
        ids=examples.ids,
        pad_id=int(tokenizer.pad_token_id),
    )


def _tokenize(backend: tokenizers.Tokenizer, texts: list[str]) -> _Ragged:
    """Token ids of each text, without special tokens or truncation.

    The Rust tokenizer spends ~2 s on AFQMC's 69k sentences, almost all of it on per-character
    words: BERT makes every CJK character and punctuation mark a word of its own. Such a
    character's token never depends on its neighbours, so a text made only of them is a
    per-character table lookup in numpy. The few texts with other characters (Latin words,
    digits, spaces) still go through the tokenizer.
    """
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    starts = np.cumsum(lengths) - lengths
    # A dense code-point table (4 MiB at most) is several times faster than np.unique's sort.
    present = np.zeros(int(codes.max(initial=0)) + 1, dtype=bool)
    present[codes] = True
    unique_codes = np.flatnonzero(present)
    table = np.full(present.size, -1, dtype=np.int32)
    table[unique_codes] = _isolated_char_tokens(backend, unique_codes)
    flat = table[codes]

    needs_tokenizer = np.concatenate(([0], np.cumsum(flat < 0)))
    slow_rows = np.flatnonzero(needs_tokenizer[starts + lengths] > needs_tokenizer[starts])
    if slow_rows.size:
        encodings = backend.encode_batch_fast([texts[i] for i in slow_rows], add_special_tokens=False)
        slow_ids = [encoding.ids for encoding in encodings]
        slow_lengths = np.fromiter(map(len, slow_ids), dtype=np.int64, count=len(slow_ids))
        slow_flat = np.fromiter(itertools.chain.from_iterable(slow_ids), dtype=np.int32, count=int(slow_lengths.sum()))
        # Appended after the table-looked-up tokens; those rows' starts now point there.
        starts[slow_rows] = flat.size + np.cumsum(slow_lengths) - slow_lengths
        lengths[slow_rows] = slow_lengths
        flat = np.concatenate((flat, slow_flat))
    return _Ragged(flat.astype(np.int32, copy=False), starts, lengths)


def _isolated_char_tokens(backend: tokenizers.Tokenizer, codes: np.ndarray) -> np.ndarray:
    """For each code point, its single token id if the tokenizer always makes it a word of its own
    (whatever its neighbours), else -1.

    The test is the tokenizer's own normalizer and pre-tokenizer on "a<c>a": both act character by
    character, so a character split off from letters on both sides is split off from anything.
    Characters of added tokens are excluded because those are matched across characters.
    """
    result = np.full(codes.size, -1, dtype=np.int32)
    pre_tokenizer, normalizer = backend.pre_tokenizer, backend.normalizer
    if pre_tokenizer is None:
        return result
    added = set("".join(token.content for token in backend.get_added_tokens_decoder().values()))
    chars = [chr(code) for code in codes.tolist()]
    alone = backend.encode_batch_fast(chars, add_special_tokens=False)
    for i, (char, encoding) in enumerate(zip(chars, alone, strict=True)):
        if char in added or len(encoding.ids) != 1:
            continue
        probe = f"a{char}a"
        if normalizer is not None:
            probe = normalizer.normalize_str(probe)
        if [word for word, _ in pre_tokenizer.pre_tokenize_str(probe)] == ["a", char, "a"]:
            result[i] = encoding.ids[0]
    return result


def _longest_first(lengths_a: np.ndarray, lengths_b: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens kept of each text under the tokenizers library's "longest_first" strategy.

    Over budget, the shorter text keeps min(its length, budget // 2) tokens and the other takes the
    rest; on a tie the second text is treated as the longer one.
    """
    over = lengths_a + lengths_b > budget
    kept_short = np.minimum(np.minimum(lengths_a, lengths_b), budget // 2)
    kept_long = budget - kept_short
    a_longer = lengths_a > lengths_b
    keep_a = np.where(over, np.where(a_longer, kept_long, kept_short), lengths_a)
    keep_b = np.where(over, np.where(a_longer, kept_short, kept_long), lengths_b)
    return keep_a, keep_b


def _scatter(out: np.ndarray, tokens: _Ragged, counts: np.ndarray, first_col: np.ndarray) -> None:
    """Write the first counts[i] tokens of text i into out[i, first_col[i]:]."""
    rows = np.repeat(np.arange(len(counts)), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    out[rows, np.repeat(first_col, counts) + offsets] = tokens.flat[np.repeat(tokens.starts, counts) + offsets]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch; the last one may be partial (the reference keeps it)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples}, {batch_size}")
    return -(-num_examples // batch_size)


def epoch_order(
    lengths: np.ndarray, *, batch_size: int, bucket_multiplier: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """The example indices of each batch of one epoch, as the reference's bucket sampler draws them.

    A random permutation is cut into chunks of batch_size * bucket_multiplier; each chunk is
    stably sorted by length and cut into batches (the last one possibly partial), and the batches
    of a chunk are emitted in random order.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    permutation = rng.permutation(len(lengths))
    chunk_size = batch_size * bucket_multiplier
    batches: list[np.ndarray] = []
    for begin in range(0, len(permutation), chunk_size):
        chunk = permutation[begin : begin + chunk_size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        chunk_batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        batches.extend(chunk_batches[j] for j in rng.permutation(len(chunk_batches)))
    return batches


def fit_bucket_lengths(lengths: np.ndarray, num_buckets: int, max_len: int) -> tuple[int, ...]:
    """The at most `num_buckets` padded lengths, the largest `max_len`, that pad `lengths` least.

    Each batch of the bucket sampler comes from a length-sorted chunk, so its rows are nearly of
    one length, and padding every example to its bucket stands in well for padding every batch.
    Exact dynamic programme over the lengths 0..max_len: O(num_buckets * max_len^2), ~15 ms at 512.
    """
    counts = np.bincount(np.minimum(np.asarray(lengths, dtype=np.int64), max_len), minlength=max_len + 1)
    at_most = np.cumsum(counts)  # at_most[n]: examples of at most n tokens
    n = np.arange(max_len + 1)
    # cost[n]: padded tokens of all examples of <= n tokens, with buckets whose largest is n.
    cost = n * at_most
    # bucket_cost[m, n]: padded tokens of the examples in (m, n] padded to n.
    bucket_cost = n[None, :] * (at_most[None, :] - at_most[:, None])
    unreachable = np.iinfo(np.int64).max
    previous_bucket = []  # per added bucket: for each n, the bucket below n (-1: no gain from one more)
    for _ in range(num_buckets - 1):
        total = np.where(n[:, None] < n[None, :], cost[:, None] + bucket_cost, unreachable)
        below = np.argmin(total, axis=0)
        with_one_more = total[below, n]
        better = with_one_more < cost
        previous_bucket.append(np.where(better, below, -1))
        cost = np.where(better, with_one_more, cost)
    buckets = [max_len]
    for below in reversed(previous_bucket):
        if below[buckets[-1]] > 0:
            buckets.append(int(below[buckets[-1]]))
    return tuple(sorted(buckets))


def padded_fraction(lengths: np.ndarray, bucket_lengths: Sequence[int]) -> float:
    """Padding tokens over real tokens when every example is padded to its bucket."""
    lengths = np.asarray(lengths)
    padded = np.asarray(bucket_lengths)[np.searchsorted(bucket_lengths, lengths)]
    return float(padded.sum() / lengths.sum() - 1.0)


def make_batch(
    encoded: Encoded, indices: np.ndarray, *, batch_size: int, bucket_lengths: Sequence[int]
) -> dict[str, np.ndarray]:
    """Rows `indices`, padded to the smallest bucket length that fits and to batch_size rows.

    Padding rows have weight 0, label 0 and an all-zero attention mask.
    """
    indices = np.asarray(indices)
    count = len(indices)
    if not 1 <= count <= batch_size:
        raise ValueError(f"a batch needs 1 to {batch_size} examples, got {count}")
    lengths = encoded.lengths[indices]
    longest = int(lengths.max())
    bucket = int(np.searchsorted(bucket_lengths, longest))
    if bucket == len(bucket_lengths):
        raise ValueError(f"an example of {longest} tokens exceeds the largest bucket {bucket_lengths[-1]}")
    width = int(bucket_lengths[bucket])

    input_ids = np.full((batch_size, width), encoded.pad_id, dtype=np.int32)
    copied = min(width, encoded.token_ids.shape[1])
    input_ids[:count, :copied] = encoded.token_ids[indices, :copied]
    positions = np.arange(width, dtype=np.int32)
    attention_mask = np.zeros((batch_size, width), dtype=np.int32)
    attention_mask[:count] = positions < lengths[:, None]
    token_type_ids = np.zeros((batch_size, width), dtype=np.int32)
    token_type_ids[:count] = (positions >= encoded.type0_lengths[indices, None]) & (positions < lengths[:, None])
    labels = np.zeros(batch_size, dtype=np.int32)
    if encoded.labels is not None:
        labels[:count] = encoded.labels[indices]
    weights = np.zeros(batch_size, dtype=np.float32)
    weights[:count] = 1.0
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "weights": weights,
    }


def train_batches(
    encoded: Encoded,
    *,
    batch_size: int,
    bucket_multiplier: int,
    bucket_lengths: Sequence[int],
    seed: int,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches; global step s is batch s % steps_per_epoch of epoch
    s // steps_per_epoch, so starting at step k equals skipping k batches."""
    per_epoch = steps_per_epoch(len(encoded), batch_size)
    order: list[np.ndarray] = []
    order_epoch = -1
    for step in itertools.count(start_step):
        epoch, index = divmod(step, per_epoch)
        if epoch != order_epoch:
            order = epoch_order(
                encoded.lengths,
                batch_size=batch_size,
                bucket_multiplier=bucket_multiplier,
                seed=seed,
                epoch=epoch,
            )
            order_epoch = epoch
        yield make_batch(encoded, order[index], batch_size=batch_size, bucket_lengths=bucket_lengths)


def eval_batches(
    encoded: Encoded, *, batch_size: int, bucket_lengths: Sequence[int]
) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in file order; the last batch is filled up with zero-weight rows."""
    for begin in range(0, len(encoded), batch_size):
        indices = np.arange(begin, min(begin + batch_size, len(encoded)))
        yield make_batch(encoded, indices, batch_size=batch_size, bucket_lengths=bucket_lengths)
