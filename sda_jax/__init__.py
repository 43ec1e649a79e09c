"""sda-jax: fine-tune BERT-family classifiers with self-distillation averaging (SDA) in JAX."""

__version__ = "0.1.0"
