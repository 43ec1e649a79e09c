"""Config files, overrides and the typed settings' errors."""

import subprocess
import sys

import pytest

from configs import afqmc, afqmc_small, default
from sda_jax.errors import InputError
from sda_jax.settings import Settings
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("module", [default, afqmc, afqmc_small])
def test_shipped_configs_are_valid(module):
    settings = Settings.from_config(module.get_config())
    assert settings.data.bucket_lengths == () and settings.data.num_buckets == 0  # chosen by bucket_policy's cost model
    assert settings.data.train_file.exists()


def test_afqmc_config_mirrors_the_reference():
    s = Settings.from_config(afqmc.get_config())
    assert (s.train.batch_size, s.train.num_epochs, s.data.max_seq_len, s.seed) == (64, 1, 64, 2021)
    assert (s.optim.learning_rate, s.optim.warmup_ratio, s.optim.weight_decay, s.optim.adam_eps) == (2e-5, 0.05, 0.01, 1e-8)
    assert (s.sda.teacher_decay, s.sda.kd_coeff, s.sda.eval_ema_decay) == (0.995, 1.0, 0.999)
    assert (s.optim.lookahead_k, s.optim.lookahead_alpha, s.optim.adam_bias_correction) == (5, 1.0, False)
    assert s.data.bucket_multiplier == 200 and s.train.eval_every == 400


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.bucket_lengths", (32, 16, 64), "strictly increasing"),
        ("data.bucket_lengths", (16, 32), "largest bucket must equal data.max_seq_len"),
        ("data.num_buckets", -1, "data.num_buckets"),
        ("data.label_names", ("0",), "data.label_names"),
        ("train.batch_size", 0, "train.batch_size"),
        ("model.dtype", "float8", "model.dtype"),
        ("optim.warmup_ratio", 1.5, "optim.warmup_ratio"),
        ("train.seeds", (1, 1), "train.seeds: expected distinct seeds"),
        ("train.seeds", (1, -2), "train.seeds: expected a list of integers >= 0"),
        ("data.truncation", "left", "data.truncation: expected one of longest_first, reference"),
    ],
)
def test_bad_values_name_their_key(key, value, message):
    config = default.get_config()
    section, name = key.split(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(InputError, match=message):
        Settings.from_config(config)


def test_architecture_overrides_need_from_scratch():
    config = afqmc_small.get_config()
    config.model.from_scratch = False
    with pytest.raises(InputError, match="model.from_scratch"):
        Settings.from_config(config)


def _train_cli(*args, cwd=REPO_ROOT):
    return subprocess.run(
        [sys.executable, "-m", "sda_jax.train", *args], cwd=cwd, capture_output=True, check=False, text=True, timeout=120
    )


def test_unknown_override_key_fails(tmp_path):
    result = _train_cli("--config", "configs/afqmc_small.py", "--config.train.no_such_key=3", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no_such_key" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_bad_override_value_is_one_line_error(tmp_path):
    result = _train_cli("--config", "configs/afqmc_small.py", "--config.data.bucket_lengths=(16,80)", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: config key data.bucket_lengths")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_missing_config_file_fails(tmp_path):
    result = _train_cli("--config", str(tmp_path / "nope.py"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.py'}: no such config file"]


def test_an_override_given_twice_counts_once_the_last(tmp_path):
    # ml_collections joins repeated tuple overrides into one tuple: (16, 64) then (16, 80) would be
    # (16, 64, 16, 80). The command line keeps the last, as it does for every other flag.
    result = _train_cli(
        "--config", "configs/afqmc_small.py", "--config.data.bucket_lengths=(16,64)", "--config.data.bucket_lengths=(16,80)",
        f"--workdir={tmp_path / 'w'}",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config key data.bucket_lengths: the largest bucket must equal data.max_seq_len=64, got (16, 80)"
    )
