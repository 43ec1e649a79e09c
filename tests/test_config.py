"""Config files, overrides, the typed settings (each key written once) and their errors."""

import json
import re

import pytest

from configs import afqmc, afqmc_small, default
from sda_jax import config as settings_module
from sda_jax.config import Settings
from sda_jax.errors import InputError
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("module", [default, afqmc, afqmc_small])
def test_shipped_configs_are_valid(module):
    settings = Settings.from_config(module.get_config())
    assert settings.data.bucket_lengths is None and settings.data.num_buckets is None  # chosen by bucket_policy's cost model
    assert settings.data.train_file.exists()


def test_each_key_is_written_once_with_its_default_and_comment():
    """configs/default.py is built from the settings' fields: the same keys, the same defaults."""
    keys = settings_module.describe()
    assert len(keys) == len({name for name, _, _ in keys}) == 69 + len(settings_module.SWEEP_KEYS)  # 7 of them pretrain.*
    assert all(comment and "\n" not in comment for _, _, comment in keys)
    assert Settings.from_config(default.get_config()) == Settings()  # the dataclass defaults are the config's
    flat = lambda tree, prefix="": [k for key, v in tree.items() for k in (flat(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])]
    config_keys = flat(default.get_config().to_dict())
    plain = [name for name, _, _ in keys if not name.startswith("sweep.")]
    assert sorted(k for k in config_keys if not k.startswith("sweep.")) == sorted(plain)
    # The sweep section mirrors every key (a key no sweep can take is refused with why, not "no such key").
    assert sorted(k.removeprefix("sweep.") for k in config_keys if k.startswith("sweep.")) == sorted(plain)


def test_the_configuration_page_is_current():
    """docs/configuration.md is generated from the declarations; regenerate it with
    `python -m sda_jax.config --markdown > docs/configuration.md`."""
    page = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == settings_module.configuration_page()
    for name, _, _ in settings_module.describe():
        assert f"| `{name}` |" in page, name


def test_a_run_record_reads_back_as_the_same_settings(tmp_path):
    settings = Settings.from_config(afqmc_small.get_config())
    path = tmp_path / "settings.json"
    path.write_text(settings.to_record())
    assert Settings.from_record(path) == settings
    record = json.loads(path.read_text())
    del record["optim"]["learning_rate"]
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: key optim.learning_rate: missing"):
        Settings.from_record(path)
    record["optim"]["learning_rate"], record["optim"]["momentum"] = 1e-4, 0.9
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"key optim.momentum: not a config key of this version of sda-jax"):
        Settings.from_record(path)


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
        ("data.label_names", ("a", "a"), "data.label_names: expected distinct values"),
        ("data.bucket_lengths", (), "give at least one length, or None"),
        ("optim.max_grad_norm", 0.0, "optim.max_grad_norm: expected a number > 0"),
        ("train.max_steps", 0, "train.max_steps: expected an integer >= 1"),
        ("data.bucket_lengths", (0, 64), "data.bucket_lengths: expected a list of integers >= 1"),
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


@pytest.fixture
def train_cli(cli):
    return lambda *args: cli.run("sda_jax.train", *args, timeout=120)


def test_unknown_override_key_fails(tmp_path, train_cli):
    result = train_cli("--config", "configs/afqmc_small.py", "--config.train.no_such_key=3", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --config.train.no_such_key: no such config key"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_bad_override_value_is_one_line_error(tmp_path, train_cli):
    result = train_cli("--config", "configs/afqmc_small.py", "--config.data.bucket_lengths=(16,80)", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: config key data.bucket_lengths")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_missing_config_file_fails(tmp_path, train_cli):
    result = train_cli("--config", str(tmp_path / "nope.py"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.py'}: no such config file"]


def test_an_override_given_twice_counts_once_the_last(tmp_path, train_cli):
    # ml_collections joins repeated tuple overrides into one tuple: (16, 64) then (16, 80) would be
    # (16, 64, 16, 80). The command line keeps the last, as it does for every other flag.
    result = train_cli(
        "--config", "configs/afqmc_small.py", "--config.data.bucket_lengths=(16,64)", "--config.data.bucket_lengths=(16,80)",
        f"--workdir={tmp_path / 'w'}",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config key data.bucket_lengths: the largest bucket must equal data.max_seq_len=64, got (16, 80)"
    )


def test_none_on_the_command_line_turns_a_key_off(tmp_path, train_cli):
    """`--config.KEY=None` for a key whose default is not None (ml_collections cannot parse it)."""
    off = train_cli("--config", "configs/afqmc_small.py", "--config.optim.lookahead_k=None", "--config.train.batch_size=0",
                    f"--workdir={tmp_path / 'w'}")  # fmt: skip
    assert off.stderr.strip().splitlines()[-1] == "error: config key train.batch_size: expected an integer >= 1, got 0"
    refused = train_cli("--config", "configs/afqmc_small.py", "--config.optim.learning_rate=None", f"--workdir={tmp_path / 'w'}")
    assert refused.stderr.strip().splitlines()[-1] == "error: config key optim.learning_rate: expected a number in [0, inf], got None"
    unknown = train_cli("--config", "configs/afqmc_small.py", "--config.optim.nope=None", f"--workdir={tmp_path / 'w'}")
    assert unknown.stderr.strip().splitlines()[-1] == "error: --config.optim.nope: no such config key"
    assert not (tmp_path / "w").exists()
