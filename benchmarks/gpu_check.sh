#!/usr/bin/env bash
# The device check: CUDA tests, then the seed's nine rows and scheme 2 at 3x at full size (224x224,
# batch 64) with one epoch per stage on CIFAR-10-shaped synthetic data, then the all-experiments estimate.
#
#   OUT=out bash benchmarks/gpu_check.sh            # on a GPU machine; results land in $OUT
#   OUT=out ROWS=timing bash benchmarks/gpu_check.sh  # rows 1, 2, 6 and 11 only
#   OUT=out EPOCH_IMAGES=128 PY=.venv/bin/python bash benchmarks/gpu_check.sh   # a dry run on CPU
#
# CIFAR-10 cannot be fetched there, so benchmarks/fake_cifar10.py writes 50,000 + 10,000 synthetic
# images in its layout: epoch times hold for CIFAR-10, accuracies are the synthetic task's.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
PY=${PY:-python3}
RUNS=${RUNS:-/tmp/lrx-gpu-runs}; DATA=${DATA:-/tmp/lrx-fake-cifar}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
lrx() { $PY -m lrx "$@"; }
SUB=()
if [ -n "${EPOCH_IMAGES:-}" ]; then  # dry run: small epochs at 64x64
  SUB=(--set "data.train_subset=$EPOCH_IMAGES" --set "data.test_subset=$EPOCH_IMAGES" --set data.image_size=64
       --set "profile.input_size=[3,64,64]" --set profile.batch=4)
fi
one=(--runs-dir "$RUNS" --data-root "$DATA" -q "${SUB[@]}")

{ nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/device.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/cuda-tests.txt"
$PY benchmarks/fake_cifar10.py "$DATA"

t0=$(date +%s)
{
  lrx run configs/exp01.yaml "${one[@]}" --set train.epochs=1
  lrx run configs/exp02.yaml configs/exp06.yaml "${one[@]}"
  if [ "${ROWS:-all}" = all ]; then  # ROWS=timing: only the rows the timing columns need
    for c in exp03 exp04 exp05 exp07 exp08 exp09; do  # exp04/exp08 continue exp03/exp07 with their CE stage
      lrx run configs/$c.yaml "${one[@]}" --set finetune.0.epochs=1
    done
  fi
  lrx run configs/exp11.yaml "${one[@]}" --set finetune.0.epochs=1 --set finetune.1.epochs=1
} 2>&1 | tee "$OUT/runs.log"
echo "rows took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/runs.log"
lrx table "$RUNS" | tee "$OUT/gpu-table.md"
lrx table "$RUNS" --format json > "$OUT/gpu-table.json"
$PY - "$RUNS" <<'PY' | tee "$OUT/epoch-times.txt"
import json, sys, pathlib
for m in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    d = json.loads(m.read_text())
    for name, s in d.get("stages", {}).items():
        print(f"{d['name']} {name}: {s.get('wall_s', 0):.1f} s")
PY
timeout 120 $PY benchmarks/estimate_experiments.py --steps 20 2>&1 | tee "$OUT/estimate.txt"
