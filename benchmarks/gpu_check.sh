#!/usr/bin/env bash
# The device check, as one prepared script for a lent GPU machine (see README, "Measured", and
# docs/devices.md): the GPU tests, then the pipeline table of benchmarks/bench_pipeline.py on CUDA
# with 14 worker processes and the thesis-size generator (base width 32, 16 M parameters) at
# --precision auto (bf16) and --batch-size auto, with the fp32 whole run and the bf16 parity line.
# Targets on an H200: (b) generator alone >= 6,000 crops/s; (c) whole run >= 0.85 of (a), the CPU stage.
# The (w) row, the slide writer alone, shows whether writing could keep up with the generator there.
# Then, on the same machine's CPU alone, the whole run with the CPU stage in threads against the
# worker processes `--processes auto` gives it beside a CPU generator from 8 cores (a quarter of them;
# cellbatch/threads.py): the split is unmeasured elsewhere. CPU_SPLIT=0 skips it.
# It has not run on a GPU yet, so its length there is unknown: run it with the device's longest timeout
# and CPU_SPLIT=0 when little device time is left. Needs the carried wheels in .whl (dask, distributed,
# zarr and their needs) where absent.
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # TRAIN_SECONDS=150 adds a short pcNET training
set -uo pipefail
OUT=${OUT:-gpu-check-out}
CAPTURES=${CAPTURES:-960}
PROCESSES=${PROCESSES:-14}
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

echo "== GPU tests (transfers, normalisers on CUDA against numpy, precision, batch size auto) and the run tests"
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -5 | tee "$OUT/gpu-tests.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_stages.py tests/test_batch_size.py tests/test_precision.py \
    tests/test_generate.py tests/test_pipeline.py 2>&1 | tail -3 | tee -a "$OUT/gpu-tests.txt"

echo "== pipeline table on CUDA: $PROCESSES worker processes, thesis-size generator, precision auto, batch auto"
python3 benchmarks/bench_pipeline.py --device cuda --processes "$PROCESSES" --captures "$CAPTURES" \
    --base-filters 32 --precision auto --batch-size auto --targets gpu 2>&1 | tee "$OUT/bench-pipeline.txt"

if [[ "${TRAIN_SECONDS:-0}" -gt 0 ]]; then
    echo "== pcNET training on GPU"
    OUT=$OUT/train TRAIN_SECONDS=$TRAIN_SECONDS COUNT=${COUNT:-400} bash benchmarks/train_gpu.sh 2>&1 | tail -40 | tee "$OUT/train.txt"
fi

if [[ "${CPU_SPLIT:-1}" != 0 ]]; then
    split=$(( $(python3 -c "import os; print(len(os.sched_getaffinity(0)))") / 4 ))
    runs="0"
    (( split >= 2 )) && runs="0 $split"  # fewer than 8 cores: threads only, as auto has it
    for processes in $runs; do
        echo "== CPU only: thesis-size generator, CPU stage in $processes worker processes (0: threads)"
        CUDA_VISIBLE_DEVICES= timeout 300 python3 benchmarks/bench_pipeline.py --device cpu --processes "$processes" \
            --captures 400 --base-filters 32 --no-fp32-run --no-parity 2>&1 | tee "$OUT/bench-cpu-processes-$processes.txt"
    done
fi
