"""The task's train/dev/test splits, read, checked and encoded once before training starts.

Everything here can fail on user input, so it runs before the workdir is created: a bad file
stops the run with nothing written.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import transformers

from sda_jax import input_pipeline
from sda_jax.input_pipeline import Encoded
from sda_jax.settings import DataSettings


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    train: Encoded
    dev: Encoded
    test: Encoded
    tokenizer: transformers.PreTrainedTokenizerFast


def load_splits(data: DataSettings, model_dir: pathlib.Path) -> Splits:
    """Reads the three files (dev needs labels, test does not) and tokenizes them."""
    tokenizer = input_pipeline.load_tokenizer(model_dir)
    keys = {"text_a_key": data.text_a_key, "text_b_key": data.text_b_key, "label_key": data.label_key, "id_key": data.id_key}

    def read(path: pathlib.Path, split: str, require_labels: bool) -> Encoded:
        if data.source == "files":
            examples = input_pipeline.read_clue_file(path, data.label_names, require_labels=require_labels, **keys)
        else:  # TensorFlow is imported only here, when a tfds: source asks for it
            from sda_jax import tfds_source

            examples = tfds_source.read_tfds_split(
                data.source, split, data.label_names, require_labels=require_labels,
                data_dir=data.tfds_data_dir, manual_dir=data.tfds_manual_dir, **keys,
            )  # fmt: skip
        if examples.empty_text_lines:
            lines = examples.empty_text_lines
            print(
                f"note: {examples.path}: {len(lines)} rows have an empty sentence (first on line {lines[0]}); they are kept",
                file=sys.stderr,
            )
        return input_pipeline.encode(examples, tokenizer, data.max_seq_len)

    train_split, dev_split, test_split = data.tfds_splits
    return Splits(
        train=read(data.train_file, train_split, True),
        dev=read(data.dev_file, dev_split, True),
        test=read(data.test_file, test_split, False),
        tokenizer=tokenizer,
    )


def bucket_lengths(data: DataSettings, train: Encoded) -> tuple[int, ...]:
    """The configured bucket lengths, or `data.num_buckets` lengths fitted to the train set.

    Every process reads the whole train set, so all of them fit the same lengths.
    """
    return data.bucket_lengths or input_pipeline.fit_bucket_lengths(train.lengths, data.num_buckets, data.max_seq_len)
