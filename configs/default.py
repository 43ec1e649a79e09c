"""Default hyper-parameters of sda-jax: the reference recipe on AFQMC, bert-base-chinese sized.

Every other config starts from this one. Every key, with its default and its one-line comment,
is declared once, in `sda_jax/config.py` (`python -m sda_jax.config` lists them). Run with:

    python -m sda_jax.train --config configs/default.py --workdir runs/default

Relative paths in data/model keys are resolved against the current directory; the defaults point
at the `shared/` folder beside the repository (or, where a copy of it sits inside the repository,
as on a lent GPU machine, at that one), wherever the command is run from.
"""

import ml_collections

from sda_jax import config


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration: every key of `sda_jax.config`, at its default."""
    return config.default_config()
