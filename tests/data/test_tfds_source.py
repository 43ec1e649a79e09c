"""The `tfds:` data source: our clue_afqmc TFDS builder, built offline from the local CLUE files.

Needs the optional `tfds` extra (tensorflow-cpu, tensorflow-datasets); skipped without it.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from sda_jax.data.clue_files import read_clue_file
from sda_jax.data.tfds import offline, source
from sda_jax.errors import InputError
from tests.conftest import TINY_RUN, train_in_process

_HAVE_TFDS = importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("tensorflow_datasets") is not None
# CI installs the extra and sets SDA_REQUIRE_EXTRAS=1, so there a missing TensorFlow fails instead.
if not _HAVE_TFDS and not os.environ.get("SDA_REQUIRE_EXTRAS"):
    pytest.skip("needs the tfds extra: pip install -e '.[tfds]'", allow_module_level=True)

LABELS = ("0", "1")
SPLITS = {"train": ("train.json", 34_334), "validation": ("dev.json", 4_316), "test": ("test.json", 3_861)}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, afqmc_dir):
    """A TFDS data_dir with clue_afqmc built from the local JSON files (once for the module)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    source.read_tfds_split("tfds:clue_afqmc", "validation", LABELS, data_dir=data_dir, manual_dir=afqmc_dir)
    return data_dir


@pytest.fixture
def no_network(monkeypatch):
    """No name resolves, as on a machine without network."""

    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)


def test_builder_splits(prepared_dir):
    tfds = source.import_tfds()
    builder = tfds.builder("clue_afqmc", data_dir=str(prepared_dir))
    assert builder.is_prepared()
    assert str(builder.info.version) == "1.0.0"
    assert {split: info.num_examples for split, info in builder.info.splits.items()} == {
        split: size for split, (_, size) in SPLITS.items()
    }
    assert builder.info.features["label"].names == ["0", "1"]
    assert set(builder.info.features) == {"sentence1", "sentence2", "label", "idx"}


def test_tensorflow_sees_no_gpu(prepared_dir):
    import tensorflow as tf

    assert tf.config.get_visible_devices("GPU") == []


@pytest.mark.parametrize("split", list(SPLITS))
def test_examples_equal_the_json_files(prepared_dir, afqmc_dir, split, no_network):
    # `no_network`: reading a prepared dataset needs no network.
    file_name, size = SPLITS[split]
    got = source.read_tfds_split(
        "tfds:clue_afqmc", split, LABELS, data_dir=prepared_dir, require_labels=split != "test"
    )
    want = read_clue_file(afqmc_dir / file_name, LABELS, require_labels=split != "test")
    assert len(got) == len(want) == size
    # clue_afqmc is written unshuffled, so the order is the file's; compared exactly, in order.
    assert got.text_a == want.text_a
    assert got.text_b == want.text_b
    assert got.ids == want.ids
    if split == "test":
        assert got.labels is None and want.labels is None
        assert got.ids[:3] == [0, 1, 2]  # test.json's own "id" field
    else:
        assert got.labels.dtype == np.int32
        np.testing.assert_array_equal(got.labels, want.labels)
    assert got.path == f"tfds:clue_afqmc[{split}]"


def test_label_names_mismatch(prepared_dir):
    with pytest.raises(InputError, match=r"^data\.label_names: \['no', 'yes'\] does not match .*\['0', '1'\]") as info:
        source.read_tfds_split("tfds:clue_afqmc", "validation", ("no", "yes"), data_dir=prepared_dir)
    assert "\n" not in str(info.value)


def test_reordered_label_names_are_remapped(prepared_dir):
    got = source.read_tfds_split("tfds:clue_afqmc", "validation", ("1", "0"), data_dir=prepared_dir)
    want = source.read_tfds_split("tfds:clue_afqmc", "validation", LABELS, data_dir=prepared_dir)
    np.testing.assert_array_equal(got.labels, 1 - want.labels)


