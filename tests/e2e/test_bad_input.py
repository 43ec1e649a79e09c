"""Bad input stops a run before anything is written: an `InputError` naming the file (and line),
no workdir left; through the command line, one `error:` line and exit status 2.

The rows a reader refuses are unit tests of `clue_files` (tests/data/test_input_pipeline.py); here they
go through `train_and_evaluate`, in this process, to show that the run checks them before it
touches the workdir. One of them also goes through the command line.
"""

import json
import shutil

import pytest

from sda_jax.errors import InputError
from tests.conftest import TINY_RUN, one_line_error, train_in_process


def _write_lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def _good(path, n=8, labels=True):
    rows = [{"sentence1": f"花呗{i}", "sentence2": "借呗", **({"label": str(i % 2)} if labels else {"id": i})} for i in range(n)]
    return _write_lines(path, rows)


@pytest.fixture
def files(tmp_path):
    return {"train": _good(tmp_path / "train.json"), "dev": _good(tmp_path / "dev.json"), "test": _good(tmp_path / "test.json", labels=False)}


def _data(files):
    return {f"data.{split}_file": path for split, path in files.items()}


def _refused(tmp_path, files, *needles, **overrides) -> str:
    """Trains in process on `files`; asserts the InputError names every needle and nothing was written."""
    workdir = tmp_path / "workdir"
    with pytest.raises(InputError) as refused:
        train_in_process(workdir, {**_data(files), **overrides})
    message = str(refused.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert not workdir.exists()
    return message


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
    _refused(tmp_path, files, f"{files['train']}:4", needle)


def test_bad_input_through_the_command_line_is_one_line_and_exit_2(tmp_path, files, cli):
    files["dev"].write_text('{"sentence1": "a", "sentence2": "b", "label": "0"\n', encoding="utf-8")
    workdir = tmp_path / "workdir"
    args = [f"--config.{key}={value}" for key, value in _data(files).items()]
    result = cli.run("sda_jax.train", "--config", "configs/afqmc_small.py", f"--workdir={workdir}", *args, timeout=180)
    one_line_error(result, f"{files['dev']}:1", "JSON")
    assert not workdir.exists()


def test_empty_dev_file(tmp_path, files):
    files["dev"].write_text("", encoding="utf-8")
    _refused(tmp_path, files, str(files["dev"]))


def test_missing_test_file(tmp_path, files):
    files["test"].unlink()
    _refused(tmp_path, files, str(files["test"]))


def test_gbk_file(tmp_path, files):
    files["train"].write_bytes('{"sentence1": "花呗", "sentence2": "借呗", "label": "0"}\n'.encode("gbk"))
    _refused(tmp_path, files, f"{files['train']}:1", "UTF-8")


def test_missing_vocab(tmp_path, files, bert_base_chinese_dir):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(bert_base_chinese_dir / "config.json", model_dir)
    _refused(tmp_path, files, str(model_dir), **{"model.dir": model_dir})


def test_model_folder_without_weights_is_not_a_silent_random_init(tmp_path, files):
    architecture = {f"model.{k}": None for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")}
    _refused(tmp_path, files, "bert-base-chinese", "model.from_scratch=True", **{"model.from_scratch": False, **architecture})


def test_missing_model_config(tmp_path, files, bert_base_chinese_dir):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(bert_base_chinese_dir / "vocab.txt", model_dir)
    _refused(tmp_path, files, str(model_dir / "config.json"), **{"model.dir": model_dir})


def test_unwritable_workdir(tmp_path, files):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write to the workdir") as refused:
        train_in_process(blocker / "sub", {**TINY_RUN, **_data(files)})
    assert str(blocker / "sub") in str(refused.value)


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
    _refused(tmp_path, files, "vocab.txt", "21128", "1000", **{"model.dir": model_dir})


def test_bucket_above_max_position_embeddings(tmp_path, files, bert_base_chinese_dir):
    model_dir = _model_dir_with(tmp_path, bert_base_chinese_dir, max_position_embeddings=48)
    _refused(tmp_path, files, "data.max_seq_len", "max_position_embeddings=48", **{"model.dir": model_dir})


def test_bom_empty_sentence_and_overlong_pair_are_accepted(tmp_path, files, capsys):
    rows = [{"sentence1": "花呗" * 80, "sentence2": "借呗" * 80, "label": "1"}, {"sentence1": "", "sentence2": "借呗", "label": "0"}]
    rows += [{"sentence1": "", "sentence2": "", "label": "1"}] + [{"sentence1": f"花呗{i}", "sentence2": "借", "label": "0"} for i in range(6)]
    path = _write_lines(tmp_path / "train_bom.json", rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    files["train"] = path
    workdir = tmp_path / "workdir"
    train_in_process(workdir, {**TINY_RUN, **_data(files), "train.max_steps": 2, "train.batch_size": 4})
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {path}: 2 rows have an empty sentence (first on line 2); they are kept"]
    assert (workdir / "afqmc_predict.json").exists()
