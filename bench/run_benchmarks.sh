#!/usr/bin/env bash
# Slow checks and benchmarks: the tests marked slow, then the CIFAR ResNet results page.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pytest -q -m slow
python bench/bench_resnet.py "$@"
