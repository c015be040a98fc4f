"""Soak: 20,000 synthetic captures through the CPU path; peak RSS must stay flat as input grows.

Writes a pool of distinct synthetic captures once, then hard-links them under slide folders of
``--per-slide`` captures (so 20,000 captures cost the disk space of the pool), runs
``cellbatch.api.convert`` in this process, and prints peak and current RSS when 1k, 5k and 20k
captures are done, and the captures/s after the first checkpoint.

``--layouts 100,20000`` runs each layout in its own process (so each peak RSS is its own) and
compares them: 200 slides of 100 against one slide of 20,000 captures, which must run at the same
captures/s with the same flat memory (a task carries its capture references, not the slide).

    python benchmarks/soak.py --captures 20000 [--per-slide 100] [--model MODEL.pt] [--keep DIR]
    python benchmarks/soak.py --captures 20000 --layouts 100,20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def build_input(root: Path, *, captures: int, pool: int, per_slide: int) -> Path:
    from cellbatch.synth import write_synth

    write_synth(root / "pool", count=pool, seed=0, looks=("dm1200",))
    sources = sorted((root / "pool" / "dm1200").glob("*.png"))
    src = root / "slides"
    for i in range(captures):
        folder = src / f"slide_{i // per_slide:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], folder / f"capture_{i % per_slide:04d}.png")
    return src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captures", type=int, default=20000)
    parser.add_argument("--pool", type=int, default=64, help="distinct synthetic captures to hard-link")
    parser.add_argument("--per-slide", type=int, default=100)
    parser.add_argument("--checkpoints", default="1000,5000,20000")
    parser.add_argument("--model", type=Path, help="generator to run too (default: none, read/detect/crop/write)")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--layouts", help="captures per slide to compare, each in its own process, e.g. 100,20000")
    args = parser.parse_args()
    if args.layouts:
        compare_layouts(args)
        return

    from cellbatch.api import convert

    checkpoints = sorted(int(c) for c in args.checkpoints.split(",") if int(c) <= args.captures)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        src = build_input(root, captures=args.captures, pool=args.pool, per_slide=args.per_slide)
        readings: list[dict[str, float]] = []
        done = 0
        start = time.perf_counter()

        def on_progress(n_captures: int, n_cells: int, n_slides: int) -> None:
            nonlocal done
            done += n_captures
            while checkpoints and done >= checkpoints[0]:
                readings.append({"captures": checkpoints.pop(0), "peak_rss_mib": round(peak_rss_mib(), 1),
                                 "rss_mib": round(current_rss_mib(), 1),
                                 "seconds": round(time.perf_counter() - start, 1)})
                print(json.dumps(readings[-1]), flush=True)

        report = convert([src], root / "out", model=args.model, device="cpu", on_progress=on_progress,
                         command=["soak"])
    steady = readings[-1]["captures"] - readings[0]["captures"] if len(readings) > 1 else 0
    print(json.dumps({"captures": args.captures, "per_slide": args.per_slide, "slides": len(report.slides),
                      "cells": sum(s.cells for s in report.slides),
                      "exit_code": report.exit_code, "readings": readings,
                      "captures_per_s_after_first_checkpoint": round(
                          steady / (readings[-1]["seconds"] - readings[0]["seconds"]), 1) if steady else None,
                      "peak_growth_1k_to_last": round(readings[-1]["peak_rss_mib"] / readings[0]["peak_rss_mib"], 3)
                      if readings else None}, indent=2))


def compare_layouts(args: argparse.Namespace) -> None:
    """Run each layout in a child process and print its captures/s and peak RSS side by side."""
    rows = []
    for per_slide in (int(n) for n in args.layouts.split(",")):
        command = [sys.executable, __file__, "--captures", str(args.captures), "--pool", str(args.pool),
                   "--per-slide", str(per_slide), "--checkpoints", args.checkpoints]
        if args.model:
            command += ["--model", str(args.model)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output[output.index("{\n"):])
        rows.append({"per_slide": per_slide, "slides": result["slides"], "seconds": result["readings"][-1]["seconds"],
                     "captures_per_s": result["captures_per_s_after_first_checkpoint"],
                     "peak_rss_mib": [r["peak_rss_mib"] for r in result["readings"]],
                     "peak_growth": result["peak_growth_1k_to_last"]})
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    print(json.dumps({"load_average": os.getloadavg(), "layouts": rows,
                      f"captures_per_s_{last['per_slide']}_over_{first['per_slide']}": round(
                          last["captures_per_s"] / first["captures_per_s"], 3)}, indent=2))


if __name__ == "__main__":
    main()
