#!/usr/bin/env bash
# GPU acceptance: verify and measure sda-jax on one GPU, in one go. Everything lands in $OUT.
#
#   bash benchmarks/gpu_acceptance.sh [all|tests|bench|epoch] ...     (default: all)
#
#   tests  pytest -m gpu (tests/test_gpu.py): bf16/fp16 steps vs the float32 CPU step, one
#          compile per program, export parity
#   bench  benchmarks/bench.py on BERT-base bf16 against the seed, eager and torch.compile forms,
#          and 1, 2, 4, 8 seeds in one program
#   epoch  one AFQMC epoch of BERT-base (from scratch: no weights travel), the reference recipe,
#          with a cold compilation cache and again with a warm one; the run's time by phase
#
# Works offline where jax (CUDA), flax, optax, orbax, transformers and torch are installed:
# ml_collections and tensorboardX come as wheels in .whl/ and the data in shared/ inside the
# checkout, both made by benchmarks/prepare_gpu_carry.sh on a machine with the registries.
# With the `device` tool: run(command="bash benchmarks/gpu_acceptance.sh", carry=[".whl"]).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-acceptance}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sda-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/sda-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ ! -d shared/data && ! -d ../shared/data ]]; then
  echo "error: no shared/data here or beside the checkout (run benchmarks/prepare_gpu_carry.sh)" >&2
  exit 2
fi
parts=("$@")
[[ ${#parts[@]} -eq 0 || " ${parts[*]} " == *" all "* ]] && parts=(tests bench epoch)
status=0

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c 'import jax, flax, optax, torch, transformers; print("jax", jax.__version__, jax.devices(), "| flax", flax.__version__, "| optax", optax.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)'
  nproc
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

for part in "${parts[@]}"; do
  case $part in
    tests)
      "$PY" -m pytest -q -m gpu -rP tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" || status=1
      ;;
    bench)
      "$PY" -m benchmarks.bench --model base --steps 30 --forms jax,seed,eager,compile 2>&1 | tee "$OUT/bench.log" || status=1
      # Several seeds in one program (train.seeds): 1, 2, 4 and 8 BERT-base models side by side.
      "$PY" -m benchmarks.bench --model base --steps 20 --forms jax,jax2,jax4,jax8 2>&1 | tee -a "$OUT/bench.log" || status=1
      cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
      ;;
    epoch)
      cache=$(mktemp -d)
      for temperature in cold warm; do
        start=$(date +%s.%N)
        JAX_COMPILATION_CACHE_DIR=$cache "$PY" -m sda_jax.train --config afqmc.py --fresh \
          --config.model.from_scratch=True --workdir "$OUT/epoch" 2>&1 | grep -v '^train:' | tee -a "$OUT/epoch.log" || status=1
        echo "$temperature run: $(echo "$(date +%s.%N) - $start" | bc) s from command to predictions" | tee -a "$OUT/epoch.log"
        cp "$OUT/epoch/summary.json" "$OUT/epoch_${temperature}_summary.json" 2>/dev/null || status=1
      done
      rm -rf "$OUT/epoch"  # only the summaries and the log come back
      ;;
    *) echo "error: unknown part $part (all, tests, bench, epoch)" >&2; exit 2 ;;
  esac
done
exit $status
