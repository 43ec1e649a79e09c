"""A hyperparameter grid in one program (`sweep.<key>`): the grid, the refused keys, a member equal
to the single run of its values, the table against the best checkpoints' own logits, programs
shared across grids, export by values."""

from __future__ import annotations

import csv
import io
import json

import jax
import numpy as np
import pytest

from configs import afqmc_small
from sda_jax import export
from sda_jax.config import Settings
from sda_jax.data import input_pipeline, splits, tokenization
from sda_jax.errors import InputError
from sda_jax.models.bert import BertForSequenceClassification
from sda_jax.models.config import BertConfig
from sda_jax.step.model_axis import Models
from sda_jax.workdir import checkpoints
from sda_jax.workdir.layout import Workdir
from tests.conftest import (
    AFQMC_CUT_ROWS,
    TINY_RUN,
    TINY_RUN_FLAGS,
    assert_within_rounding_but_adam_flips,
    moved_by_rounding_alone,
    read_records,
    settings_of,
    train_in_process,
)

RUN = {**TINY_RUN, "train.max_steps": 12, "train.eval_every": 6, "train.log_every": 3, "train.eval_all_params": True}
# Seed 2021 is also the run's: its models see the data order a single run of their values sees.
GRID = {"sweep.optim.learning_rate": (1e-3, 3e-3), "sweep.sda.kd_coeff": (0.5, 1.0), "sweep.seed": (2021, 2022)}


def _sweep_settings(**sweep):
    config = afqmc_small.get_config()
    for key, values in sweep.items():
        *sections, name = key.split(".")
        node = config.sweep
        for section in sections:
            node = node[section]
        node[name] = values
    return Settings.from_config(config)


def test_the_models_are_the_grid_of_the_swept_values():
    settings = _sweep_settings(**{"optim.learning_rate": (1e-5, 2e-5, 3e-5, 5e-5), "seed": (1, 2, 3)})
    models = Models.of(settings)
    assert models.count == 12 and models.seeds == (1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)  # sweep keys in SWEEP_KEYS order
    assert models.values(5) == {"seed": 2, "optim.learning_rate": 2e-5}
    assert models.settings_of(settings, 5).optim.learning_rate == 2e-5 and models.settings_of(settings, 5).seed == 2
    assert Models.of(Settings()).count == 1 and Models.of(Settings()).values(0) == {"seed": 2021}


@pytest.mark.parametrize(
    "key, why",
    [
        ("train.batch_size", "the batch size sets every program's shapes: run one sweep per batch size"),
        ("model.hidden_size", "one architecture"),
        ("sda.teacher", "the teacher's kind"),
        ("adversarial.method", "the attack's method"),
        ("data.max_seq_len", "input pipeline"),
    ],
)
def test_a_key_that_changes_programs_is_refused_with_why(key, why):
    with pytest.raises(InputError, match=rf"config key sweep\.{key}: not a sweep key \(.*{why}.*\); the sweep keys: seed, "):
        _sweep_settings(**{key: (1, 2)})


def test_sweep_values_are_checked_as_their_key(cli):
    with pytest.raises(InputError, match=r"sweep.optim.warmup_ratio: expected a number in \[0, 1.0\] each, got 2"):
        _sweep_settings(**{"optim.warmup_ratio": (0.1, 2)})
    with pytest.raises(InputError, match=r"sweep.seed: expected distinct values"):
        _sweep_settings(seed=(1, 1))
    result = cli.run("sda_jax.train", "--config", "configs/afqmc_small.py", "--config.sweep.train.batch_size=(16,32)", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: config key sweep.train.batch_size: not a sweep key")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The 2 × 2 × 2 grid of GRID, 12 steps of the 1-layer model, in this process."""
    workdir = tmp_path_factory.mktemp("grid") / "run"
    summary = train_in_process(workdir, {**RUN, **GRID, "train.per_model_predictions": True})
    return workdir, summary


def test_a_model_among_others_is_the_single_run_of_its_values(grid, tmp_path):
    """The model of lr 3e-3, kd 0.5 and seed 2021 against a run of those values alone: float32
    rounding, but for Adam's rare flips (`assert_within_rounding_but_adam_flips`: a few word-embedding elements
    of ~700k may end ~1e-6 apart).
    (The data order is the run's `seed`, shared by all models: 2021 here, as the single run's.)"""
    workdir, summary = grid
    index = next(m["model"] for m in summary["models"] if (m["optim.learning_rate"], m["sda.kd_coeff"], m["seed"]) == (3e-3, 0.5, 2021))
    train_in_process(tmp_path / "alone", {**RUN, "optim.learning_rate": 3e-3, "sda.kd_coeff": 0.5})
    together = checkpoints.read_train_state(Workdir(workdir).train_checkpoints, 12)["params"]
    alone = checkpoints.read_train_state(Workdir(tmp_path / "alone").train_checkpoints, 12)["params"]
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(alone)[0], jax.tree.leaves(together), strict=True):
        if not moved_by_rounding_alone(jax.tree_util.keystr(path)):
            key = jax.tree_util.keystr(path)
            worst = max(worst, assert_within_rounding_but_adam_flips(np.asarray(b)[index], a, key))
    print(f"sweep: max |weight among 8 models - weight alone| after 12 steps = {worst:.2e}")
    # ... and the models really differ in what they were given: their learning rates in the log.
    rates = [m["learning_rate"] for m in read_records(workdir, "train")[-1]["models"]]
    assert len(set(rates)) == 2


