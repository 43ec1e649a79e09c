"""GPU acceptance tests, `pytest -m gpu`: they need a GPU that JAX sees, and are skipped elsewhere.

`benchmarks/gpu_acceptance.sh` runs them on a lent machine. What they hold the GPU to:

* the bf16 and fp16 train steps (on the GPU) follow the float32 step (on the CPU, the reference
  numerics) from the same weights on the same batches, within tolerances that 16-bit matmuls
  allow (stated below);
* a run compiles each program once: one train program per bucket length, one eval program per
  bucket length and member count, none later;
* a GPU-trained run exports to a Hugging Face folder whose PyTorch logits match sda-jax's.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from sda_jax import kernels
from sda_jax.config import Settings
from sda_jax.data import input_pipeline, splits, tokenization
from sda_jax.models.bert import BertForSequenceClassification, init_params
from sda_jax.models.config import BertConfig
from sda_jax.step.hyperparameters import Hyperparameters
from sda_jax.step.train_step import create_train_state, train_step
from tests.conftest import TINY_RUN_FLAGS

_STAND_IN = os.environ.get("SDA_GPU_TESTS_DEVICE") == "cpu"


def _gpus() -> list:
    """The GPUs JAX sees; with SDA_GPU_TESTS_DEVICE=cpu the CPU stands in for one (bf16 emulated),
    so that these tests' code paths can be checked on a machine without a GPU."""
    if _STAND_IN:
        return jax.devices("cpu")
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpus(), reason="needs a GPU that JAX sees")]

CONFIG = BertConfig(
    vocab_size=21128, hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512,
    max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2,
)  # fmt: skip
# |loss(16-bit GPU) - loss(float32 CPU)| over 8 steps at lr 1e-4; bf16 keeps 8 bits of mantissa, fp16
# 11. Measured with the CPU standing in (SDA_GPU_TESTS_DEVICE=cpu): 0.018 (bf16), 0.007 (fp16). At
# lr 1e-3 the float32 trajectory itself is chaotic from these N(0, 0.2) weights (its loss jumps
# from 1.1 to 3.7 and back), and the 16-bit steps part from it by ~0.9.
LOSS_ATOL = {jnp.bfloat16: 0.05, jnp.float16: 0.02}


def _steps(dtype, device, batches, settings) -> tuple[list[float], dict]:
    with jax.default_device(device):
        # A GPU run's forms (`model.kernels=auto`): XLA's 16-bit forms, reading the weight copies.
        forms = kernels.XLA if dtype != jnp.float32 else kernels.REFERENCE
        model = BertForSequenceClassification(CONFIG, dtype=dtype, forms=forms)
        params = init_params(CONFIG, jax.random.key(0))
        hyper = Hyperparameters.of(settings, 100)
        state = create_train_state(params, hyper, settings, compute_dtype=dtype, weight_copies=forms.weight_copies)
        step = jax.jit(lambda s, b: train_step(s, b, jax.random.key(1), model=model, settings=settings))
        losses = []
        for batch in batches:
            state, metrics = step(state, jax.device_put(batch, device))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state.params)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_gpu_steps_follow_the_float32_cpu_step(dtype, bert_base_chinese_dir):
    config = default.get_config()
    config.optim.learning_rate, config.optim.warmup_ratio = 1e-4, 0.0
    settings = Settings.from_config(config)
    dev = splits.read_split(settings.data, "dev", tokenization.load_tokenizer(bert_base_chinese_dir))
    stream = input_pipeline.eval_batches(dev, batch_size=64, bucket_lengths=(32, 64))
    batches = [next(stream) for _ in range(8)]
    cpu_losses, cpu_params = _steps(jnp.float32, jax.devices("cpu")[0], batches, settings)
    gpu_losses, gpu_params = _steps(dtype, _gpus()[0], batches, settings)
    print(f"gpu: {jnp.dtype(dtype).name} losses {np.round(gpu_losses, 4)} vs float32 {np.round(cpu_losses, 4)}")
    np.testing.assert_allclose(gpu_losses, cpu_losses, atol=LOSS_ATOL[dtype])
    assert cpu_losses[-1] < cpu_losses[0]  # it trains, so the comparison is not of a flat line
    # Adam moves every weight by about ±lr per step whatever the gradient's size, so the weights
    # agree to a few steps' worth where gradients round to another sign: compare in norm.
    for name in ("classifier", "bert"):
        a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p[name])]) for p in (gpu_params, cpu_params))
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.02, name


@pytest.fixture(scope="module")
def gpu_cli(cli):
    """The command lines on the GPU: JAX picks its platform (the CPU stand-in: the CPU)."""
    environment = {"JAX_PLATFORMS": "cpu" if _STAND_IN else "", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    return lambda module, *args: cli.run(module, *args, env=environment, timeout=900)


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, gpu_cli):
    workdir = tmp_path_factory.mktemp("gpu") / "run"
    result = gpu_cli(
        "sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}", *TINY_RUN_FLAGS,
        "--config.data.bucket_lengths=(32,64)", "--config.train.max_steps=40", "--config.train.eval_every=20",
        "--config.train.eval_all_params=True", *(["--config.model.dtype=bfloat16"] if _STAND_IN else []),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, json.loads((workdir / "summary.json").read_text())


def test_a_gpu_run_compiles_each_program_once(gpu_run):
    _, summary = gpu_run
    assert summary["compute_dtype"] == "bfloat16" and (_STAND_IN or "cpu" not in summary["devices"].lower())
    assert summary["train_step_compilations"] == 2  # one per bucket length
    assert summary["eval_step_compilations"] == 4  # per bucket length: dev's sets, prediction's one
    print(f"gpu: run of 40 steps, seconds by phase {summary['seconds_by_phase']}")


def test_a_gpu_run_exports_to_pytorch_with_the_same_logits(gpu_run, tmp_path, bert_base_chinese_dir, gpu_cli):
    import torch
    import transformers

    from sda_jax import export

    workdir, _ = gpu_run
    out = tmp_path / "hf"
    result = gpu_cli("sda_jax.export", f"--workdir={workdir}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    params, _ = export.restore_best(workdir, "eval_ema")
    config = BertConfig.from_json_file(workdir / "model" / "config.json")
    dev = splits.read_split(Settings().data, "dev", tokenization.load_tokenizer(bert_base_chinese_dir))
    batch = next(input_pipeline.eval_batches(dev, batch_size=256, bucket_lengths=(64,)))
    with jax.default_device(jax.devices("cpu")[0]):
        ours = np.asarray(BertForSequenceClassification(config).apply(
            {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
        ))  # fmt: skip
    with torch.no_grad():
        theirs = model(**{k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "token_type_ids", "attention_mask")}).logits
    np.testing.assert_allclose(theirs.numpy(), ours, rtol=0, atol=1e-4)
