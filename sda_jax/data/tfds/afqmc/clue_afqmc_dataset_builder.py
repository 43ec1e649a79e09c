"""The `clue_afqmc` TFDS builder (version 1.0.0).

Features: `sentence1`, `sentence2` (Text), `label` (ClassLabel "0"/"1"; -1 in the unlabeled test
split) and `idx` (int32: the file's `id` field where it has one, as test.json does, else the
0-based position of the row in its file). Splits: train (34,334), validation (dev.json, 4,316),
test (3,861). Shuffling is disabled, so reading a split gives the rows in file order.

Sources, in this order:
1. `manual_dir`, when it holds train.json/dev.json/test.json (or afqmc_public.zip): no network.
2. The public CLUE archive, downloaded. Before downloading, the host is probed with a short
   timeout (`sda_jax.data.tfds.offline.probe_host`); if it cannot be reached the build stops at once
   with `OfflineError` (an OSError) instead of waiting out TFDS's ten retries with exponential
   back-off (about 3.5 minutes when the name does not resolve).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from sda_jax.data.tfds.offline import probe_host

DOWNLOAD_URL = "https://storage.googleapis.com/cluebenchmark/tasks/afqmc_public.zip"
ARCHIVE_NAME = "afqmc_public.zip"
# tfds split name -> file name in the CLUE archive.
SPLIT_FILES = {"train": "train.json", "validation": "dev.json", "test": "test.json"}
LABEL_NAMES = ["0", "1"]

_DESCRIPTION = """\
AFQMC (Ant Financial Question Matching Corpus), a task of the CLUE benchmark: pairs of customer
service questions in Chinese, label "1" when both ask the same thing. The test split has no
labels (label -1); `idx` is the CLUE submission id there.
"""

_CITATION = """\
@inproceedings{xu-etal-2020-clue,
  title = {{CLUE}: A {C}hinese Language Understanding Evaluation Benchmark},
  author = {Xu, Liang and Hu, Hai and Zhang, Xuanwei and others},
  booktitle = {Proceedings of the 28th International Conference on Computational Linguistics},
  year = {2020},
  pages = {4762--4772},
}
"""

MANUAL_INSTRUCTIONS = f"""\
Offline: put train.json, dev.json and test.json of CLUE AFQMC (JSON lines), or the archive
{ARCHIVE_NAME} from {DOWNLOAD_URL}, into a folder and pass it as manual_dir
(`tfds.download.DownloadConfig(manual_dir=...)`, `tfds build --manual_dir`).
"""


class ClueAfqmc(tfds.core.GeneratorBasedBuilder):
    """CLUE AFQMC: Chinese question-pair matching (binary)."""

    name = "clue_afqmc"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release: CLUE afqmc_public.zip, rows in file order."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    # What sda_jax.data.tfds.source asks of a builder: it probes its download host itself (so the
    # generic probe is skipped), and the files a manual_dir must hold (for the offline message).
    PROBES_ITS_HOST = True
    MANUAL_FILES = "train.json, dev.json and test.json"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "sentence1": tfds.features.Text(),
                    "sentence2": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                    "idx": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=None,
            homepage="https://github.com/CLUEbenchmark/CLUE",
            citation=_CITATION,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        folder = _manual_folder(dl_manager)
        if folder is None:
            probe_host(DOWNLOAD_URL)
            folder = Path(dl_manager.download_and_extract(DOWNLOAD_URL))
        elif not (folder / SPLIT_FILES["train"]).is_file() and (folder / ARCHIVE_NAME).is_file():
            folder = Path(dl_manager.extract(folder / ARCHIVE_NAME))
        files = {split: _find(folder, name) for split, name in SPLIT_FILES.items()}
        return {split: self._generate_examples(path) for split, path in files.items()}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict]]:
        with open(path, encoding="utf-8-sig") as f:
            position = 0
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    example = {
                        "sentence1": row["sentence1"],
                        "sentence2": row["sentence2"],
                        "label": int(row["label"]) if "label" in row else -1,
                        "idx": int(row.get("id", position)),
                    }
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{lineno}: not a CLUE AFQMC row ({err!r})") from None
                yield position, example
                position += 1


def _manual_folder(dl_manager: tfds.download.DownloadManager) -> Path | None:
    """The manual_dir if it holds the three files or the archive, else None."""
    try:
        folder = Path(dl_manager.manual_dir)
    except AssertionError:  # manual_dir missing or empty (TFDS's default is <data_dir>/downloads/manual)
        return None
    if all((folder / name).is_file() for name in SPLIT_FILES.values()) or (folder / ARCHIVE_NAME).is_file():
        return folder
    raise FileNotFoundError(f"{folder}: manual_dir holds neither {', '.join(SPLIT_FILES.values())} nor {ARCHIVE_NAME}")


def _find(folder: Path, name: str) -> Path:
    """`folder/name`, or the only file of that name below folder (archives may add a subfolder)."""
    if (folder / name).is_file():
        return folder / name
    found = sorted(folder.rglob(name))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected one {name} in the AFQMC data, found {len(found)}")
    return found[0]
