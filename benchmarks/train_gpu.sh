#!/usr/bin/env bash
# Train pcNET on synthetic two-optics pairs on one GPU for a few minutes; report steps/s and validation
# figures against the untransformed input. Usage (repository root, venv active):
#
#   bash benchmarks/train_gpu.sh                 # GPU: ~5 min in all
#   DRY=1 bash benchmarks/train_gpu.sh           # CPU dry run with tiny settings (~1 min)
#
# Environment: OUT (results folder, default ./train-gpu-out), VGG16 (a torchvision vgg16 state dict;
# without it pcNET runs with --vgg-random and the feature term measures nothing perceptual),
# TRAIN_SECONDS (wall limit of the training, default 200; ~60 s more go to making pairs, startup and export), COUNT (synthetic captures, default 600),
# BASE (generator width, default 32: ~16 M parameters), BATCH (default 8), STEPS (default 20000: the
# time limit normally ends the run first; the newest checkpoint is exported).
set -euo pipefail
# Runs from a source tree too (a bare GPU machine with torch but without `pip install -e .`).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cb() { python -m cellbatch "$@"; }
OUT=${OUT:-train-gpu-out}
mkdir -p "$OUT"
if [[ "${DRY:-0}" == 1 ]]; then
    COUNT=${COUNT:-8} BASE=${BASE:-4} BATCH=${BATCH:-2} STEPS=${STEPS:-4} EVERY=2 TRAIN_SECONDS=${TRAIN_SECONDS:-120}
    extra=(--device cpu --crop 128)
    export OMP_NUM_THREADS=1
else
    COUNT=${COUNT:-600} BASE=${BASE:-32} BATCH=${BATCH:-8} STEPS=${STEPS:-20000} EVERY=500 TRAIN_SECONDS=${TRAIN_SECONDS:-200}
    extra=(--device cuda --bf16)
fi
if [[ -n "${VGG16:-}" ]]; then vgg=(--vgg-weights "$VGG16"); else vgg=(--vgg-random); fi

python - "$OUT" <<'PY'
import sys, torch, platform
print(f"torch {torch.__version__}, python {platform.python_version()}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
PY
start=$(date +%s)
if [[ ! -d "$OUT/pairs" ]]; then
    python -c "from cellbatch.train.synthpairs import pairs_from_synth; pairs_from_synth('$OUT/pairs', count=$COUNT, seed=1)"
fi
echo "pairs: $(ls "$OUT/pairs/source" | wc -l) in $(( $(date +%s) - start )) s"

# The time limit ends training between checkpoints; --resume would continue it, export takes the newest.
timeout --signal=INT "$TRAIN_SECONDS" python -m cellbatch train --setup pcnet --pairs "$OUT/pairs" --out "$OUT/run-pcnet" \
    --base-filters "$BASE" --batch-size "$BATCH" --steps "$STEPS" --checkpoint-every "$EVERY" \
    "${vgg[@]}" "${extra[@]}" -q || echo "training stopped by the ${TRAIN_SECONDS} s limit (rc $?)"
cb model export "$OUT/run-pcnet" --out "$OUT/pcnet.pt"

python - "$OUT" <<'PY'
import csv, json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = list(csv.DictReader(open(out / "run-pcnet" / "metrics.csv")))
val = json.loads((out / "run-pcnet" / "validation.json").read_text())
print("step  steps/s   val_l1  val_dE  val_PSNR val_SSIM")
for r in rows:
    print(f"{r['step']:>5} {float(r['steps_per_s']):8.2f} {float(r['val_l1']):8.4f} {float(r['val_delta_e']):7.3f}"
          f" {float(r['val_psnr']):8.2f} {float(r['val_ssim']):8.4f}")
i = val["input"]
print(f"input {'':8} {i['l1']:8.4f} {i['delta_e']:7.3f} {i['psnr']:8.2f} {i['ssim']:8.4f}   (untransformed)")
PY
echo "total $(( $(date +%s) - start )) s; results in $OUT"
