#!/usr/bin/env bash
# Nightly bulk conversion, meant for cron (see examples/crontab). Safe to rerun: finished slides
# whose inputs, model and settings are unchanged are skipped, so a run killed at 3 a.m. is simply
# started again. A second copy started while one is running refuses (exit 3) instead of racing it.
#
#   nightly.sh SRC OUT MODEL [MODEL_SHA256]
#
# Exit codes (from cellbatch run; docs/run-state.md): 0 all done, 2 bad command line, 3 could not run
# (or refused: another run holds OUT), 4 some inputs in OUT failed, 5 some slides in OUT below
# --min-agreement, 130/143 interrupted (rerun to resume). Codes 4 and 5 repeat every night until the
# cause is fixed: a skipped slide still reports its failures. OUT/run.json lists every slide and every
# failure with its reason; OUT/last-summary.json is the summary of the last run that ran, and
# OUT/last-error.json the error of the last one that could not (a refused night leaves the summary alone).
set -uo pipefail
src="$1" out="$2" model="$3" sha="${4:-}"
mkdir -p "$out"
args=(run "$src" --out "$out" --model "$model" --normalise display --quiet --json)
[ -n "$sha" ] && args+=(--model-sha256 "$sha")
[ -n "${CELLBATCH_CLASSIFIER:-}" ] && args+=(--classifier "$CELLBATCH_CLASSIFIER" --min-agreement "${CELLBATCH_MIN_AGREEMENT:-0.8}")
tmp="$(mktemp "$out/.summary.XXXXXX")"
cellbatch "${args[@]}" > "$tmp"
code=$?
case "$code" in
    0|4|5|130|143) mv -f "$tmp" "$out/last-summary.json" ;;  # a run that ran: its summary is OUT's state
    *) mv -f "$tmp" "$out/last-error.json" ;;
esac
case "$code" in
    0) echo "$(date -Is) cellbatch: all slides done" ;;
    4) echo "$(date -Is) cellbatch: some inputs failed: see $out/run.json" ;;
    5) echo "$(date -Is) cellbatch: some slides failed QC: see $out/run.json" ;;
    130|143) echo "$(date -Is) cellbatch: interrupted; the next run resumes" ;;
    *) echo "$(date -Is) cellbatch: could not run (exit $code): see $out/last-error.json" ;;
esac
exit "$code"
