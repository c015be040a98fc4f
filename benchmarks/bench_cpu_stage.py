"""The CPU stage and the consumer, measured in one run: where a capture's time goes, how it scales.

On synthetic 640x480 DM1200-look captures (``cellbatch.synth``) it prints

1. the per-capture cost split on one core: read (the file's bytes), hash (sha256 of them), decode,
   detect, crop (pad colour + crop windows), masks (label windows), transfer (pickling a capture's
   result to the consumer and back, what a worker process pays; local threads pay nothing);
2. the CPU stage's captures/s with 1 and 2 Dask workers, as threads and as processes, with each
   cluster's start-up time and what a 1,000-capture run would take end to end;
3. the consumer's own cost per cell: everything the main process does besides the model (collecting
   results, batching, handing rows and arrays to the writer, whose CSV and Zarr compression run in
   its own thread), and the cells/s one process could feed at that cost;
4. ``cellbatch run`` (no model) by default against ``OMP_NUM_THREADS=1``, as subprocesses.

    python benchmarks/bench_cpu_stage.py --captures 200 [--skip-run]

Timings on a shared machine are noisy: the load average is printed with the figures, and ratios
measured in one run are the figures to compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_captures(root: Path, count: int, pool: int) -> Path:
    """``count`` captures in one slide folder, hard links to ``pool`` distinct synthetic ones."""
    from cellbatch.synth import write_synth

    write_synth(root / "pool", count=pool, seed=0, looks=("dm1200",))
    sources = sorted((root / "pool" / "dm1200").glob("*.png"))
    slide = root / "slides" / "slide"
    slide.mkdir(parents=True)
    for i in range(count):
        os.link(sources[i % len(sources)], slide / f"capture_{i:05d}.png")
    return root / "slides"


def cost_split(paths: list[Path], *, repeats: int) -> dict[str, float]:
    """Milliseconds per capture for each step, one thread, best of ``repeats`` passes."""
    import cv2

    from cellbatch.crop import background_colour, crop_window
    from cellbatch.extract import CaptureRef, ExtractSettings, extract_capture, get_detector
    from cellbatch.read import decode_capture, read_capture_bytes

    cv2.setNumThreads(1)
    settings = ExtractSettings()
    detector = get_detector(settings.detector, settings.cell_diameter)
    steps = ("read", "hash", "decode", "detect", "crop", "masks", "transfer")
    best = {step: float("inf") for step in steps}
    cells = 0
    for _ in range(repeats):
        spent = dict.fromkeys(steps, 0.0)
        cells = 0
        for path in paths:
            t0 = time.perf_counter()
            data = read_capture_bytes(path)
            t1 = time.perf_counter()
            hashlib.sha256(data).hexdigest()
            t2 = time.perf_counter()
            image = decode_capture(data).image
            t3 = time.perf_counter()
            detection = detector(image)
            t4 = time.perf_counter()
            fill = background_colour(image, detection.labels)
            for cell in detection.cells:
                crop_window(image, cell.cx, cell.cy, fill=fill)
            t5 = time.perf_counter()
            for cell in detection.cells:
                crop_window(detection.labels, cell.cx, cell.cy, fill=0)
            t6 = time.perf_counter()
            result = extract_capture(image, CaptureRef(path.name, 0, str(path)), settings)
            t7 = time.perf_counter()
            pickle.loads(pickle.dumps(result, protocol=5))
            t8 = time.perf_counter()
            cells += len(detection.cells)
            for step, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t8 - t7),
                                     strict=True):
                spent[step] += seconds
        for step in steps:
            best[step] = min(best[step], spent[step] / len(paths) * 1000)
    best["detect+crop+masks"] = best["detect"] + best["crop"] + best["masks"]
    best["cells_per_capture"] = cells / len(paths)
    return {k: round(v, 3) for k, v in best.items()}


def stage_throughput(refs: list, *, workers: int, processes: bool, chunk: int) -> dict[str, float]:
    """Captures/s of the extraction tasks on a fresh local cluster (start-up timed apart)."""
    from cellbatch.api import dask_client
    from cellbatch.extract import ExtractSettings, extract_chunk

    started = time.perf_counter()
    with dask_client(None, None if processes else workers, processes=workers if processes else 0) as client:
        client.submit(extract_chunk, refs[:1], ExtractSettings(), pure=False).result()  # imports, detector
        ready = time.perf_counter()
        futures = [client.submit(extract_chunk, refs[i : i + chunk], ExtractSettings(), pure=False)
                   for i in range(0, len(refs), chunk)]
        done = sum(len(f.result()) for f in futures)
        seconds = time.perf_counter() - ready
    return {"captures_per_s": round(done / seconds, 1), "startup_s": round(ready - started, 2)}


def consumer_cost(refs: list, out: Path, *, repeats: int = 3) -> dict[str, float]:
    """Main-thread CPU time besides the model: per cell (extraction results to the writer) and per slide.

    Per cell is what grows with the run: collecting results, batching, the (empty) device stages and
    handing rows and arrays to the writer. Per slide is paid once for each slide whatever its size:
    opening its writer and the commit (provenance, fsync, renames). The writer's own thread (CSV rows,
    Zarr compression) is reported apart: it runs beside the consumer.
    """
    from cellbatch.extract import ExtractSettings, extract_chunk
    from cellbatch.pipeline import RunSettings, SlidePlan, SlideRun, Stages
    from cellbatch.read import discover_slides

    results = extract_chunk(refs, ExtractSettings())
    cells = sum(len(r.rows) for r in results)
    slide = discover_slides(Path(refs[0].path).parent)[0]
    best_cell = best_slide = best_writer = float("inf")
    for i in range(repeats):
        plan = SlidePlan(slide=slide, name=f"consumer{i}", out_dir=out / f"consumer{i}", refs=refs,
                         inputs=[{"path": r.source, "frame": r.frame, "source": r.source} for r in refs],
                         key_settings={"parameters": {}, "model_sha256": None, "classifier_sha256": None,
                                       "normalisers": []})
        fresh = [pickle.loads(pickle.dumps(r)) for r in results]  # the writer numbers the rows in place
        t0, all0 = time.thread_time(), time.process_time()
        run = SlideRun(plan, Stages(), RunSettings(), out)
        t1 = time.thread_time()
        for k in range(0, len(fresh), 4):
            run.add(fresh[k : k + 4])
        t2 = time.thread_time()
        run.commit({"slide": plan.name})
        t3 = time.thread_time()
        best_cell = min(best_cell, t2 - t1)
        best_slide = min(best_slide, (t1 - t0) + (t3 - t2))
        best_writer = min(best_writer, time.process_time() - all0 - (t3 - t0))
    per_cell = best_cell / cells * 1e6
    return {"cells": cells, "main_thread_us_per_cell": round(per_cell, 1),
            "main_thread_ms_per_slide": round(best_slide * 1e3, 1),
            "cells_per_s_one_process": round(1e6 / per_cell),
            "writer_thread_us_per_cell": round(best_writer / cells * 1e6, 1)}


def default_vs_one_omp_thread(src: Path, out: Path, model: Path | None) -> dict[str, float]:
    """Seconds of ``cellbatch run`` with the default thread budget and with OMP_NUM_THREADS=1 (the
    hand-made fix the thread budget replaces), the generator ``model`` on the CPU; best of two runs
    each, in the order default, OMP, OMP, default, so a load that drifts favours neither."""
    seconds: dict[str, float] = {}
    for label in ("default", "OMP_NUM_THREADS=1", "OMP_NUM_THREADS=1", "default"):
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")}
        if label != "default":
            env["OMP_NUM_THREADS"] = "1"
        model_args = ["--model", str(model)] if model else []
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cellbatch", "run", str(src), "-o", str(out / label), "--quiet",
                        "--device", "cpu", "--force", *model_args], env=env, check=True)
        seconds[label] = round(min(seconds.get(label, float("inf")), time.perf_counter() - start), 2)
    seconds["default_over_omp1"] = round(seconds["OMP_NUM_THREADS=1"] / seconds["default"], 3)
    return seconds


def stage_figures(refs: list, *, pool: int, chunk: int, tmp: Path) -> dict:
    """Sections 1-3 of the module docstring, each printed on stderr as soon as it is measured."""
    figures: dict = {"ms_per_capture_one_core": cost_split([Path(r.path) for r in refs[:pool]], repeats=3)}
    print(json.dumps(figures), file=sys.stderr, flush=True)
    scaling = {}
    for kind in ("threads", "processes"):
        for workers in (1, 2):
            scaling[f"{kind}_{workers}"] = stage_throughput(refs, workers=workers, processes=kind == "processes",
                                                             chunk=chunk)
        one, two = scaling[f"{kind}_1"], scaling[f"{kind}_2"]
        scaling[f"{kind}_2_over_1"] = round(two["captures_per_s"] / one["captures_per_s"], 2)
        scaling[f"{kind}_2_seconds_for_1000_captures"] = round(two["startup_s"] + 1000 / two["captures_per_s"], 1)
    figures["cpu_stage"] = scaling
    print(json.dumps({"cpu_stage": scaling}), file=sys.stderr, flush=True)
    figures["consumer"] = consumer_cost(refs[: min(len(refs), 64)], tmp / "consumer")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captures", type=int, default=200)
    parser.add_argument("--pool", type=int, default=32, help="distinct synthetic captures to hard-link")
    parser.add_argument("--chunk", type=int, help="captures per task (default: as a run)")
    parser.add_argument("--skip-run", action="store_true", help="leave out the `cellbatch run` comparison")
    parser.add_argument("--only-run", action="store_true", help="only the `cellbatch run` comparison")
    parser.add_argument("--model", type=Path, default=Path(__file__).parents[1] / "examples/demo-model/demo-l1net.pt",
                        help="generator for the `cellbatch run` comparison ('' for none)")
    args = parser.parse_args()
    if args.chunk is None:
        from cellbatch.pipeline import RunSettings

        args.chunk = RunSettings().chunk_captures

    from cellbatch.extract import capture_refs
    from cellbatch.modelcard import cpu_name
    from cellbatch.read import discover_slides

    report: dict = {"machine": f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores, no GPU used",
                    "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        src = build_captures(Path(tmp), args.captures, args.pool)
        refs = capture_refs(discover_slides(src)[0])
        if not args.only_run:
            report.update(stage_figures(refs, pool=args.pool, chunk=args.chunk, tmp=Path(tmp)))
        if not args.skip_run:
            model = args.model if str(args.model) else None
            report["run_default_vs_omp1"] = {"model": str(model), **default_vs_one_omp_thread(src, Path(tmp) / "runs",
                                                                                              model)}
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
