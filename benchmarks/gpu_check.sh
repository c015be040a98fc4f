#!/usr/bin/env bash
# The device check, as one script for a lent GPU machine (see README, "Measured"): GPU tests, the
# pipeline benchmark on CPU and CUDA with the thesis-size generator, and a short pcNET training.
# Needs the carried wheels in .whl (dask, distributed, zarr and their needs) where they are absent.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
if ! python3 -c "import zarr, distributed" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if ! command -v cellbatch >/dev/null; then
    mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m cellbatch "$@"\n' > /tmp/bin/cellbatch && chmod +x /tmp/bin/cellbatch
    export PATH=/tmp/bin:$PATH
fi
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; nproc; } 2>&1 | tee "$OUT/machine.txt"

echo "== GPU tests and the run tests on this torch"
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -5 | tee "$OUT/gpu-tests.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_generate.py tests/test_pipeline.py tests/test_export.py 2>&1 | tail -3 | tee -a "$OUT/gpu-tests.txt"

echo "== a model exported by torch 2.13 (the demo) loads and runs on this torch"
if [[ -f examples/demo-model/demo-l1net.pt ]]; then
    cellbatch synth /tmp/demo-in --count 8 --seed 2 --look dm1200 --quiet
    cellbatch run /tmp/demo-in/dm1200 -o /tmp/demo-out --model examples/demo-model/demo-l1net.pt --device cuda --quiet --json \
        | python3 -c "import json,sys; d=json.load(sys.stdin); print('demo on cuda: exit', d['exit_code'], d['cells'], 'cells')" \
        | tee "$OUT/demo-cuda.txt"
fi

echo "== pipeline benchmark (thesis-size generator, base_filters 64)"
python3 benchmarks/bench_pipeline.py --captures 192 --base-filters 64 --batch-size 32 --devices cuda,cpu 2>&1 | tee "$OUT/bench-pipeline.txt"

echo "== pcNET training on GPU"
OUT=$OUT/train TRAIN_SECONDS=${TRAIN_SECONDS:-150} COUNT=${COUNT:-400} bash benchmarks/train_gpu.sh 2>&1 | tail -40 | tee "$OUT/train.txt"
