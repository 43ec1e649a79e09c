"""Examples -> token ids, as `tokenizer(a, b, truncation=..., max_length=...)` would give them, fast.

`encode` returns `Encoded`: the token ids of every example, padded into one array, with the
lengths and the token-type boundary, from which `input_pipeline` cuts batches. Two truncation
rules for pairs over `max_seq_len` (`data.truncation`):

* `longest_first` (default): the tokenizers library's rule; both sentences keep tokens.
* `reference`: the seed notebook's Collator, which keeps the first `max_seq_len - 1` tokens of
  `[CLS] a [SEP] b [SEP]` and appends `[SEP]`; a long first sentence can push out the second.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from sda_jax.config import TRUNCATIONS
from sda_jax.data.clue_files import Examples
from sda_jax.errors import InputError

if TYPE_CHECKING:
    import tokenizers
    import transformers


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


def load_tokenizer(model_dir: Path) -> transformers.PreTrainedTokenizerFast:
    """The fast (Rust-backed) WordPiece tokenizer from a model folder's vocab.txt, or its
    tokenizer.json (what transformers 5 and sda-jax's exports write, without vocab.txt)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: no such folder (expected a BERT model folder with vocab.txt)")
    if not (model_dir / "vocab.txt").is_file() and not (model_dir / "tokenizer.json").is_file():
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


def encode(
    examples: Examples,
    tokenizer: transformers.PreTrainedTokenizerFast,
    max_seq_len: int,
    truncation: str = "longest_first",
) -> Encoded:
    """Tokenize like `tokenizer(a, b, truncation="longest_first", max_length=max_seq_len)`.

    The result is identical to that call (the tests check it on the whole AFQMC train set), but
    it is several times faster: see `_tokenize`. With `truncation="reference"` an over-long pair
    is cut as the seed notebook cuts it (see the module docstring); single sentences are cut the
    same way by both rules.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
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
        if truncation == "reference":
            keep_a, keep_b, second_sep = _reference_cut(tokens_a.lengths, tokens_b.lengths, max_seq_len)
        else:
            keep_a, keep_b = _longest_first(tokens_a.lengths, tokens_b.lengths, max_seq_len - 3)

    type0_lengths = keep_a + 2
    if examples.text_b is None:
        lengths = type0_lengths
    elif truncation == "reference":
        lengths = type0_lengths + keep_b + second_sep
    else:
        lengths = type0_lengths + keep_b + 1
    rows = np.arange(n)
    token_ids = np.full((n, int(lengths.max())), tokenizer.pad_token_id, dtype=np.int32)
    token_ids[:, 0] = tokenizer.cls_token_id
    token_ids[rows, type0_lengths - 1] = tokenizer.sep_token_id
    _scatter(token_ids, tokens_a, keep_a, first_col=np.ones(n, dtype=np.int64))
    if examples.text_b is not None:
        token_ids[rows, lengths - 1] = tokenizer.sep_token_id  # the pair's closing [SEP], or a's if it was cut
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


def _reference_cut(
    lengths_a: np.ndarray, lengths_b: np.ndarray, max_seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens kept of each text, and whether the closing [SEP] stays, under the seed's Collator.

    The Collator keeps the first max_seq_len - 1 tokens of `[CLS] a [SEP] b [SEP]` and appends
    [SEP]. When a has max_seq_len - 2 tokens or more, that leaves `[CLS] a[:max_seq_len - 2] [SEP]`:
    no token of b, and every position of token type 0 (the Collator cuts the type ids at
    max_seq_len too). Otherwise b loses its tail and the row ends with a type-1 [SEP], exactly
    the usual layout.
    """
    over = lengths_a + lengths_b + 3 > max_seq_len
    a_fills = over & (lengths_a >= max_seq_len - 2)
    keep_a = np.where(a_fills, max_seq_len - 2, lengths_a)
    keep_b = np.where(over, np.maximum(max_seq_len - 3 - lengths_a, 0), lengths_b)
    return keep_a, keep_b, (~a_fills).astype(keep_a.dtype)


def _scatter(out: np.ndarray, tokens: _Ragged, counts: np.ndarray, first_col: np.ndarray) -> None:
    """Write the first counts[i] tokens of text i into out[i, first_col[i]:]."""
    rows = np.repeat(np.arange(len(counts)), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    out[rows, np.repeat(first_col, counts) + offsets] = tokens.flat[np.repeat(tokens.starts, counts) + offsets]
