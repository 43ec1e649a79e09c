"""Data from TensorFlow Datasets: a `tfds:NAME` spec and a split name -> `clue_files.Examples`.

`read_tfds_split("tfds:clue_afqmc", "validation", ("0", "1"), ...)` prepares the dataset in
`data_dir` if needed (TFDS's `download_and_prepare`), reads one split and converts it to the
same `Examples` that `clue_files.read_clue_file` returns for a JSON-lines file: texts
decoded from UTF-8, ClassLabel ids mapped to indices of `label_names`, label -1 (TFDS's "no
label") giving `labels=None`. `clue_afqmc` is our own builder (`sda_jax.data.tfds.afqmc`); any
registered TFDS dataset with text features works (`tfds:glue/mrpc`, keys sentence1/sentence2/
label/idx).

TensorFlow is an optional dependency (the `tfds` extra: tensorflow-cpu, tensorflow-datasets) and
is imported only here, only when a `tfds:` source is read: the core never imports it. Before
its first op TF is told to see no GPU, so it cannot take accelerator memory from JAX.

Network: a dataset already prepared in `data_dir` is read without any network access.
`clue_afqmc` builds from `manual_dir` without network. Otherwise a download host is probed
first (`sda_jax.data.tfds.offline.probe_host`, a TCP connect with a 10 s limit: clue_afqmc's own host,
for other datasets storage.googleapis.com as a sign of life), so an offline machine fails in seconds rather than
after TFDS's ten retries with back-off (~3.5 minutes); downloads then run with a socket timeout
of `download_timeout` seconds per operation. Every failure becomes a one-line `InputError`.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from sda_jax.config import tfds_dataset_name as dataset_name
from sda_jax.data.clue_files import Examples
from sda_jax.data.tfds.offline import OfflineError, probe_host
from sda_jax.data.tfds.tensorflow_cpu import import_tfds
from sda_jax.errors import InputError, print_error

# Seconds a socket operation (connect, one read) may stall while TFDS downloads.
DOWNLOAD_TIMEOUT_S = 60.0
# Rows per batch when reading a split out of TFDS.
_READ_BATCH = 8192
# Probed before preparing a dataset of unknown origin: where TFDS itself keeps its data.
GENERIC_PROBE_URL = "https://storage.googleapis.com"
# The config keys that name the TFDS folders (in messages).
DATA_DIR_KEY = "data.tfds_data_dir"
MANUAL_DIR_KEY = "data.tfds_manual_dir"



def read_tfds_split(
    spec: str,
    split: str,
    label_names: Sequence[str],
    *,
    text_a_key: str = "sentence1",
    text_b_key: str = "sentence2",
    label_key: str = "label",
    id_key: str = "idx",
    data_dir: str | Path | None = None,
    manual_dir: str | Path | None = None,
    require_labels: bool = False,
    download_timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Examples:
    """One split of a TFDS dataset as `Examples`, preparing the dataset in `data_dir` first if needed.

    Feature keys: `text_a_key` must exist; without `text_b_key` the data is single-sentence,
    without `label_key` unlabeled. Without `id_key` TFDS's usual `idx` feature is used (so the
    JSON-file default `id` works), and without that the ids are 0-based positions. When the ids
    are integers (TFDS's `idx`: the row's position in the source file) the rows are put in id
    order, which undoes the shuffling TFDS applies when it writes most datasets; `clue_afqmc`
    is written unshuffled, in file order.
    """
    name = dataset_name(spec)
    tfds = import_tfds()
    import sda_jax.data.tfds.afqmc  # noqa: F401  (registers clue_afqmc)

    builder = _builder(tfds, spec, name, data_dir)
    _prepare(tfds, builder, spec, manual_dir, download_timeout)
    info = builder.info
    where = f"{spec} split {split!r}"
    if split not in info.splits:
        raise InputError(f"{spec}: no split {split!r} (it has {', '.join(sorted(info.splits))})")
    features = info.features
    if text_a_key not in features:
        raise InputError(f"data.text_a_key: {spec} has no feature {text_a_key!r} (features: {', '.join(features)})")
    if id_key not in features and "idx" in features:
        id_key = "idx"
    keys = [key for key in (text_a_key, text_b_key, label_key, id_key) if key in features]
    columns = _read_columns(builder, split, list(dict.fromkeys(keys)))

    text_a = _decode(columns[text_a_key], where, text_a_key)
    text_b = _decode(columns[text_b_key], where, text_b_key) if text_b_key in columns else None
    labels = (
        _labels(tfds, features[label_key], columns[label_key], label_names, spec, where)
        if label_key in columns
        else None
    )
    if labels is None and require_labels:
        raise InputError(f"{where}: no labels (feature {label_key!r} is missing or -1), but this split needs them")
    if id_key in columns:
        raw_ids = columns[id_key]
        if raw_ids.dtype.kind in "iu":
            order = np.argsort(raw_ids, kind="stable")
            if np.any(order != np.arange(len(order))):
                text_a = [text_a[i] for i in order]
                text_b = None if text_b is None else [text_b[i] for i in order]
                labels = None if labels is None else labels[order]
                raw_ids = raw_ids[order]
            ids: list = raw_ids.tolist()
        else:
            ids = _decode(raw_ids, where, id_key) if raw_ids.dtype == object else raw_ids.tolist()
    else:
        ids = list(range(len(text_a)))
    if not text_a:
        raise InputError(f"{where}: no examples")
    return Examples(text_a=text_a, text_b=text_b, labels=labels, ids=ids, path=f"{spec}[{split}]")


def prepare_dataset(
    spec: str,
    *,
    data_dir: str | Path | None = None,
    manual_dir: str | Path | None = None,
    download_timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Prepares a TFDS dataset in `data_dir` (nothing to do if it is there) and returns its folder.

    For multi-process runs, prepare once before starting (every process would otherwise build
    into the same folder), e.g. on a machine with internet:
    `python -m sda_jax.data.tfds.source tfds:clue_afqmc --data_dir DIR`.
    """
    name = dataset_name(spec)
    tfds = import_tfds()
    import sda_jax.data.tfds.afqmc  # noqa: F401  (registers clue_afqmc)

    builder = _builder(tfds, spec, name, data_dir)
    _prepare(tfds, builder, spec, manual_dir, download_timeout)
    return Path(builder.data_dir)


