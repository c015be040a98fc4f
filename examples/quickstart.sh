#!/usr/bin/env bash
# Quickstart: make synthetic DM1200-look captures, convert them to the DM96 look with the demo
# generator, normalise for display, and write cells + provenance + an HTML report to quickstart/out.
#   bash examples/quickstart.sh [WORKDIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-quickstart}"
cellbatch synth "$work/captures" --count 12 --seed 1 --look dm1200 --quiet
cellbatch run "$work/captures/dm1200" --out "$work/out" \
    --model "$here/demo-model/demo-l1net.pt" --normalise display --report
echo "converted cells: $work/out/dm1200/cells.csv, cells.zarr; run summary: $work/out/run.json"
echo "open $work/out/report.html in a browser to see them before and after"