def test_the_table_is_what_the_best_checkpoints_score(grid, bert_base_chinese_dir):
    """Per combination (lr, kd): mean ± std over its seeds of each model's best dev accuracy,
    recomputed here from each model's best eval EMA on the dev set."""
    workdir, summary = grid
    config = BertConfig.from_json_file(workdir / "model" / "config.json")
    model = BertForSequenceClassification(config)
    dev = splits.read_split(settings_of(RUN).data, "dev", tokenization.load_tokenizer(bert_base_chinese_dir))
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["token_type_ids"], b["attention_mask"]))
    accuracy = []
    for i in range(8):
        params, metrics = export.restore_best(workdir, "eval_ema", model=i)
        logits = np.concatenate([np.asarray(apply(params, b))[b["weights"] > 0] for b in input_pipeline.eval_batches(dev, batch_size=512, bucket_lengths=(64,))])
        accuracy.append(float(np.mean(logits.argmax(-1) == dev.labels)))
        assert accuracy[-1] == pytest.approx(metrics["accuracy"], abs=1e-12)
    rows = list(csv.DictReader(io.StringIO((workdir / "sweep.csv").read_text())))
    assert len(rows) == 4 and all(row["seeds"] == "2021 2022" for row in rows)
    for row in rows:
        members = [m["model"] for m in summary["models"]
                   if m["optim.learning_rate"] == float(row["optim.learning_rate"]) and m["sda.kd_coeff"] == float(row["sda.kd_coeff"])]  # fmt: skip
        values = np.asarray([accuracy[i] for i in members])
        assert float(row["dev_accuracy_mean"]) == pytest.approx(values.mean(), abs=1e-12)
        assert float(row["dev_accuracy_std"]) == pytest.approx(values.std(), abs=1e-12)
    best = summary["best_combination"]
    assert best["dev_accuracy_mean"] == max(float(r["dev_accuracy_mean"]) for r in rows)
    assert summary["best_model"]["dev_accuracy"] == max(accuracy) and summary["best_model"]["model"] == int(np.argmax(accuracy))
    markdown = (workdir / "sweep.md").read_text()
    assert "Best combination (highest mean dev accuracy over its seeds)" in markdown and "Single best model" in markdown
    # The submission is the best combination's ensemble: the mean logits of its seeds' best.
    assert (summary["prediction"]["with"], summary["prediction"]["models"]) == ("best_combination", best["models"])
    per_model = [[json.loads(line)["label"] for line in (workdir / f"afqmc_predict.model{i}.json").read_text().splitlines()] for i in range(8)]
    assert len(per_model[0]) == AFQMC_CUT_ROWS["test"]


def test_export_picks_a_model_by_its_values(grid, tmp_path):
    workdir, summary = grid
    info = export.export(workdir, tmp_path / "one", values="optim.learning_rate=1e-3, sda.kd_coeff=1.0, seed=2022")
    wanted = next(m for m in summary["models"] if (m["optim.learning_rate"], m["sda.kd_coeff"], m["seed"]) == (1e-3, 1.0, 2022))
    assert info["model"] == wanted["model"] and info["sda.kd_coeff"] == 1.0
    with pytest.raises(InputError, match=r"--values: .* trained 4 models of \{'seed': 2022\}"):
        export.export(workdir, tmp_path / "two", values="seed=2022")
    with pytest.raises(InputError, match=r"their ensemble .* is not one model: export one of them with --seed S, --model I or --values"):
        export.export(workdir, tmp_path / "three")


def test_the_submission_can_come_from_the_single_best_model(tmp_path):
    summary = train_in_process(tmp_path / "run", {**RUN, "sweep.seed": (7, 8), "train.predict_with": "best_model"})
    assert summary["prediction"]["models"] == [summary["best_model"]["model"]]
    assert summary["prediction"]["dev_accuracy"] == pytest.approx(summary["best_model"]["dev_accuracy"], abs=1e-12)


def test_grids_of_one_size_share_their_compiled_programs(tmp_path, cli):
    """The swept values are arrays of the state: a grid of other values finds every program in the
    persistent compilation cache."""
    cache = tmp_path / "xla-cache"

    def run(workdir, *values):
        result = cli.run("sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}", *TINY_RUN_FLAGS,
                         "--config.train.max_steps=4", "--config.train.eval_every=4", *values,
                         env={"JAX_COMPILATION_CACHE_DIR": str(cache)}, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return sorted(p.name for p in cache.iterdir())

    first = run(tmp_path / "a", "--config.sweep.optim.learning_rate=(1e-3,2e-3)")
    second = run(tmp_path / "b", "--config.sweep.sda.kd_coeff=(0.3,0.7)", "--config.optim.learning_rate=0.005")
    assert len(first) >= 2 and second == first, (first, second)


def test_settings_of_a_member_are_its_values():
    settings = settings_of({"sweep.optim.learning_rate": (1e-4, 2e-4)})
    assert Models.of(settings).settings_of(settings, 1).optim.learning_rate == 2e-4