def _builder(tfds: ModuleType, spec: str, name: str, data_dir: str | Path | None) -> Any:
    try:
        return tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        raise InputError(f"{spec}: no TFDS dataset named {name!r}") from None
    except ValueError as err:  # unknown config or version
        raise InputError(f"{spec}: {_one_line(err)}") from None


def _prepare(tfds: ModuleType, builder: Any, spec: str, manual_dir: str | Path | None, timeout: float) -> None:
    """`download_and_prepare` with bounded network waits; a prepared dataset is left alone."""
    if builder.is_prepared():
        return
    if manual_dir is not None and not Path(manual_dir).is_dir():
        raise InputError(f"{manual_dir}: no such folder ({MANUAL_DIR_KEY} for {spec})")
    import tensorflow as tf

    config = tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else str(manual_dir))
    previous_timeout = socket.getdefaulttimeout()
    # urllib3 (under TFDS's `requests` downloads) falls back to this for connect and read waits.
    socket.setdefaulttimeout(timeout)
    try:
        if manual_dir is None and not getattr(builder, "PROBES_ITS_HOST", False):
            # TFDS retries a failed download ten times with exponential back-off (~3.5 min when a
            # name does not resolve); fail at once when the machine is plainly offline. Our own
            # builders (clue_afqmc) probe their download host themselves.
            probe_host(GENERIC_PROBE_URL)
        builder.download_and_prepare(download_config=config)
    except OfflineError as err:
        files = getattr(builder, "MANUAL_FILES", "the files it downloads")
        raise InputError(
            f"{spec}: not prepared in {builder.data_dir} and {err}; without internet, set {MANUAL_DIR_KEY} "
            f"to a folder with {files}, or {DATA_DIR_KEY} to a folder where the dataset was prepared"
        ) from None
    except (OSError, AssertionError, ValueError, tf.errors.OpError) as err:
        # requests' ConnectionError/Timeout are OSErrors; AssertionError is TFDS's "manual_dir needed".
        raise InputError(f"{spec}: cannot prepare the dataset in {builder.data_dir}: {_one_line(err)}") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _read_columns(builder: Any, split: str, keys: list[str]) -> dict[str, np.ndarray]:
    """The given features of every row of a split, in stored order, as numpy arrays."""
    import tensorflow as tf

    dataset = builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.map(lambda row: {key: row[key] for key in keys}).batch(_READ_BATCH)
    chunks: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    with tf.device("/cpu:0"):
        for batch in dataset.as_numpy_iterator():
            for key in keys:
                chunks[key].append(batch[key])
    return {key: np.concatenate(parts) if parts else np.empty(0) for key, parts in chunks.items()}


def _decode(values: np.ndarray, where: str, key: str) -> list[str]:
    try:
        return [value.decode("utf-8") for value in values.tolist()]
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: feature {key!r} is not valid UTF-8 ({err.reason})") from None
    except AttributeError:
        raise InputError(f"{where}: feature {key!r} is not text (dtype {values.dtype})") from None


def _labels(
    tfds: ModuleType, feature: Any, values: np.ndarray, label_names: Sequence[str], spec: str, where: str
) -> np.ndarray | None:
    """Class indices into `label_names`, or None when every row is unlabeled (-1)."""
    label_index = {str(name): i for i, name in enumerate(label_names)}
    if isinstance(feature, tfds.features.ClassLabel):
        names = list(feature.names)
        missing = [name for name in names if name not in label_index]
        if missing:
            raise InputError(
                f"data.label_names: {list(label_names)} does not match the labels of {spec} {names} "
                f"(no {missing}); set data.label_names to {names}"
            )
        values = values.astype(np.int64)
        unlabeled = values < 0
        if unlabeled.all():
            return None
        if unlabeled.any():
            raise InputError(f"{where}: {int(unlabeled.sum())} of {len(values)} rows have no label (-1), the rest do")
        table = np.asarray([label_index[name] for name in names], dtype=np.int32)
        return table[values]
    # A plain int or string label feature: its values are the label strings.
    strings = _decode(values, where, "label") if values.dtype == object else [str(v) for v in values.tolist()]
    indices = np.empty(len(strings), dtype=np.int32)
    for row, label in enumerate(strings):
        index = label_index.get(label)
        if index is None:
            raise InputError(
                f"{where}: label {label!r} is not one of the allowed labels {list(label_index)} (data.label_names)"
            )
        indices[row] = index
    return indices


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sda_jax.data.tfds.source tfds:NAME [--data_dir DIR] [--manual_dir DIR]`: prepare a dataset."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sda_jax.data.tfds.source", description=prepare_dataset.__doc__)
    parser.add_argument("spec", help="tfds:NAME, e.g. tfds:clue_afqmc or tfds:glue/mrpc")
    parser.add_argument("--data_dir", default=None, help="TFDS data folder (default: TFDS's, ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="folder with the source files, for offline builds")
    args = parser.parse_args(argv)
    try:
        folder = prepare_dataset(args.spec, data_dir=args.data_dir, manual_dir=args.manual_dir)
    except InputError as err:
        print_error(err)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
