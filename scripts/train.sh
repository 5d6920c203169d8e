#!/usr/bin/env bash
# The main job: Activation Relaxation training of the paper's MLP on
# Fashion-MNIST at the paper's settings (eta 0.1, 100 relaxation steps, summed
# MSE, SGD lr 5e-4), 300 batches; prints test accuracy and the cosine of the AR
# gradients to autograd's. Installs and builds first (scripts/setup.sh).
# Extra arguments go to the CLI and override the defaults, e.g.
#   bash scripts/train.sh --epochs 5
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

source scripts/setup.sh

section "train (python -m torch_ar train)"
exec "$PYTHON" -m torch_ar train --dataset fashion-mnist --model mlp --method ar \
  --eta 0.1 --steps 100 --epochs 1 --limit-train-batches 300 "$@"
