#!/usr/bin/env bash
# Starts sda-jax training on this host. Usage:
#   ./launch.sh configs/afqmc.py [--workdir runs/afqmc] [--config.key=value ...]
# Single host for now: it runs the train module with the given config file and any extra flags.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG_FILE [--workdir DIR] [--config.key=value ...]" >&2
  exit 2
fi
config=$1
shift
if [[ ! -f $config ]]; then
  echo "error: $config: no such config file" >&2
  exit 2
fi
exec python -m sda_jax.train --config "$config" "$@"
