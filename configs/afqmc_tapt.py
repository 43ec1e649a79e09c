"""Task-adaptive pretraining on AFQMC: masked-LM training on its own sentences, then fine-tuning.

Continued masked-LM pretraining on the train and test sentences (labels never read), the dev
sentences held out for the masked-LM loss and accuracy; BERT's masking (15%: 80% [MASK], 10%
random, 10% kept), drawn anew every epoch, as sentence pairs. With real weights set `model.dir`
to the checkpoint (bert-base-chinese has its masked-LM head; for a chinese-roberta-wwm-ext
recipe add `--config.pretrain.whole_word_masking=True`, which needs `pip install 'sda-jax[wwm]'`).
The default here is the 4-layer small model of configs/afqmc_small.py from scratch, for CPUs:

    python -m sda_jax.pretrain --config configs/afqmc_tapt.py --workdir runs/tapt
    python -m sda_jax.export --workdir runs/tapt --out exported/tapt
    python -m sda_jax.train --config configs/afqmc.py --config.model.dir=exported/tapt \\
        --config.optim.learning_rate=1e-4 --config.train.eval_every=200 --workdir runs/afqmc_from_tapt

(the last is configs/afqmc_small.py's recipe, its architecture now read from the export).
"""

from configs import afqmc_small


def get_config():
    """The small model's architecture and data; AdamW at a pretraining rate, a few epochs."""
    config = afqmc_small.get_config()
    config.optim.learning_rate = 5e-4  # from scratch; with pretrained weights 5e-5 is the usual TAPT rate
    config.optim.warmup_ratio = 0.06
    config.train.num_epochs = 3
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    return config
