#!/usr/bin/env bash
# GPU acceptance in one budgeted call (benchmarks/gpu_acceptance.py says what each part measures):
#
#   bash benchmarks/gpu_acceptance.sh [--budget-s 420] [--dry-run] [device tests epoch step cmdbuf seeds]
#
# Works offline where jax (CUDA), flax, optax, orbax, transformers and torch are installed (the lent
# H200): ml_collections and tensorboardX come as wheels in .whl/ and the data in shared/ inside the
# checkout, both made by benchmarks/prepare_gpu_carry.sh on a machine with the registries. With the
# device tool: run(command="bash benchmarks/gpu_acceptance.sh", carry=[".whl"], timeout_s=480).
# Everything lands in $OUT (default ./gpu-acceptance) as it is measured; the budget counts from here.
set -uo pipefail
export SDA_ACCEPTANCE_STARTED_AT=${SDA_ACCEPTANCE_STARTED_AT:-$(date +%s.%N)}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
dry=0
for arg in "$@"; do [[ $arg == --dry-run ]] && dry=1; done
if [[ $dry == 0 ]]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sda-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/sda-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [[ ! -d shared/data && ! -d ../shared/data ]]; then
    echo "error: no shared/data here or beside the checkout (run benchmarks/prepare_gpu_carry.sh)" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m benchmarks.gpu_acceptance "$@"
