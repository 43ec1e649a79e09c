"""AFQMC with the reference notebook's hyper-parameters on bert-base-chinese.

The reference fine-tunes pretrained bert-base-chinese weights. Put them in a folder with
config.json + vocab.txt + model.safetensors (see README, "Pretrained checkpoints") and run:

    python -m sda_jax.train --config configs/afqmc.py --config.model.dir=/path/to/bert-base-chinese \
        --workdir runs/afqmc
"""

from configs import default


def get_config():
    """The reference recipe: batch 64, 1 epoch, lr 2e-5, SDA decay 0.995, eval EMA 0.999 (from step 800)."""
    config = default.get_config()
    config.train.eval_every = 400  # the reference's logging_step
    # The reference creates its eval EMA at the first logging step at or after ema_start_step=500.
    config.sda.eval_ema_start_step = 800
    return config
