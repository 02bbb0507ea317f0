#!/usr/bin/env bash
# Training burst on a lent GPU: fp32 then QAT (the recipe of reports/quantization.md) for ethanol and aspirin,
# the two molecules side by side on one GPU, each stage bounded in wall time. Needs python3 with a CUDA torch,
# scipy, tqdm and typer (the device image has them); no TVM.
#   here, once:  bash reports/cuda/train_gpu.sh prepare      (rMD17 splits -> gpu_data/, git-ignored)
#   there:       bash reports/cuda/train_gpu.sh               (run tool: carry ["gpu_data"]; results in $OUT/runs)
# Knobs (environment): DEVICE (cuda), MINUTES per stage (4), FP32_EPOCHS (400), QAT_EPOCHS (120), PY (python3),
# N_TRAIN (950 training frames), EVAL_FRAMES (0: the whole test split).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = prepare ]; then
  mkdir -p gpu_data
  grep -qx "/gpu_data/" .git/info/exclude || echo "/gpu_data/" >> .git/info/exclude
  cp "${QSO3_RMD17_DIR:-../shared/data/rmd17}"/rmd17_{ethanol,aspirin}_{train,test}_01.npz gpu_data/
  exit 0
fi
PY=${PY:-python3} DEVICE=${DEVICE:-cuda} MINUTES=${MINUTES:-4}
OUT=${OUT:-$PWD/gpu_out}
export PYTHONPATH=$PWD QSO3_RMD17_DIR=$PWD/gpu_data PYTHONUNBUFFERED=1
mkdir -p "$OUT/runs"
{ nvidia-smi --query-gpu=name --format=csv,noheader || true; $PY -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } \
  > "$OUT/env.txt" 2>&1
cli() { $PY -m qso3_tvm.cli "$@"; }
for m in ethanol aspirin; do  # stage 1: fp32
  cli train --data $m -o "$OUT/runs/${m}_fp32" --epochs "${FP32_EPOCHS:-400}" --n-train "${N_TRAIN:-950}" --batch-size 8 --device "$DEVICE" \
    --max-minutes "$MINUTES" > "$OUT/${m}_fp32.log" 2>&1 &
done
wait
for m in ethanol aspirin; do  # stage 2: QAT from the stage-1 model
  cli quantize "$OUT/runs/${m}_fp32/best.pt" --data $m -o "$OUT/runs/${m}_int8" --epochs "${QAT_EPOCHS:-120}" --n-train "${N_TRAIN:-950}" \
    --warmup-epochs 10 --float-head --distill-weight 0.5 --lr-scalar 1e-4 --lr-vector 5e-5 --device "$DEVICE" \
    --max-minutes "$MINUTES" > "$OUT/${m}_int8.log" 2>&1 &
done
wait
for r in "$OUT"/runs/*/; do  # test-split accuracy of each best model (eager, on the host CPU of the GPU machine)
  m=$(basename "$r"); m=${m%%_*}
  cli evaluate "$r/best.pt" --data $m --json --lee-frames 20 --max-frames "${EVAL_FRAMES:-0}" > "$r/test.json" 2>> "$OUT/evaluate.log" || true
done
tail -n 3 "$OUT"/runs/*/log.csv "$OUT"/runs/*/test.json
