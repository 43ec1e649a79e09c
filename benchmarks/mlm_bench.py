"""Masked-LM train-step speed: sda-jax's `mlm_train_step` against transformers' BertForMaskedLM eager.

    python -m benchmarks.mlm_bench                  # small model (configs/afqmc_small.py), batch 64, 12 timed steps
    python -m benchmarks.mlm_bench --steps 4        # fewer

Both forms train on the same batches: `mlm_corpus.mlm_batches` over AFQMC's train + test pairs
(BERT's masking, seed 2021), padded to the same bucket lengths. sda-jax: the jitted, donated step,
one program per bucket, the head on the predicted positions alone (float32 on CPU). PyTorch:
`transformers.BertForMaskedLM` in eager mode, labels -100 outside the predicted positions (its
loss over the full logits, as `run_mlm.py` trains), `torch.optim.AdamW(foreach=True)`, the same
initial weights. Each form first runs every bucket shape once (compiles, warm-up); then the forms
take turns over `--rounds` slices of the timed batches, so that drift in a shared machine's speed
falls on both alike. Prints non-padding tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import jax
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per form")
    parser.add_argument("--rounds", type=int, default=3, help="turns the forms take over the timed steps")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import torch
    import transformers

    from configs import afqmc_tapt
    from sda_jax.config import Settings
    from sda_jax.data import mlm_corpus
    from sda_jax.hf import convert
    from sda_jax.hf.load import bert_config
    from sda_jax.models.masked_lm import BertForMaskedLM
    from sda_jax.step import mlm_step
    from sda_jax.step.hyperparameters import Hyperparameters

    config_dict = afqmc_tapt.get_config()
    config_dict.train.batch_size = args.batch_size
    config_dict.data.bucket_lengths = (32, 48, 64)
    settings = Settings.from_config(config_dict)
    corpus = mlm_corpus.read_corpus(settings)
    config = bert_config(settings, len(corpus.tokenizer))
    batches = list(itertools.islice(mlm_corpus.mlm_batches(corpus, settings, settings.data.bucket_lengths), args.steps))
    warmup = [next(b for b in mlm_corpus.mlm_batches(corpus, settings, settings.data.bucket_lengths, 1000)
                   if b["input_ids"].shape[1] == n) for n in settings.data.bucket_lengths]  # fmt: skip
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    # The same initial weights in both frameworks: transformers' init, converted.
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**config.to_hf_dict(settings.data.label_names, masked_lm=True), attn_implementation="eager")
    torch_model = transformers.BertForMaskedLM(hf_config).train()
    state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params, _ = convert.params_from_state_dict(state_dict, config, jax.random.key(0), source="torch", masked_lm=True)
    model = BertForMaskedLM(config)
    hyper = Hyperparameters.of(settings, 1000)
    state = mlm_step.create_state(params, hyper, settings)
    step = jax.jit(functools.partial(mlm_step.mlm_train_step, model=model, settings=settings), donate_argnums=0)
    key = jax.random.key(1)
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=settings.optim.learning_rate, foreach=True)

    def torch_step(batch):
        ids = torch.from_numpy(batch["input_ids"]).long()
        labels = torch.full_like(ids, -100)
        rows = np.nonzero(batch["mlm_weights"])
        labels[rows[0], batch["mlm_positions"][rows]] = torch.from_numpy(batch["mlm_targets"][rows]).long()
        out = torch_model(input_ids=ids, token_type_ids=torch.from_numpy(batch["token_type_ids"]).long(),
                          attention_mask=torch.from_numpy(batch["attention_mask"]).long(), labels=labels)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return out.loss.item()

    def jax_steps(state, chunk):
        for batch in chunk:
            state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
        return state

    for batch in warmup:
        state = jax_steps(state, [batch])
        torch_step(batch)
    seconds = {"sda-jax": 0.0, "torch eager": 0.0}
    for chunk in np.array_split(np.arange(len(batches)), args.rounds):
        chunk = [batches[i] for i in chunk]
        start = time.perf_counter()
        state = jax_steps(state, chunk)
        seconds["sda-jax"] += time.perf_counter() - start
        start = time.perf_counter()
        for batch in chunk:
            torch_step(batch)
        seconds["torch eager"] += time.perf_counter() - start
    arch = f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}"
    print(f"masked-LM train step, {arch}, batch {args.batch_size}, buckets {settings.data.bucket_lengths}, "
          f"{len(batches)} timed steps in {args.rounds} rounds, {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), jax {jax.__version__}")  # fmt: skip
    for name, value in seconds.items():
        print(f"{name:12s} {tokens / value:9.0f} tokens/s  {1000 * value / len(batches):8.1f} ms/step")
    print(f"ratio sda-jax / torch eager: {seconds['torch eager'] / seconds['sda-jax']:.2f}")


if __name__ == "__main__":
    main()
