#!/usr/bin/env bash
# Nightly bulk conversion, meant for cron (see examples/crontab). Safe to rerun: finished slides
# whose inputs, model and settings are unchanged are skipped, so a run killed at 3 a.m. is simply
# started again. A second copy started while one is running refuses (exit 3) instead of racing it.
#
#   nightly.sh SRC OUT MODEL [MODEL_SHA256]
#
# Exit codes (from cellbatch run): 0 all done, 3 could not run, 4 some inputs failed,
# 5 some slides below --min-agreement. OUT/run.json lists every slide and every failure with its reason.
set -uo pipefail
src="$1" out="$2" model="$3" sha="${4:-}"
mkdir -p "$out"
args=(run "$src" --out "$out" --model "$model" --normalise display --quiet --json)
[ -n "$sha" ] && args+=(--model-sha256 "$sha")
[ -n "${CELLBATCH_CLASSIFIER:-}" ] && args+=(--classifier "$CELLBATCH_CLASSIFIER" --min-agreement "${CELLBATCH_MIN_AGREEMENT:-0.8}")
cellbatch "${args[@]}" > "$out/last-summary.json"
code=$?
case "$code" in
    0) echo "$(date -Is) cellbatch: all slides done" ;;
    4) echo "$(date -Is) cellbatch: finished, some inputs failed: see $out/run.json" ;;
    5) echo "$(date -Is) cellbatch: finished, some slides failed QC: see $out/run.json" ;;
    *) echo "$(date -Is) cellbatch: could not run (exit $code)" ;;
esac
exit "$code"
