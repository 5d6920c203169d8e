#!/usr/bin/env bash
# The main job: one epoch of Activation Relaxation training of the paper's MLP
# on Fashion-MNIST (300 batches). Installs and builds first (scripts/setup.sh).
# Extra arguments go to the CLI and override the defaults, e.g.
#   bash scripts/train.sh --epochs 5
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

source scripts/setup.sh

section "train (python -m torch_ar train)"
exec "$PYTHON" -m torch_ar train --dataset fashion-mnist --model mlp --method ar \
  --epochs 1 --limit-train-batches 300 "$@"
