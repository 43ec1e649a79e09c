"""The PyTorch oracle: the reference notebook's recipe in torch, which the tests measure sda-jax against and the benchmarks time."""
