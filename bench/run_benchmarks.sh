#!/usr/bin/env bash
# Slow checks and benchmarks: the tests marked slow, the torchvision coverage page (about 10 minutes
# on 2 cores), then the CIFAR ResNet results page.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pytest -q -m slow
python bench/coverage_zoo.py
python bench/bench_resnet.py "$@"
