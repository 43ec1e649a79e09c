#!/usr/bin/env bash
# Starts sda-jax training on this host, alone or as one process of a multi-host run.
#
#   ./launch.sh [--coordinator HOST:PORT --num-processes N --process-id I] CONFIG_FILE [train flags...]
#
# Single host: ./launch.sh configs/afqmc.py --workdir runs/afqmc
# Multi-host: run the same command on every host with its own --process-id (0 is the coordinator
# host, which writes logs, predictions and exports; checkpoints are written by all together). The
# three values can also come from SDA_COORDINATOR_ADDRESS / SDA_NUM_PROCESSES / SDA_PROCESS_ID.
# Under SLURM (srun ./launch.sh CONFIG ...) nothing is needed: JAX reads SLURM_* itself.
# Every process must see the same data files and workdir (a shared filesystem). PYTHON=/path/to/python
# picks the interpreter (default: python on PATH).
set -euo pipefail
usage() {
  echo "usage: $0 [--coordinator HOST:PORT --num-processes N --process-id I] CONFIG_FILE [train flags...]" >&2
  exit 2
}
while [[ $# -gt 0 ]]; do
  case $1 in
    --coordinator) [[ $# -ge 2 ]] || usage; export SDA_COORDINATOR_ADDRESS=$2; shift 2 ;;
    --num-processes) [[ $# -ge 2 ]] || usage; export SDA_NUM_PROCESSES=$2; shift 2 ;;
    --process-id) [[ $# -ge 2 ]] || usage; export SDA_PROCESS_ID=$2; shift 2 ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage
config=$1
shift
if [[ -n ${SDA_COORDINATOR_ADDRESS:-} && ( -z ${SDA_NUM_PROCESSES:-} || -z ${SDA_PROCESS_ID:-} ) ]]; then
  echo "error: a coordinator needs --num-processes and --process-id (or SDA_NUM_PROCESSES/SDA_PROCESS_ID)" >&2
  exit 2
fi
# The interpreter: $PYTHON if set (e.g. a virtualenv's, not activated), else the first python on PATH.
exec "${PYTHON:-python}" -m sda_jax.train --config "$config" "$@"
