#!/usr/bin/env bash
# Compress your own model, end to end (README, "Compress your own model"):
#   an image folder -> your trained resnet18 -> lrx run (row 1: it as it is; row 2: scheme 2 at a 1.5x latency
#   target, fine-tuned; row 3: the same target with scheme auto) -> the table -> an ONNX file -> its speed in
#   ONNX Runtime.
#
#   examples/own_model/run.sh            # full size: 2,000 + 500 images at 64 px, in examples/own_model/work/
#   TINY=1 examples/own_model/run.sh     # every command at toy size (200 + 100 images at 32 px, tiny/ configs),
#                                        # in examples/own_model/work-tiny/; its numbers mean nothing
#
# Sizes: TRAIN, VAL (images), EPOCHS (train_own.py's). lrx and python come from PATH (e.g. after
# `source .venv/bin/activate`). The commands run in the work folder (relative paths in the configs are
# relative to it); the images and the checkpoint are made once, remove the folder to start afresh.
set -euo pipefail
cd "$(dirname "$0")"
if [ -n "${TINY:-}" ]; then
    work=work-tiny configs=../tiny size=32 TRAIN=${TRAIN:-200} VAL=${VAL:-100} EPOCHS=${EPOCHS:-1}
else
    work=work configs=.. size=64 TRAIN=${TRAIN:-2000} VAL=${VAL:-500} EPOCHS=${EPOCHS:-3}
fi
mkdir -p "$work"
cd "$work"
set -x

# 1. Your data and your model (stand-ins: Fashion-MNIST as PNGs, a resnet18 trained by plain PyTorch).
[ -d images ] || python ../make_data.py --out images --train "$TRAIN" --val "$VAL" --size "$size"
[ -f my_resnet18.pt ] || python ../train_own.py --data images --size "$size" --epochs "$EPOCHS" --out my_resnet18.pt

# 2. Compress: row 1 evaluates and profiles the checkpoint, rows 2 and 3 plan, expand, fine-tune and profile.
lrx run "$configs/original.yaml" "$configs/fast.yaml" "$configs/fast_auto.yaml" --runs-dir runs
lrx table runs --versus fast

# 3. Deploy: the final model as ONNX (checked against PyTorch), timed in ONNX Runtime against the original.
lrx export runs/fast --format onnx -o fast.onnx --input-size 3,224,224
lrx profile "$configs/fast.yaml" --runs-dir runs --onnx
