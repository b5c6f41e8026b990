#!/usr/bin/env bash
# Compress your own model, end to end (README, "Compress your own model"):
#   an image folder -> your trained resnet18 -> lrx run (row 1: it as it is; row 2: scheme 2 at a 1.5x latency
#   target, fine-tuned) -> the table -> an ONNX file -> its speed in ONNX Runtime.
#
#   examples/own_model/run.sh [WORK]      # full size: 2,000 + 500 images at 64 px (WORK: examples/own_model/work)
#   TINY=1 examples/own_model/run.sh      # every command at toy size (200 + 100 images, 32 px; WORK: .../work-tiny)
#
# Sizes: TRAIN, VAL (images), EPOCHS (train_own.py's). lrx and python are taken from PATH (e.g. after
# `source .venv/bin/activate`). Everything is written under WORK, which is where the commands run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ -n "${TINY:-}" ]; then
    configs=$here/tiny size=32 TRAIN=${TRAIN:-200} VAL=${VAL:-100} EPOCHS=${EPOCHS:-1}
    work=${1:-$here/work-tiny}
else
    configs=$here size=64 TRAIN=${TRAIN:-2000} VAL=${VAL:-500} EPOCHS=${EPOCHS:-3}
    work=${1:-$here/work}
fi
mkdir -p "$work"
cd "$work"
set -x

# 1. Your data and your model (stand-ins: Fashion-MNIST as PNGs, a resnet18 trained by plain PyTorch).
[ -d images ] || python "$here/make_data.py" --out images --train "$TRAIN" --val "$VAL" --size "$size"
[ -f my_resnet18.pt ] || python "$here/train_own.py" --data images --size "$size" --epochs "$EPOCHS" --out my_resnet18.pt

# 2. Compress: row 1 evaluates and profiles the checkpoint, row 2 plans, expands, fine-tunes and profiles.
lrx run "$configs/original.yaml" "$configs/fast.yaml" --runs-dir runs
lrx table runs

# 3. Deploy: the final model as ONNX (checked against PyTorch), timed in ONNX Runtime against the original.
lrx export runs/fast --format onnx -o fast.onnx --input-size 3,224,224
lrx profile "$configs/fast.yaml" --runs-dir runs --onnx