def test_bad_keys_and_splits(prepared_dir):
    read = source.read_tfds_split
    with pytest.raises(InputError, match=r"^data\.text_a_key: tfds:clue_afqmc has no feature 'question'"):
        read("tfds:clue_afqmc", "train", LABELS, data_dir=prepared_dir, text_a_key="question")
    with pytest.raises(InputError, match=r"^tfds:clue_afqmc: no split 'dev' \(it has test, train, validation\)"):
        read("tfds:clue_afqmc", "dev", LABELS, data_dir=prepared_dir)
    with pytest.raises(InputError, match=r"split 'test': no labels"):
        read("tfds:clue_afqmc", "test", LABELS, data_dir=prepared_dir, require_labels=True)
    with pytest.raises(InputError, match=r"^clue_afqmc: not a TFDS source"):
        read("clue_afqmc", "train", LABELS, data_dir=prepared_dir)
    with pytest.raises(InputError, match=r"^tfds:no_such_set: no TFDS dataset named 'no_such_set'"):
        read("tfds:no_such_set", "train", LABELS, data_dir=prepared_dir)
    # Without the pair key the data is single-sentence; an id key it lacks falls back to `idx`.
    single = read("tfds:clue_afqmc", "test", LABELS, data_dir=prepared_dir, text_b_key="none", id_key="id")
    assert single.text_b is None and single.ids[:3] == [0, 1, 2] and len(single.ids) == 3861


def test_offline_without_manual_dir_fails_fast(tmp_path, no_network):
    start = time.perf_counter()
    with pytest.raises(InputError) as info:
        source.read_tfds_split("tfds:clue_afqmc", "train", LABELS, data_dir=tmp_path)
    message = str(info.value)
    assert message.startswith("tfds:clue_afqmc: not prepared in ")
    assert "cannot reach storage.googleapis.com:443" in message and "data.tfds_manual_dir" in message
    assert "\n" not in message
    # Any other dataset: the generic probe stops it before TFDS's minutes of download retries.
    with pytest.raises(InputError, match=r"^tfds:glue/mrpc: not prepared in .* cannot reach"):
        source.read_tfds_split("tfds:glue/mrpc", "train", ("not_equivalent", "equivalent"), data_dir=tmp_path)
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "clue_afqmc" / "1.0.0" / "dataset_info.json").exists()


def test_manual_dir_with_the_archive(tmp_path, afqmc_dir, no_network):
    """manual_dir may hold afqmc_public.zip instead of the JSON files (here: 5 rows a file, in a subfolder)."""
    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / "afqmc_public.zip", "w") as archive:
        for file_name, _ in SPLITS.values():
            lines = (afqmc_dir / file_name).read_text(encoding="utf-8").splitlines(keepends=True)[:5]
            archive.writestr(f"afqmc_public/{file_name}", "".join(lines))
    got = source.read_tfds_split("tfds:clue_afqmc", "test", LABELS, data_dir=tmp_path / "data", manual_dir=manual)
    want = read_clue_file(afqmc_dir / "test.json", LABELS, require_labels=False)
    assert got.text_a == want.text_a[:5] and got.ids == want.ids[:5]


def test_missing_manual_dir(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: no such folder \(data\.tfds_manual_dir for tfds:clue_afqmc\)"):
        source.read_tfds_split(
            "tfds:clue_afqmc", "train", LABELS, data_dir=tmp_path, manual_dir=tmp_path / "nowhere"
        )


def test_probe_host_is_bounded(monkeypatch):
    # A network that swallows packets: the connection attempt hangs; the probe gives up on time.
    def hang(*args, **kwargs):
        time.sleep(3)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    with pytest.raises(offline.OfflineError, match=r"cannot reach example\.org:443 \(no answer within 0\.5 s\)"):
        offline.probe_host("https://example.org/x.zip", timeout=0.5)
    assert time.perf_counter() - start < 2


def test_core_does_not_import_tensorflow():
    code = (
        "import sys; import sda_jax.data.splits, sda_jax.data.input_pipeline, sda_jax.data.tfds.source, sda_jax.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_prepare_command(prepared_dir, tmp_path, no_network, capsys):
    assert source.main(["tfds:clue_afqmc", "--data_dir", str(prepared_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(prepared_dir / "clue_afqmc" / "1.0.0")
    assert source.main(["tfds:clue_afqmc", "--data_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: tfds:clue_afqmc: not prepared in ")


def test_training_from_a_tfds_source(tmp_path, afqmc_dir):
    workdir = tmp_path / "run"
    train_in_process(workdir, {
        **TINY_RUN, "data.source": "tfds:clue_afqmc", "data.tfds_data_dir": tmp_path / "tfds", "data.tfds_manual_dir": afqmc_dir,
        "data.id_key": "idx", "train.max_steps": 4,
    })  # fmt: skip
    rows = (workdir / "afqmc_predict.json").read_text().splitlines()
    test_ids = [json.loads(line)["id"] for line in (afqmc_dir / "test.json").read_text(encoding="utf-8").splitlines()]
    assert [json.loads(r)["id"] for r in rows] == test_ids
