"""sda-jax: fine-tune BERT-family classifiers with self-distillation averaging (SDA) in JAX."""

import time

__version__ = "0.1.0"

# When the package was first imported: the command lines count the imports after it as startup.
IMPORTED_AT = time.perf_counter()
