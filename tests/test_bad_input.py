"""Bad input through the command line: one-line error naming the file, exit 2, no workdir left."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _write_lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def _good(path, n=8, labels=True):
    rows = [{"sentence1": f"花呗{i}", "sentence2": "借呗", **({"label": str(i % 2)} if labels else {"id": i})} for i in range(n)]
    return _write_lines(path, rows)


@pytest.fixture
def files(tmp_path):
    return {"train": _good(tmp_path / "train.json"), "dev": _good(tmp_path / "dev.json"), "test": _good(tmp_path / "test.json", labels=False)}


def _run(tmp_path, files, *extra):
    workdir = tmp_path / "workdir"
    args = [
        sys.executable, "-m", "sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}",
        f"--config.data.train_file={files['train']}", f"--config.data.dev_file={files['dev']}",
        f"--config.data.test_file={files['test']}", *extra,
    ]  # fmt: skip
    result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, check=False, text=True, timeout=180)
    return result, workdir


def _assert_one_line_error(result, workdir, *needles):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), lines[-5:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    assert not workdir.exists()


@pytest.mark.parametrize(
    "bad_line, needle",
    [
        ('{"sentence1": "a", "sentence2": "b", "label": "0"', "JSON"),
        ('{"sentence2": "b", "label": "0"}', "sentence1"),
        ('{"sentence1": "a", "sentence2": "b"}', "label"),
        ('{"sentence1": "a", "sentence2": "b", "label": "2"}', "2"),
    ],
    ids=["malformed-json", "missing-sentence1", "missing-label", "label-outside-list"],
)
def test_bad_train_line(tmp_path, files, bad_line, needle):
    lines = files["train"].read_text(encoding="utf-8").splitlines()
    lines.insert(3, bad_line)
    files["train"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    result, workdir = _run(tmp_path, files)
    _assert_one_line_error(result, workdir, f"{files['train']}:4", needle)


def test_empty_dev_file(tmp_path, files):
    files["dev"].write_text("", encoding="utf-8")
    result, workdir = _run(tmp_path, files)
    _assert_one_line_error(result, workdir, str(files["dev"]))


def test_missing_test_file(tmp_path, files):
    files["test"].unlink()
    result, workdir = _run(tmp_path, files)
    _assert_one_line_error(result, workdir, str(files["test"]))


def test_missing_vocab(tmp_path, files, bert_base_chinese_dir):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(bert_base_chinese_dir / "config.json", model_dir)
    result, workdir = _run(tmp_path, files, f"--config.model.dir={model_dir}")
    _assert_one_line_error(result, workdir, str(model_dir))


def test_model_folder_without_weights_is_not_a_silent_random_init(tmp_path, files):
    result, workdir = _run(
        tmp_path, files, "--config.model.from_scratch=False", "--config.model.num_hidden_layers=0",
        "--config.model.hidden_size=0", "--config.model.num_attention_heads=0", "--config.model.intermediate_size=0",
    )  # fmt: skip
    _assert_one_line_error(result, workdir, "bert-base-chinese", "model.from_scratch=True")


def test_missing_model_config(tmp_path, files, bert_base_chinese_dir):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(bert_base_chinese_dir / "vocab.txt", model_dir)
    result, workdir = _run(tmp_path, files, f"--config.model.dir={model_dir}")
    _assert_one_line_error(result, workdir, str(model_dir / "config.json"))


def test_unwritable_workdir(tmp_path, files):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [
        sys.executable, "-m", "sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={blocker / 'sub'}",
        f"--config.data.train_file={files['train']}", f"--config.data.dev_file={files['dev']}",
        f"--config.data.test_file={files['test']}",
    ]  # fmt: skip
    result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, check=False, text=True, timeout=180)
    assert result.returncode == 2
    assert str(blocker / "sub") in result.stderr.strip().splitlines()[-1]


def test_gbk_file(tmp_path, files):
    files["train"].write_bytes('{"sentence1": "花呗", "sentence2": "借呗", "label": "0"}\n'.encode("gbk"))
    result, workdir = _run(tmp_path, files)
    _assert_one_line_error(result, workdir, f"{files['train']}:1", "UTF-8")


def _model_dir_with(tmp_path, bert_base_chinese_dir, **config_changes):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(bert_base_chinese_dir / "vocab.txt", model_dir)
    config = json.loads((bert_base_chinese_dir / "config.json").read_text())
    config.update(config_changes)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_vocabulary_larger_than_embedding_table(tmp_path, files, bert_base_chinese_dir):
    model_dir = _model_dir_with(tmp_path, bert_base_chinese_dir, vocab_size=1000)
    result, workdir = _run(tmp_path, files, f"--config.model.dir={model_dir}")
    _assert_one_line_error(result, workdir, "vocab.txt", "21128", "1000")


def test_bucket_above_max_position_embeddings(tmp_path, files, bert_base_chinese_dir):
    model_dir = _model_dir_with(tmp_path, bert_base_chinese_dir, max_position_embeddings=48)
    result, workdir = _run(tmp_path, files, f"--config.model.dir={model_dir}")
    _assert_one_line_error(result, workdir, "data.max_seq_len", "max_position_embeddings=48")


def test_bom_empty_sentence_and_overlong_pair_are_accepted(tmp_path, files):
    rows = [{"sentence1": "花呗" * 80, "sentence2": "借呗" * 80, "label": "1"}, {"sentence1": "", "sentence2": "借呗", "label": "0"}]
    rows += [{"sentence1": "", "sentence2": "", "label": "1"}] + [{"sentence1": f"花呗{i}", "sentence2": "借", "label": "0"} for i in range(6)]
    path = _write_lines(tmp_path / "train_bom.json", rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    files["train"] = path
    result, workdir = _run(
        tmp_path, files, "--config.train.max_steps=2", "--config.train.batch_size=4", "--config.data.bucket_lengths=(64,)",
        "--config.model.num_hidden_layers=1", "--config.model.hidden_size=32", "--config.model.num_attention_heads=2",
        "--config.model.intermediate_size=64",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {path}: 2 rows have an empty sentence (first on line 2); they are kept"]
    assert (workdir / "afqmc_predict.json").exists()
