#!/usr/bin/env bash
# Time-limited training on one GPU, the recipe of docs/training.md ("Training to a time limit"):
# L1Net and pcNET, each trained with `--time-limit 600 --device cuda` on one half of the PBC captures
# (through the synthetic optics shift) and validated on the other, then with the halves swapped; every
# run reports white-cell and whole-crop ΔE and classifier agreement against HM fitted on the same
# training pairs. Usage (repository root, venv active):
#
#   bash benchmarks/train_gpu.sh                 # GPU: 4 runs x 600 s + pairs, validation: ~50 min
#   DRY=1 bash benchmarks/train_gpu.sh           # CPU dry run: tiny synthetic pairs, 20 s per run
#
# Environment: OUT (results folder, default ./train-gpu-out); TRAIN_SECONDS (default 600); SETUPS
# (default "l1net pcnet"); VGG16 (a torchvision vgg16 state dict; without it pcNET runs with
# --vgg-random and its feature term measures nothing perceptual); DATA (the PBC folder, default
# ../shared/data/pbc; where it is absent, SYNTH synthetic captures per half stand in, default 300);
# CLASSIFIER (a classifier file; default: trained here on DATA when present).
set -euo pipefail
# Runs from a source tree too (a bare GPU machine with torch but without `pip install -e .`).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-train-gpu-out}
DATA=${DATA:-../shared/data/pbc}
SETUPS=${SETUPS:-l1net pcnet}
if [[ "${DRY:-0}" == 1 ]]; then
    TRAIN_SECONDS=${TRAIN_SECONDS:-20} SYNTH=${SYNTH:-6} DEVICE=cpu DATA=/nonexistent
    extra=(--base-filters 4 --val-quick 2)
    export OMP_NUM_THREADS=1
else
    TRAIN_SECONDS=${TRAIN_SECONDS:-600} SYNTH=${SYNTH:-300} DEVICE=cuda
    extra=()
fi
mkdir -p "$OUT"
python - <<'PY'
import platform, torch
print(f"torch {torch.__version__}, python {platform.python_version()}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
PY
start=$(date +%s)
if [[ -d "$DATA" ]]; then
    python benchmarks/train_pbc.py pairs --out "$OUT" --data "$DATA"
    if [[ -z "${CLASSIFIER:-}" && ! -f "$OUT/pbc-classifier.pt" ]]; then
        python -m cellbatch classifier train "$DATA" --out "$OUT/pbc-classifier.pt" --device "$DEVICE" --json | tail -3
    fi
else
    python benchmarks/train_pbc.py pairs --out "$OUT" --synthetic "$SYNTH"
fi
[[ -n "${CLASSIFIER:-}" ]] && cp "$CLASSIFIER" "$OUT/pbc-classifier.pt"
echo "pairs ready in $(( $(date +%s) - start )) s"
vgg=()
[[ -n "${VGG16:-}" ]] && vgg=(--vgg-weights "$VGG16")
for setup in $SETUPS; do
    for half in even odd; do
        python benchmarks/train_pbc.py train --out "$OUT" --setup "$setup" --train "$half" \
            --time-limit "$TRAIN_SECONDS" --device "$DEVICE" "${vgg[@]}" -- "${extra[@]}" > /dev/null
        echo "run-$setup-$half done at $(( $(date +%s) - start )) s"
    done
done
python benchmarks/train_pbc.py report --out "$OUT"
echo "total $(( $(date +%s) - start )) s; results in $OUT"
