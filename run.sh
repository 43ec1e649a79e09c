#!/usr/bin/env bash
# A newcomer's first command: set everything up and train the small AFQMC recipe end to end.
#
#   ./run.sh                                   # configs/afqmc_small.py, one epoch (~10 min on 2 CPU cores)
#   ./run.sh --config.train.max_steps=200      # any train flag passes through
#
# Makes .venv (if missing), installs PyTorch's CPU-only build where it can be had (optional: the
# core needs none; the full CUDA build would be ~6 GB) and sda-jax, then runs
# `python -m sda_jax.train --config configs/afqmc_small.py --workdir runs/afqmc_small`, whose
# summary is the last thing printed. `make test` (bash .ci/run) sets up the same way for the tests.
set -euo pipefail
cd "$(dirname "$0")"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0+cpu" 2>/dev/null \
  || echo "note: no CPU-only PyTorch wheel found; continuing without it (only .bin checkpoints and the tests need it)"
python -m pip install --quiet -e .
exec python -m sda_jax.train --config configs/afqmc_small.py --workdir runs/afqmc_small "$@"
