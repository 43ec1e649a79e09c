#!/usr/bin/env bash
# Makes what benchmarks/gpu_acceptance.sh needs on a machine without registries, inside the checkout:
#   shared/data/  a copy of ../shared/data (AFQMC files, bert-base-chinese config and vocabulary)
#   .whl/         wheels of the packages the GPU image lacks (ml_collections, tensorboardX), for
#                 Python 3.12 on x86-64 (the lent machines' python3); both paths are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p shared
cp -r ../shared/data shared/
PYVER=${PYVER:-3.12}
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "ml_collections==1.1.0" "tensorboardX==2.6.5"
ls -la .whl shared/data
