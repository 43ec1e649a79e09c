"""Any CLUE-style classification set: single sentences, three string labels, only config changes."""

import json
import random

from tests.conftest import read_records, train_in_process

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
    train_in_process(workdir, {
        "data.train_file": train, "data.dev_file": dev, "data.test_file": test, "data.label_names": LABELS,
        "data.text_a_key": "text", "data.label_key": "sentiment", "data.text_b_key": "none", "data.max_seq_len": 16,
        "data.bucket_lengths": (16,), "train.predict_file": "sentiment_predict.json", "train.batch_size": 16,
        "train.max_steps": 24, "train.eval_every": 12, "optim.learning_rate": 0.003, "model.num_hidden_layers": 1,
        "model.hidden_size": 32, "model.num_attention_heads": 2, "model.intermediate_size": 64,
    })  # fmt: skip
    predictions = [json.loads(line) for line in (workdir / "sentiment_predict.json").read_text(encoding="utf-8").splitlines()]
    assert [p["id"] for p in predictions] == [f"t{i}" for i in range(25)]
    assert {p["label"] for p in predictions} <= set(LABELS)
    model_config = json.loads((workdir / "model" / "config.json").read_text())
    assert model_config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    dev_rows = read_records(workdir, "dev")
    assert dev_rows and all(0.0 <= r["f1"] <= 1.0 for r in dev_rows)  # macro-F1 over the three classes
