"""Masked-LM pretraining's inputs: the task's sentences as a corpus, and its masked batches.

`read_corpus` reads the splits of `pretrain.splits` (train and test by default; labels are never
read) and the held-out split (dev by default) with the run's tokenizer and truncation, as pairs
`[CLS] a [SEP] b [SEP]` (the fine-tuning format) or each sentence alone (`pretrain.pairs`).
Everything here can fail on user input, so it runs before the workdir is touched.

`mlm_batches` are the train pipeline's batches (`input_pipeline.batch_indices`: the same bucket
sampler, a pure function of (seed, step)) over the inputs as each epoch's masking left them
(`masking.mask` of (seed, epoch)), with the predicted positions, their targets and weights,
`max_predictions(width)` per row.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from sda_jax.config import Settings
from sda_jax.data import input_pipeline, masking, splits, tokenization
from sda_jax.data.clue_files import Examples
from sda_jax.data.tokenization import Encoded


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    train: Encoded
    heldout: Encoded
    train_words: np.ndarray  # int32 [N, W]: `masking`'s word of each position
    heldout_words: np.ndarray
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    special_ids: tuple[int, ...]
    random_ids: np.ndarray  # the tokens a random replacement draws from: every non-special one

    @property
    def mask_id(self) -> int:
        return int(self.tokenizer.mask_token_id)


def _examples(settings: Settings, names: Sequence[str]) -> Examples:
    """The sentences of the named splits, as pairs or (`pretrain.pairs` False) one by one."""
    read = [splits.read_examples(settings.data, name, labels=False) for name in names]
    has_b = {examples.text_b is not None for examples in read}
    text_a = list(itertools.chain.from_iterable(e.text_a for e in read))
    if settings.pretrain.pairs and has_b == {True}:
        text_b = list(itertools.chain.from_iterable(e.text_b for e in read))
    else:  # single sentences: every sentence of every row, a's then b's
        text_a += list(itertools.chain.from_iterable(e.text_b or [] for e in read))
        text_b = None
    return Examples(text_a=text_a, text_b=text_b, labels=None, ids=list(range(len(text_a))), path=", ".join(e.path for e in read))


def read_corpus(settings: Settings) -> Corpus:
    """The tokenizer of `model.dir`, the pretraining inputs and the held-out ones, encoded, and their words."""
    tokenizer = tokenization.load_tokenizer(settings.model.dir)
    special_ids = tuple(sorted(set(tokenizer.all_special_ids)))
    encoded, words = [], []
    for names in (settings.pretrain.splits, (settings.pretrain.heldout_split,)):
        examples = _examples(settings, names)
        inputs = tokenization.encode(examples, tokenizer, settings.data.max_seq_len, settings.data.truncation)
        encoded.append(inputs)
        if settings.pretrain.whole_word_masking:
            words.append(masking.jieba_words(examples, inputs, tokenizer, special_ids))
        else:
            words.append(masking.token_words(inputs, special_ids))
    random_ids = np.setdiff1d(np.arange(len(tokenizer)), special_ids).astype(np.int32)
    return Corpus(encoded[0], encoded[1], words[0], words[1], tokenizer, special_ids, random_ids)


def _with_predictions(batch: dict[str, np.ndarray], masked: masking.Masked, indices: np.ndarray, mask_prob: float) -> dict[str, np.ndarray]:
    """A padded batch of the masked inputs `indices` with their predictions, as many per row as its width allows."""
    rows, width = batch["input_ids"].shape
    limit = masking.max_predictions(width, mask_prob)
    for name, source, dtype in (("mlm_positions", masked.positions, np.int32), ("mlm_targets", masked.targets, np.int32),
                                ("mlm_weights", masked.weights, np.float32)):  # fmt: skip
        out = np.zeros((rows, limit), dtype)
        kept = min(limit, source.shape[1])  # a draw over shorter inputs than this bucket has fewer columns
        out[: len(indices), :kept] = source[indices, :kept]
        batch[name] = out
    return batch


def mlm_batches(corpus: Corpus, settings: Settings, bucket_lengths: Sequence[int], start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless train batches from `start_step` on: step s's batch of the train pipeline, masked by its epoch's draw."""
    masked, masked_epoch = None, -1
    train = settings.train
    for epoch, indices in input_pipeline.batch_indices(
        corpus.train.lengths, batch_size=train.batch_size, bucket_multiplier=settings.data.bucket_multiplier,
        seed=settings.seed, start_step=start_step,
    ):  # fmt: skip
        if epoch != masked_epoch:
            masked, masked_epoch = _mask(corpus, settings, corpus.train, corpus.train_words, epoch, masking.TRAIN_STREAM), epoch
        batch = input_pipeline.make_batch(
            dataclasses.replace(corpus.train, token_ids=masked.token_ids), indices, batch_size=train.batch_size,
            bucket_lengths=bucket_lengths,
        )  # fmt: skip
        yield _with_predictions(batch, masked, indices, settings.pretrain.mask_prob)


def heldout_batches(corpus: Corpus, settings: Settings, bucket_lengths: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """The held-out inputs, masked once (the same draw at every evaluation), in batches by length."""
    masked = _mask(corpus, settings, corpus.heldout, corpus.heldout_words, 0, masking.HELDOUT_STREAM)
    inputs = dataclasses.replace(corpus.heldout, token_ids=masked.token_ids)
    order = input_pipeline.eval_order(inputs)
    size = settings.train.batch_size
    out = []
    for begin in range(0, len(order), size):
        indices = order[begin : begin + size]
        batch = input_pipeline.make_batch(inputs, indices, batch_size=size, bucket_lengths=bucket_lengths)
        out.append(_with_predictions(batch, masked, indices, settings.pretrain.mask_prob))
    return out


def _mask(corpus: Corpus, settings: Settings, encoded: Encoded, words: np.ndarray, epoch: int, stream: int) -> masking.Masked:
    return masking.mask(
        encoded, words, settings.pretrain, mask_id=corpus.mask_id, random_ids=corpus.random_ids, seed=settings.seed,
        epoch=epoch, stream=stream,
    )  # fmt: skip
