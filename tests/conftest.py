"""Shared pytest fixtures: where the project's `../shared` data lives."""

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def afqmc_dir() -> pathlib.Path:
    """The real CLUE AFQMC split: train.json, dev.json, test.json (JSON lines)."""
    return SHARED_DIR / "data" / "afqmc"


@pytest.fixture(scope="session")
def bert_base_chinese_dir() -> pathlib.Path:
    """bert-base-chinese config.json, vocab.txt and tokenizer_config.json (no weights)."""
    return SHARED_DIR / "data" / "bert-base-chinese"
