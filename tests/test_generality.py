"""Any CLUE-style classification set: single sentences, three string labels, only config changes."""

import json
import os
import random
import subprocess
import sys

from tests.conftest import REPO_ROOT

LABELS = ("negative", "neutral", "positive")
WORDS = {"negative": "差劲 糟糕 失望", "neutral": "一般 还行 普通", "positive": "很好 满意 喜欢"}


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def test_single_sentence_three_class_set_trains_and_predicts(tmp_path):
    rng = random.Random(0)

    def row(i, with_label=True):
        label = LABELS[i % 3]
        text = f"这个产品{rng.choice(WORDS[label].split())}"
        return {"text": text, "sentiment": label} if with_label else {"id": f"t{i}", "text": text}

    train = _write(tmp_path / "train.json", [row(i) for i in range(96)])
    dev = _write(tmp_path / "dev.json", [row(i) for i in range(30)])
    test = _write(tmp_path / "test.json", [row(i, with_label=False) for i in range(25)])
    workdir = tmp_path / "run"
    args = [
        sys.executable, "-m", "sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}",
        f"--config.data.train_file={train}", f"--config.data.dev_file={dev}", f"--config.data.test_file={test}",
        f"--config.data.label_names={LABELS}", "--config.data.text_a_key=text", "--config.data.label_key=sentiment",
        "--config.data.text_b_key=none", "--config.data.max_seq_len=16", "--config.data.bucket_lengths=(16,)",
        "--config.train.predict_file=sentiment_predict.json", "--config.train.batch_size=16",
        "--config.train.max_steps=24", "--config.train.eval_every=12", "--config.optim.learning_rate=0.003",
        "--config.model.num_hidden_layers=1", "--config.model.hidden_size=32", "--config.model.num_attention_heads=2",
        "--config.model.intermediate_size=64",
    ]  # fmt: skip
    result = subprocess.run(args, cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, check=False, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = [json.loads(line) for line in (workdir / "sentiment_predict.json").read_text(encoding="utf-8").splitlines()]
    assert [p["id"] for p in predictions] == [f"t{i}" for i in range(25)]
    assert {p["label"] for p in predictions} <= set(LABELS)
    model_config = json.loads((workdir / "model" / "config.json").read_text())
    assert model_config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    dev_rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    dev_rows = [r for r in dev_rows if r["split"] == "dev"]
    assert dev_rows and all(0.0 <= r["f1"] <= 1.0 for r in dev_rows)  # macro-F1 over the three classes
