"""TFDS builder `clue_afqmc`: the CLUE AFQMC sentence-pair task as a TensorFlow Datasets dataset.

Importing this package imports TensorFlow (CPU only: GPUs are hidden from it first, see
`sda_jax.tfds_source.import_tfds`) and registers the builder, so that `tfds.builder("clue_afqmc")`
and `tfds build clue_afqmc --imports sda_jax.tfds_afqmc --manual_dir DIR` find it.
"""

from sda_jax import tfds_source

tfds_source.import_tfds()

from sda_jax.tfds_afqmc.clue_afqmc_dataset_builder import (  # noqa: E402  (TF must be set up first)
    DOWNLOAD_URL,
    ClueAfqmc,
)

__all__ = ["ClueAfqmc", "DOWNLOAD_URL"]
