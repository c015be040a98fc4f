"""End-to-end throughput of ``cellbatch run`` against its two main stages, measured in one run.

On synthetic DM-scale captures it times
  (a) read + detect + crop alone (the Dask stage, same chunking and threads as a run),
  (b) the generator alone on ready crops (same batch size),
  (c) the whole run (``cellbatch.api.convert``: also normalisation, writing, provenance),
and prints captures/s and cells/s for each and the ratio (c) / min(a, b) in cells/s: 1.0 means the
run is as fast as its slowest stage, i.e. the stages overlap perfectly. Run on CPU, and on CUDA too
when present.

    python benchmarks/bench_pipeline.py --captures 96 --base-filters 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_extract(slide_dir: Path, *, workers: int | None, processes: int, chunk: int) -> tuple[float, np.ndarray, int]:
    from cellbatch.api import dask_client
    from cellbatch.extract import ExtractSettings, capture_refs, extract_chunk
    from cellbatch.read import discover_slides

    refs = capture_refs(discover_slides(slide_dir)[0])
    with dask_client(None, workers, processes=processes) as client:
        client.submit(extract_chunk, refs[:1], ExtractSettings(), pure=False).result()  # warm up
        start = time.perf_counter()
        futures = [client.submit(extract_chunk, refs[i : i + chunk], ExtractSettings(), pure=False)
                   for i in range(0, len(refs), chunk)]
        results = [r for f in futures for r in f.result()]
        seconds = time.perf_counter() - start
    crops = np.concatenate([r.crops for r in results if r.crops is not None and len(r.crops)])
    return seconds, crops, len(refs)


def bench_generator(model: Path, crops: np.ndarray, *, device: str, batch_size: int) -> float:
    from cellbatch.generate import Generator

    generator = Generator.load(model, device=device)
    generator(crops[:batch_size])  # warm up (cuDNN autotune, allocator)
    start = time.perf_counter()
    for i in range(0, len(crops), batch_size):
        generator(crops[i : i + batch_size])
    return time.perf_counter() - start


def bench_run(
    slide_dir: Path, out: Path, model: Path, *, device: str, batch_size: int, workers: int | None, processes: int
) -> tuple[float, float, int]:
    """Whole-run seconds, and the seconds and cells between the first and the last finished chunk
    (steady state: without start-up, i.e. cluster start, model load and the first chunk's latency)."""
    from cellbatch.api import convert

    marks: list[tuple[float, int]] = []

    def on_progress(captures: int, cells: int, slides: int) -> None:
        if cells:
            marks.append((time.perf_counter(), cells))

    start = time.perf_counter()
    report = convert([slide_dir], out, model=model, device=device, batch_size=batch_size, workers=workers,
                     processes=processes, force=True, command=["bench_pipeline"], on_progress=on_progress)
    seconds = time.perf_counter() - start
    if report.exit_code != 0:
        raise SystemExit(f"the benchmark run failed: {report.to_dict()['failures'][:3]}")
    steady_cells = sum(c for _, c in marks[1:])
    return seconds, marks[-1][0] - marks[0][0], steady_cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captures", type=int, default=96)
    parser.add_argument("--base-filters", type=int, default=16, help="generator width (thesis: 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="threads for the CPU stage (default: all cores)")
    parser.add_argument("--processes", type=int, default=0, help="worker processes for the CPU stage instead")
    parser.add_argument("--devices", default=None, help="comma list; default cpu, plus cuda when present")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from cellbatch.export import export_generator, generator_metadata, untrained_generator
    from cellbatch.synth import write_synth

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_synth(tmp_path / "synth", count=args.captures, seed=0, looks=("dm1200",))
        slide_dir = tmp_path / "synth" / "dm1200"
        net = untrained_generator(base_filters=args.base_filters, seed=0)
        meta = generator_metadata(net, trained=False)
        model = export_generator(net, tmp_path / "model.pt", metadata=meta)["torchscript"]
        extract_s, crops, n_captures = bench_extract(slide_dir, workers=args.workers, processes=args.processes,
                                                     chunk=4)
        n_cells = len(crops)
        for device in devices:
            generate_s = bench_generator(model, crops, device=device, batch_size=args.batch_size)
            run_s, steady_s, steady_cells = bench_run(
                slide_dir, tmp_path / f"out-{device}", model, device=device, batch_size=args.batch_size,
                workers=args.workers, processes=args.processes,
            )
            steady = steady_cells / steady_s
            rates = {
                "extract": (n_captures / extract_s, n_cells / extract_s),
                "generate": (n_captures / generate_s, n_cells / generate_s),
                "run": (n_captures / run_s, n_cells / run_s),
                "steady": (steady * n_captures / n_cells, steady),
            }
            slowest = min(rates["extract"][1], rates["generate"][1])
            ratio = rates["run"][1] / slowest
            rows.append({"device": device, "captures": n_captures, "cells": n_cells,
                         "base_filters": args.base_filters, "batch_size": args.batch_size,
                         "captures_per_s": {k: round(v[0], 2) for k, v in rates.items()},
                         "cells_per_s": {k: round(v[1], 2) for k, v in rates.items()},
                         "ratio_run_over_slowest_stage": round(ratio, 3),
                         "ratio_steady_over_slowest_stage": round(rates["steady"][1] / slowest, 3)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'device':8} {'stage':22} {'captures/s':>11} {'cells/s':>9}")
    for row in rows:
        for stage, label in (("extract", "(a) read+detect+crop"), ("generate", "(b) generator alone"),
                             ("run", "(c) whole run"), ("steady", "(c) after start-up")):
            print(f"{row['device']:8} {label:22} {row['captures_per_s'][stage]:11.2f} {row['cells_per_s'][stage]:9.2f}")
        print(f"{row['device']:8} ratio (c)/min(a,b) = {row['ratio_run_over_slowest_stage']:.3f} whole run, "
              f"{row['ratio_steady_over_slowest_stage']:.3f} after start-up  "
              f"({row['captures']} captures, {row['cells']} cells, base_filters {row['base_filters']})")


if __name__ == "__main__":
    main()
