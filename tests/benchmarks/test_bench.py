"""The benchmark's CI-sized form runs and prints its table (figures are not asserted: no timed tests)."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_quick_benchmark_prints_a_row_per_form():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--quick", "--forms", "jax,seed", "--bucket-lengths=64"],
        cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, check=False, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| sda-jax", "| torch seed"))]
    assert len(rows) == 2
    seed_row = next(r for r in rows if r.startswith("| torch seed"))
    assert seed_row.split("|")[6].strip() == "1.00"  # the seed is its own reference
    assert "Input pipeline (read + tokenize + bucket 34334 train examples into 537 batches" in result.stdout
    assert "buckets 64" in result.stdout  # one bucket length: one compilation per form, a shorter test
