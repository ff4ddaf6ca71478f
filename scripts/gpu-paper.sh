#!/usr/bin/env bash
# Paper Table 1 at full length on one GPU, in one command:
#   bash scripts/gpu-paper.sh [OUT_DIR] [--budget S] [--jobs N] [--seeds 0,1,..] [--epochs E]
#   bash scripts/gpu-paper.sh --smoke OUT_DIR      (the same pipeline at toy size on the CPU; CI)
# OUT_DIR: $1, else $OUT, else ./gpu-paper. `--help` lists every option.
#
# What it does, in order, within --budget seconds of wall clock (540) for the whole script:
# 1. the CUDA equivalence tests (tests/test_cuda.py: CUDA steps against the CPU's; ~2 min on
#    the first H200 run, Triton compiles included); a failure stops it before any run starts;
# 2. Table 1's ResNet-20 rows: 1-bit {dorefa, bwn} x {sgd, adam} x {ste, multifc, fcgrad,
#    lstmfc} = 16 runs of 100 epochs, seed 0 (--seeds 0,1,2,3,4 for the paper's 5), from the
#    released full-precision ResNet-20 on the JPEG CIFAR-10 copy, --jobs processes at once on
#    the one GPU, the SGD rows first (the paper's main claim). STE with Adam runs without
#    weight decay, as the released baseline did. Each run is a plain `python launch.py`
#    process: at the budget's end the ones still going get SIGTERM, checkpoint at their next
#    step and stop; the same command again resumes them and skips the completed ones.
#    (Not submitit's local launcher: its timeout requeues a run instead of stopping it.)
# 3. `python -m mq.report --last 10` over the runs, with the paper's Table 1 beside ours
#    (mq/results/paper.py), copied to docs/results/table1-gpu/;
# 4. a summary: which configurations completed and which did not (and why), final test
#    accuracy and img/s per run, the aggregate img/s and the total wall time.
#
# OUT_DIR ends with at most four files, so a device machine can send them all back:
# gpu-paper.log (everything printed), summary.json, table.md, gpu-paper.tgz (the report with
# its plots, the logs, each run's config, summary and epoch rows). Runs, data and the report
# live in --runs (default outputs/sweeps/table1-gpu/; smoke: OUT_DIR/work).
#
# Needs: torch with CUDA, hydra-core, omegaconf, antlr4-python3-runtime, submitit, matplotlib
# and pytest; ../shared/data/cifar10-jpeg.tar.gz and
# ../shared/data/original-checkpoints/ResNet20-CIFAR10-pretrain.pth (or $MQ_SHARED_DATA with
# that layout, or --data / --checkpoint). On the device tool, ../shared does not travel: copy
# both into an ignored folder of the checkout and carry it, with the wheels the GPU image lacks
# (/work/.library/device/README.md), e.g.
#   mkdir -p .paperdata/original-checkpoints && echo /.paperdata/ >> .git/info/exclude
#   cp ../shared/data/cifar10-jpeg.tar.gz .paperdata/
#   cp ../shared/data/original-checkpoints/ResNet20-CIFAR10-pretrain.pth .paperdata/original-checkpoints/
#   run(command="python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#       && export PYTHONPATH=/tmp/site && MQ_SHARED_DATA=.paperdata bash scripts/gpu-paper.sh",
#       carry=[".paperdata", ".whl"], timeout_s=600)
# How long: the budget (540 s) plus start-up; whether all 16 runs complete in it depends on
# the speed work of issue 20 (today ~40,000 img/s for 8 runs on one H200, where one seed of
# Table 1 needs ~150,000 for 540 s): the summary says which did. Smoke: about 1-2 minutes on
# 2 CPU cores (4 configurations, 2 epochs of 2 batches, a generated image folder).
# A dry run of the full path on a CPU (the JPEG data, the checkpoint, all 16 configurations,
# the report; 2 min on 2 cores): bash scripts/gpu-paper.sh OUT --no-tests --epochs 1 --jobs 2
#   --runs /tmp/work --results /tmp/results -- device=cpu batch_size=32 limit_train_batches=2
#   limit_test_batches=1
# Exit status: 0 when every run completed or was stopped by the budget, 1 when a run or the
# report failed or the equivalence tests did, 2 for bad input (one line, nothing written).
set -u
cd "$(dirname "$0")/.."
# The checkout's .venv when there is one, else the machine's python3 (GPU images have torch
# there); run from the checkout, so mq is importable without installing.
py=.venv/bin/python
[ -x "$py" ] || py=$(command -v python3 || command -v python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" scripts/gpu_paper.py "$@"
