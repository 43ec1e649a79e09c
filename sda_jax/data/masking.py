"""BERT's masking for masked-LM pretraining: which tokens each input predicts, and what it sees there.

As Google's `create_pretraining_data.py` (and transformers' whole-word-mask collator) choose them:
each input predicts `round(mask_prob × its candidates)` tokens (at least one where it has any),
the candidates being every token but the specials ([CLS], [SEP], [PAD], [MASK], [UNK]); of those,
`mask_token_ratio` are replaced by [MASK], `random_token_ratio` by a random non-special token, and
the rest kept. With whole-word masking the choice is by word: words are taken in random order, a
word that would exceed the count is skipped, so a word's characters are predicted all together or
not at all. Words come from `jieba` (the `wwm` extra), as chinese-roberta-wwm-ext was trained;
every token is a word of its own otherwise.

A fixed count per input bounds the predictions of a batch of width `w` by
`max_predictions(w)`, so the head runs on a fixed number of gathered positions per bucket
length and none is ever dropped. The choice is a pure function of (seed, epoch, stream): every
epoch draws anew, a resumed run redraws the same, and the held-out slice has a stream of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sda_jax.config import PretrainSettings
from sda_jax.data.clue_files import Examples
from sda_jax.data.tokenization import Encoded
from sda_jax.errors import InputError

TRAIN_STREAM, HELDOUT_STREAM = 0, 1


def max_predictions(width: int, mask_prob: float) -> int:
    """The most tokens an input of `width` positions predicts ([CLS] and one [SEP] never)."""
    return max(1, int(np.rint(mask_prob * max(width - 2, 0))))


@dataclasses.dataclass(frozen=True, eq=False)
class Masked:
    """One draw of the masking for every input of an `Encoded`."""

    token_ids: np.ndarray  # int32 [N, W]: the inputs as the model sees them
    positions: np.ndarray  # int32 [N, P]: the predicted positions, ascending, then 0
    targets: np.ndarray  # int32 [N, P]: the original tokens there, then 0
    weights: np.ndarray  # float32 [N, P]: 1 for a prediction, 0 for padding


def candidates(encoded: Encoded, special_ids: Sequence[int]) -> np.ndarray:
    """Bool [N, W]: the positions that may be predicted (real tokens that are not specials)."""
    inside = np.arange(encoded.token_ids.shape[1])[None, :] < encoded.lengths[:, None]
    return inside & ~np.isin(encoded.token_ids, np.asarray(special_ids))


def token_words(encoded: Encoded, special_ids: Sequence[int]) -> np.ndarray:
    """Int32 [N, W]: every candidate a word of its own (its position), -1 elsewhere."""
    positions = np.broadcast_to(np.arange(encoded.token_ids.shape[1], dtype=np.int32), encoded.token_ids.shape)
    return np.where(candidates(encoded, special_ids), positions, -1).astype(np.int32)


def jieba_words(examples: Examples, encoded: Encoded, tokenizer, special_ids: Sequence[int]) -> np.ndarray:
    """Int32 [N, W]: for each candidate, the first position of the jieba word it belongs to; -1 elsewhere.

    Token i of a sentence covers the characters of its offsets; it belongs to the word that holds
    its first character. Truncation keeps a prefix of each sentence, so row positions 1.. are
    sentence a's tokens and `type0_lengths`.. sentence b's.
    """
    try:
        import jieba
    except ImportError:
        raise InputError(
            "config key pretrain.whole_word_masking: needs the jieba segmenter: pip install 'sda-jax[wwm]' (or jieba)"
        ) from None
    jieba.setLogLevel(60)  # its dictionary-loading chatter
    words = token_words(encoded, special_ids)
    backend = tokenizer.backend_tokenizer
    type0 = encoded.type0_lengths.astype(np.int64)
    sentences = [(examples.text_a, np.ones(len(encoded), np.int64), type0 - 2)]  # (texts, first position, tokens kept)
    if examples.text_b is not None:
        sentences.append((examples.text_b, type0, np.maximum(encoded.lengths - type0 - 1, 0)))
    for texts, first, kept in sentences:
        for row, (text, encoding) in enumerate(zip(texts, backend.encode_batch(texts, add_special_tokens=False), strict=True)):
            word_of_char = np.zeros(len(text) + 1, np.int64)
            for index, (_, start, end) in enumerate(jieba.tokenize(text)):
                word_of_char[start:end] = index
            token_word = word_of_char[[start for start, _ in encoding.offsets]]
            span = min(len(token_word), int(kept[row]))
            positions = first[row] + np.arange(span)
            # A word's id is its first kept token's position.
            starts = {}
            for position, word in zip(positions.tolist(), token_word[:span].tolist(), strict=True):
                starts.setdefault(word, position)
            keep = words[row, positions] >= 0
            words[row, positions[keep]] = [starts[w] for w in token_word[:span][keep].tolist()]
    return words


def mask(
    encoded: Encoded, words: np.ndarray, settings: PretrainSettings, *, mask_id: int, random_ids: np.ndarray, seed: int,
    epoch: int, stream: int = TRAIN_STREAM,
) -> Masked:  # fmt: skip
    """The masking of (seed, epoch, stream) for every input; `words` from `token_words` or `jieba_words`."""
    rng = np.random.default_rng([seed, epoch, stream])
    n, width = words.shape
    limit = max_predictions(width, settings.mask_prob)
    is_candidate = words >= 0
    count = is_candidate.sum(axis=1)
    wanted = np.where(count > 0, np.maximum(1, np.rint(settings.mask_prob * count)), 0).astype(np.int64)
    priority = rng.random((n, width))
    if settings.whole_word_masking:
        chosen = _whole_words(words, priority, wanted)
    else:
        # Every word is one token: the `wanted` candidates of highest priority.
        order = np.argsort(np.where(is_candidate, priority, 2.0), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(width)[None, :].repeat(n, 0), axis=1)
        chosen = is_candidate & (rank < wanted[:, None])
    taken = chosen.sum(axis=1)
    # Positions ascending, the rest padded after them.
    positions = np.argsort(~chosen, axis=1, kind="stable")[:, :limit].astype(np.int32)
    weights = (np.arange(limit)[None, :] < taken[:, None]).astype(np.float32)
    positions = np.where(weights > 0, positions, 0).astype(np.int32)
    targets = np.where(weights > 0, np.take_along_axis(encoded.token_ids, positions, axis=1), 0).astype(np.int32)
    how = rng.random((n, limit))
    random_tokens = random_ids[rng.integers(0, len(random_ids), (n, limit))]
    shown = np.where(how < settings.mask_token_ratio, mask_id, targets)
    shown = np.where((how >= settings.mask_token_ratio) & (how < settings.mask_token_ratio + settings.random_token_ratio),
                     random_tokens, shown)  # fmt: skip
    token_ids = encoded.token_ids.copy()
    rows = np.nonzero(weights)[0]
    token_ids[rows, positions[weights > 0]] = shown[weights > 0]
    return Masked(token_ids=token_ids, positions=positions, targets=targets, weights=weights)


def _whole_words(words: np.ndarray, priority: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Bool [N, W]: words taken in order of their priority (that of their first position), each
    skipped that would take the input past its wanted count, as transformers' collator does."""
    chosen = np.zeros(words.shape, bool)
    for row in np.flatnonzero(wanted):
        ids = words[row]
        starts, sizes = np.unique(ids[ids >= 0], return_counts=True)
        left = int(wanted[row])
        picked = []
        for index in np.argsort(priority[row, starts], kind="stable"):
            if sizes[index] <= left:
                picked.append(starts[index])
                left -= int(sizes[index])
                if not left:
                    break
        chosen[row] = np.isin(ids, picked) & (ids >= 0)
    return chosen
