#!/usr/bin/env bash
# Create .venv (if missing) and install mq with its dependencies and the dev extra.
# Idempotent: a second run only checks that the install is complete.
# Without a GPU: MQ_TORCH_INDEX=https://download.pytorch.org/whl/cpu scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import mq, torch, torchvision, hydra, wandb, submitit, hydra_plugins.hydra_submitit_launcher, pytest, ruff, matplotlib, tqdm" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # MQ_TORCH_INDEX=https://download.pytorch.org/whl/cpu: torch's CPU-only build (+cpu wheels,
  # no CUDA libraries) on a machine without a GPU; unset, pip's own configuration decides.
  .venv/bin/python -m pip install --quiet ${MQ_TORCH_INDEX:+--extra-index-url "$MQ_TORCH_INDEX"} \
    -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import mq, torch, hydra, wandb, submitit" # fail loudly if the install did not work
fi
