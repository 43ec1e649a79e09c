"""TensorFlow Datasets imported with TensorFlow kept off every GPU, for the `tfds:` data sources.

TensorFlow is an optional dependency (the `tfds` extra), imported only here and only when a
`tfds:` source is read or the `clue_afqmc` builder is registered: the core never imports it.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

from sda_jax.errors import InputError

_logger = logging.getLogger(__name__)
_tfds_module: ModuleType | None = None


def import_tfds() -> ModuleType:
    """Imports TensorFlow with every GPU hidden from it, then tensorflow_datasets; returns the latter.

    TF allocates (by default nearly all) GPU memory when it initialises its devices at the first
    op, so the GPUs are hidden before anything can run. With tensorflow-cpu there is no GPU to
    hide; with a full `tensorflow` install this keeps it off the accelerator JAX uses.
    """
    global _tfds_module
    if _tfds_module is not None:
        return _tfds_module
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no C++ INFO/WARNING chatter on import
    try:
        import tensorflow as tf
    except ImportError:
        raise InputError(
            "tfds: data sources need TensorFlow Datasets: pip install 'sda-jax[tfds]' "
            "(tensorflow-cpu and tensorflow-datasets)"
        ) from None
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # TF's devices were initialised before we got here (someone else imported and used TF).
        if tf.config.get_visible_devices("GPU"):
            _logger.warning("TensorFlow was initialised with GPUs visible before tfds_source could hide them")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise InputError("tfds: data sources need tensorflow-datasets: pip install 'sda-jax[tfds]'") from None
    tfds.disable_progress_bar()
    _tfds_module = tfds
    return tfds
