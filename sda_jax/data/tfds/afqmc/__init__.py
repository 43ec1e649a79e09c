"""TFDS builder `clue_afqmc`: the CLUE AFQMC sentence-pair task as a TensorFlow Datasets dataset.

Importing this package imports TensorFlow (CPU only: GPUs are hidden from it first, see
`sda_jax.data.tfds.tensorflow_cpu.import_tfds`) and registers the builder, so that `tfds.builder("clue_afqmc")`
finds it. To prepare it: `python -m sda_jax.data.tfds.source tfds:clue_afqmc --data_dir DIR
[--manual_dir FOLDER_WITH_THE_JSON_FILES]` (the `tfds build` CLI also works with
`--imports sda_jax.data.tfds.afqmc`, where apache_beam is installed).
"""

from sda_jax.data.tfds.tensorflow_cpu import import_tfds

import_tfds()  # before anything imports TensorFlow

from sda_jax.data.tfds.afqmc.clue_afqmc_dataset_builder import (
    DOWNLOAD_URL,
    ClueAfqmc,
)

__all__ = ["DOWNLOAD_URL", "ClueAfqmc"]
