"""sda-jax: fine-tune BERT-family classifiers with self-distillation averaging (SDA) in JAX."""

import logging
import time

__version__ = "0.1.0"

# When the package was first imported: the command lines count the imports after it as startup.
IMPORTED_AT = time.perf_counter()


def _not_torch_advice(record: logging.LogRecord) -> bool:
    # The core needs no PyTorch (only tokenizers and configs of transformers): without it,
    # transformers' import says "PyTorch was not found..." before every command's own output.
    return not str(record.msg).startswith("PyTorch was not found")


logging.getLogger("transformers").addFilter(_not_torch_advice)
