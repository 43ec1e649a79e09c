"""A small BERT (4 layers, hidden 256) trained from scratch on AFQMC: for CPU runs and tests.

No pretrained weights are involved: the architecture comes from bert-base-chinese's config.json
with the overrides below, and the vocabulary from its vocab.txt. Run with:

    python -m sda_jax.train --config configs/afqmc_small.py --workdir runs/afqmc_small
"""

from configs import default


def get_config():
    """The reference recipe on a 4-layer, 256-wide BERT initialised from scratch."""
    config = default.get_config()
    config.model.from_scratch = True
    config.model.num_hidden_layers = 4
    config.model.hidden_size = 256
    config.model.num_attention_heads = 4
    config.model.intermediate_size = 1024
    config.optim.learning_rate = 1e-4  # from scratch a small model needs a larger step than 2e-5
    config.train.eval_every = 200
    return config
