#!/usr/bin/env bash
# Create .venv (if missing) and install mq with its dependencies and the dev extra.
# Idempotent: a second run only checks that the install is complete (and prints nothing).
# Without a GPU: MQ_TORCH_INDEX=https://download.pytorch.org/whl/cpu scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CPU_INDEX=https://download.pytorch.org/whl/cpu
say() { echo "setup: $*" >&2; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import mq, torch, torchvision, hydra, wandb, submitit, hydra_plugins.hydra_submitit_launcher, pytest, ruff, importlinter, matplotlib, tqdm" 2>/dev/null; then
  # PyPI's default torch wheel bundles the CUDA libraries (~3 GB to download, 5.7 GB in .venv),
  # useless without an NVIDIA GPU; the +cpu build of the same version has none. Say so before
  # the download, in one line: the CPU index is not reachable from every machine.
  if [ -z "${MQ_TORCH_INDEX:-}" ] && ! .venv/bin/python -c "import torch" 2>/dev/null \
    && ! nvidia-smi -L >/dev/null 2>&1 && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    say "no NVIDIA GPU found: torch from PyPI brings ~3 GB of CUDA libraries; for the CPU-only build, stop (Ctrl-C) and run MQ_TORCH_INDEX=$CPU_INDEX scripts/setup.sh"
  fi
  say "upgrading pip"
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  say "installing mq, torch 2.14.1, torchvision, hydra, wandb, submitit, pytest, ruff${MQ_TORCH_INDEX:+ (torch from $MQ_TORCH_INDEX)}: minutes on a first install"
  # MQ_TORCH_INDEX: an extra index for torch's wheels (the CPU-only build above); unset, pip's
  # own configuration decides. PYTHONWARNINGS: setuptools adds a 10-line notice to every
  # editable install ("Editable installation. Please be careful with folders ..."), not a fault.
  PYTHONWARNINGS="ignore:Editable installation${PYTHONWARNINGS:+,$PYTHONWARNINGS}" \
    .venv/bin/python -m pip install --quiet ${MQ_TORCH_INDEX:+--extra-index-url "$MQ_TORCH_INDEX"} \
    -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
  say "checking the install"
  .venv/bin/python -c "import mq, torch, hydra, wandb, submitit" # fail loudly if the install did not work
  say "done: .venv is ready"
fi
