"""The task's train/dev/test splits, read, checked and encoded: the one place that turns a split into ids.

Everything here can fail on user input, so it runs before the workdir is created: a bad file
stops the run with nothing written. The benchmark, the PyTorch reference and the tests read their
data through `read_split` too, so they see exactly the ids training sees.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING

import numpy as np

from sda_jax.config import DataSettings
from sda_jax.data import tokenization
from sda_jax.data.clue_files import Examples, read_clue_file
from sda_jax.data.tokenization import Encoded
from sda_jax.errors import InputError

if TYPE_CHECKING:  # transformers is imported where a tokenizer is loaded (tokenization.load_tokenizer)
    import transformers

SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    train: Encoded
    dev: Encoded
    test: Encoded
    tokenizer: transformers.PreTrainedTokenizerFast


def read_examples(data: DataSettings, split: str, *, labels: bool = True) -> Examples:
    """The rows of one split (`train`, `dev` or `test`) from the configured files or TFDS set.

    Train and dev need labels, test does not; without `labels` (the text alone, for masked-LM
    pretraining) none is read, from files only.
    """
    keys = {"text_a_key": data.text_a_key, "text_b_key": data.text_b_key, "label_key": data.label_key, "id_key": data.id_key}
    require_labels = labels and split != "test"
    if not labels:
        if data.source != "files":
            raise InputError(f"config key data.source: masked-LM pretraining reads the three files, not {data.source}")
        keys["label_key"] = None
    if data.source == "files":
        path = {"train": data.train_file, "dev": data.dev_file, "test": data.test_file}[split]
        return read_clue_file(path, data.label_names, require_labels=require_labels, **keys)
    from sda_jax.data.tfds import source  # TensorFlow is imported only when a tfds: source asks for it

    return source.read_tfds_split(
        data.source, data.tfds_splits[SPLITS.index(split)], data.label_names, require_labels=require_labels,
        data_dir=data.tfds_data_dir, manual_dir=data.tfds_manual_dir, **keys,
    )  # fmt: skip


def read_split(data: DataSettings, split: str, tokenizer: transformers.PreTrainedTokenizerFast) -> Encoded:
    """One split read and encoded with the run's truncation; notes rows with an empty sentence."""
    examples = read_examples(data, split)
    if examples.empty_text_lines:
        lines = examples.empty_text_lines
        print(
            f"note: {examples.path}: {len(lines)} rows have an empty sentence (first on line {lines[0]}); they are kept",
            file=sys.stderr,
        )
    return tokenization.encode(examples, tokenizer, data.max_seq_len, data.truncation)


def load_splits(data: DataSettings, model_dir) -> Splits:
    """The tokenizer of `model_dir` and the three splits, encoded."""
    tokenizer = tokenization.load_tokenizer(model_dir)
    return Splits(*(read_split(data, split, tokenizer) for split in SPLITS), tokenizer=tokenizer)


def class_prior(encoded: Encoded) -> tuple[int, float]:
    """The most frequent label of a labelled split and its share of the rows."""
    counts = np.bincount(encoded.labels)
    return int(counts.argmax()), float(counts.max() / counts.sum())
