"""Throughput of ``cellbatch run`` against each of its stages, measured in one run, plus precision parity.

On synthetic DM1200-look captures it times

  (a) read + detect + crop alone (the Dask stage, same chunking and threads as a run);
  (b) each device stage alone on ready crops, at the chosen precision and batch size: the generator,
      HM, display and the classifier check (input and output classified), each as upload, stage,
      download; and all of them chained, which is what the run's consumer does per batch; each
      with the run's stage threads and as many batches in flight (two of one torch thread each on
      a 2-core CPU, docs/devices.md);
  (w) the slide writer alone on those cells (CSV rows, Zarr compression; beside the consumer in a
      run, so not part of the ratio below: a writer slower than the device would cap a GPU run);
  (c) the whole run (``cellbatch.api.convert`` with ``--model G --normalise hm:P --normalise display
      --classifier C``: also writing and provenance);

and prints captures/s, cells/s, ms per cell, the whole run's page faults and kernel CPU a cell and
its cores busy (in this process), and (c) / min(a, b chained): 1.0 means the run is as fast as its
slowest side, with the most that ratio could be with any overlap of the stages (the slowest side
over the run's CPU time a cell spread over every core: where both sides share the cores, as on a
CPU, no scheduling takes the ratio past it). It then runs (c) again at fp32 to print the end-to-end
ms per cell at both precisions, and the parity of the chosen precision against fp32 on the demo
model (``examples/demo-model/demo-l1net.pt``): mean absolute difference of generated crops (grey
levels) and agreement of a classifier's decisions (a small classifier trained here on the synthetic
cell types, so its decisions have realistic margins).

The generator is an untrained U-Net of ``--base-filters`` width (32: thesis size, about 16 M
parameters); speed does not depend on the weights. Run from the repository root::

    python benchmarks/bench_pipeline.py                        # this machine: CPU, thesis-size generator
    python benchmarks/bench_pipeline.py --device cuda --processes 14 --captures 960 --batch-size auto
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from cellbatch.threads import prepare_native_runtimes

# As the CLI does, before numpy loads OpenBLAS and torch its OpenMP: with numpy imported first, OpenBLAS
# kept a thread per core beside the run's own threads, and whole runs measured here took 20.4-21.5
# ms a cell against 15.3 with one OpenBLAS thread, as `cellbatch run` has it (round 7).
prepare_native_runtimes("run")

import numpy as np  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo-model" / "demo-l1net.pt"
STARTUP_CAPTURES = 4  # a run this small is all start-up: its time is what every run pays once


def machine(device: str) -> str:
    import torch

    from cellbatch.modelcard import cpu_name
    from cellbatch.precision import cpu_bf16_instructions
    from cellbatch.threads import thread_budget

    cores = len(os.sched_getaffinity(0))
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "no GPU used"
    bf16 = ", ".join(cpu_bf16_instructions()) or "none"
    budget = thread_budget(device=device)
    return (f"{cores} cores ({cpu_name()}, native bf16: {bf16}), {name}, torch {torch.__version__}, "
            f"{budget.stage_threads} stage thread(s) of {budget.torch} torch thread(s)")


def make_inputs(tmp: Path, captures: int, *, image_format: str = "jpeg") -> tuple[Path, Path]:
    """A slide of DM1200-look captures and an HM profile fitted on other synthetic captures.

    ``jpeg`` (quality 95) is what analysers export; ``png`` keeps the synthetic captures as written,
    whose sensor noise makes them expensive to decode (about 9 ms against 1-2 ms for the JPEG).
    """
    import cv2

    from cellbatch.normalise.hm import fit_hm
    from cellbatch.normalise.profile import write_profile
    from cellbatch.synth import synth_capture, write_synth

    write_synth(tmp / "synth", count=captures, seed=0, looks=("dm1200",))
    if image_format == "jpeg":
        for png in sorted((tmp / "synth" / "dm1200").glob("*.png")):
            image = cv2.imread(str(png), cv2.IMREAD_COLOR)
            cv2.imwrite(str(png.with_suffix(".jpg")), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            png.unlink()
    rng = np.random.default_rng(99)
    fit = [synth_capture(rng) for _ in range(6)]
    profile = write_profile(tmp / "hm.json", method="hm", fit={},
                            fields=fit_hm([(c.dm1200, c.labels) for c in fit], [(c.dm96, c.labels) for c in fit]))
    return tmp / "synth" / "dm1200", profile


def bench_extract(slide_dir: Path, *, workers: int | None, processes: int, chunk: int | None = None):
    """(a): seconds, crops, masks and capture count of read+detect+crop over the slide."""
    from cellbatch.api import dask_client
    from cellbatch.extract import ExtractSettings, capture_refs, extract_chunk
    from cellbatch.pipeline import RunSettings
    from cellbatch.read import discover_slides

    chunk = chunk or RunSettings().chunk_captures  # as a run splits a slide into tasks
    refs = capture_refs(discover_slides(slide_dir)[0])
    with dask_client(None, workers, processes=processes) as client:
        client.submit(extract_chunk, refs[:1], ExtractSettings(), pure=False).result()  # warm up
        start = time.perf_counter()
        futures = [client.submit(extract_chunk, refs[i : i + chunk], ExtractSettings(), pure=False)
                   for i in range(0, len(refs), chunk)]
        results = [r for f in futures for r in f.result()]
        seconds = time.perf_counter() - start
    kept = [r for r in results if r.crops is not None and len(r.crops)]
    return seconds, np.concatenate([r.crops for r in kept]), np.concatenate([r.masks for r in kept]), len(refs)


def load_stages(model: Path, profile: Path, classifier: Path, *, device: str, precision: str, batch_size: int):
    from cellbatch.api import load_stages as api_load_stages
    from cellbatch.extract import ExtractSettings
    from cellbatch.pipeline import RunSettings
    from cellbatch.threads import thread_budget

    budget = thread_budget(device=device)  # the stage threads and their torch threads, as a run has them
    settings = RunSettings(extract=ExtractSettings(), batch_size=batch_size, device=device, precision=precision,
                           normalise=(f"hm:{profile}", "display"), stage_threads=budget.stage_threads,
                           torch_threads=budget.torch)
    return api_load_stages(settings, model=model, model_sha256=None, classifier=classifier, classes=None,
                           reference=None, min_agreement=None, min_confidence=0.0, max_unsure=1.0)


def time_stages(stages: Any, crops: np.ndarray, masks: np.ndarray, batch_size: int) -> float:
    """Seconds to push every crop through ``stages`` (upload, stages, downloads), after one warm-up batch,
    with as many batches in flight as a run keeps (one per stage thread on a CPU)."""
    from collections import deque

    stages.process(crops[:batch_size], masks[:batch_size])
    start = time.perf_counter()
    in_flight: deque = deque()
    for i in range(0, len(crops), batch_size):
        in_flight.append(stages.submit(crops[i : i + batch_size], masks[i : i + batch_size]))
        while len(in_flight) > stages.in_flight:
            in_flight.popleft().arrays()
    while in_flight:
        in_flight.popleft().arrays()
    return time.perf_counter() - start


def bench_writer(stages: Any, crops: np.ndarray, masks: np.ndarray, batch_size: int, tmp: Path) -> float:
    """Seconds for a slide's writer to store every cell of ``crops`` with the run's arrays and columns.

    The arrays are those a run with ``stages`` writes (crop, mask, generated, normalised); their
    content comes from one pass of the stages, since compression time depends on it. The writer
    runs beside the consumer in a run; alone it shows whether it could keep up with a faster device.
    """
    from cellbatch.write import SlideWriter

    outputs = [stages.process(crops[i : i + batch_size], masks[i : i + batch_size])
               for i in range(0, len(crops), batch_size)]
    rows = [[{"source": "bench", "frame": 0} for _ in range(len(batch["crop"]))] for batch in outputs]
    (tmp / "writer").mkdir()
    writer = SlideWriter(tmp / "writer" / "slide", out_root=tmp / "writer", arrays=stages.arrays(crops.shape[1]),
                         columns=stages.columns())
    start = time.perf_counter()
    for batch_rows, batch in zip(rows, outputs, strict=True):
        writer.add(batch_rows, batch)
    writer.commit({"slide": "bench"})
    return time.perf_counter() - start


def bench_device_stages(full: Any, crops: np.ndarray, masks: np.ndarray, batch_size: int) -> dict[str, float]:
    """(b): seconds of each device stage alone, and of all chained."""
    from cellbatch.pipeline import Stages

    gen, (hm, disp), check = full.generator, full.normalisers, full.check
    threads = {"device": full.device, "threads": full.threads, "torch_threads": full.torch_threads}
    alone = {
        "generator": Stages(generator=gen, **threads),
        "hm": Stages(normalisers=[hm], **threads),
        "display": Stages(normalisers=[disp], **threads),
        "classifier": Stages(normalisers=[disp], check=check, **threads),
        "chained": full,
    }
    seconds = {name: time_stages(s, crops, masks, batch_size) for name, s in alone.items()}
    for stages in alone.values():
        stages.close()
    # the classifier's own share: the display stage it needs for an output differing from the input is cheap
    seconds["classifier"] = max(seconds["classifier"] - seconds["display"], 1e-9)
    return seconds


def first_captures(slide_dir: Path, tmp: Path, count: int) -> Path:
    """A slide of the first ``count`` captures of ``slide_dir`` (hard links), to time a run's start-up."""
    small = tmp / "start-up" / slide_dir.name
    small.mkdir(parents=True)
    for path in sorted(p for p in slide_dir.iterdir() if p.is_file())[:count]:
        os.link(path, small / path.name)
    return small


def bench_run(slide_dir: Path, out: Path, *, model: Path, profile: Path, classifier: Path, device: str,
              precision: str, batch_size: int | str, workers: int | None, processes: int) -> tuple[float, int, dict]:
    """(c): whole-run seconds, cells, and the run's summary, with this process's page faults, kernel
    CPU seconds and cores busy (its CPU time over the wall time) during the run under ``"usage"``
    (memory faulted in again batch after batch shows there: docs/devices.md, "Freed memory kept for
    reuse"; threads that wait for each other show as cores idle: "Stage threads")."""
    import resource

    from cellbatch.api import convert

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    report = convert([slide_dir], out, model=model, device=device, precision=precision, batch_size=batch_size,
                     normalise=[f"hm:{profile}", "display"], classifier=classifier, workers=workers,
                     processes=processes, force=True, command=["bench_pipeline"])
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    summary = report.to_dict()
    if report.exit_code != 0:
        raise SystemExit(f"the benchmark run failed: {summary['failures'][:3]}")
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary["usage"] = {"page_faults": after.ru_minflt - before.ru_minflt,
                        "kernel_cpu_s": after.ru_stime - before.ru_stime, "cores_busy": cpu_s / seconds}
    return seconds, summary["cells"], summary


def train_cell_classifier(tmp: Path, *, count: int = 160) -> Path:
    """A small classifier of the synthetic white-cell types, trained on DM96-look crops (about a minute)."""
    import imageio.v3 as iio

    from cellbatch.crop import crop_window
    from cellbatch.models.classifier import TrainSettings, export_classifier, image_folder, train_classifier
    from cellbatch.synth import WBC_TYPES, synth_capture

    rng = np.random.default_rng(5)
    root = tmp / "cell-types"
    for i in range(count):
        capture = synth_capture(rng, n_white=1, cell_types=[WBC_TYPES[i % len(WBC_TYPES)]])
        cell = capture.cells[0]
        (root / cell.cell_type).mkdir(parents=True, exist_ok=True)
        crop, _ = crop_window(capture.dm96, cell.cx, cell.cy, size=256, fill=np.array([230, 230, 230], np.uint8))
        iio.imwrite(root / cell.cell_type / f"{i}.png", crop)
    files, labels, classes = image_folder(root)
    result = train_classifier(files, labels, classes=classes,
                              settings=TrainSettings(epochs=6, batch_size=16, lr=3e-3, seed=0, width=8))
    return export_classifier(result.net, tmp / "cell-types.pt", classes=classes,
                             extra={"heldout_accuracy": result.heldout_accuracy})["torchscript"]


def parity(crops: np.ndarray, classifier: Path, *, precision: str, device: str) -> dict[str, float]:
    """Generated crops and classes at ``precision`` against fp32, on the demo model."""
    from cellbatch.check.agreement import AgreementCheck, CheckSettings, load_classifier
    from cellbatch.generate import Generator

    outputs, labels = {}, {}
    for p in ("fp32", precision):
        generator = Generator.load(DEMO, device=device, precision=p)
        outputs[p] = np.concatenate([generator.generate(crops[i : i + 16]) for i in range(0, len(crops), 16)])
        check = AgreementCheck(load_classifier(classifier, device=device), settings=CheckSettings(), device=device,
                               precision=p)
        labels[p] = check._classify(outputs[p])[0]
    diff = np.abs(outputs["fp32"].astype(np.int16) - outputs[precision].astype(np.int16))
    return {"cells": len(crops), "mean_abs_diff": float(diff.mean()), "max_abs_diff": int(diff.max()),
            "pixels_within_1": float((diff.max(axis=-1) <= 1).mean()),
            "classifier_agreement": float((labels["fp32"] == labels[precision]).mean())}


def target_lines(kind: str | None, rows: dict[str, float], result: dict[str, Any]) -> list[str]:
    """The targets of issue 11 for a CPU (2 cores) or GPU (H200, 14 worker processes) machine, checked."""
    if kind is None:
        return []
    if kind == "cpu":
        checks = [("(c) / min(a, b chained) >= 0.9", result["ratio_run_over_slowest"], 0.9, True),
                  ("(c) past start-up / min(a, b chained) >= 0.9", result["ratio_past_startup"], 0.9, True),
                  ("whole run ms per cell <= 25", 1000 * rows["(c) whole run"], 25.0, False),
                  ("whole run past start-up ms per cell <= 25", 1000 * rows["(c) whole run, past start-up"], 25.0,
                   False)]
    else:
        checks = [("generator alone crops/s >= 6000", 1 / rows["(b) generator"], 6000.0, True),
                  ("(c) / (a) >= 0.85", rows["(a) read+detect+crop"] / rows["(c) whole run"], 0.85, True)]
    return [f"target {name}: {value:.3g} {'met' if (value >= limit if above else value <= limit) else 'NOT met'}"
            for name, value, limit, above in checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captures", type=int, default=400, help="captures in the slide (start-up is timed apart)")
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg",
                        help="capture files: jpeg (what analysers export) or png (slow to decode: sensor noise)")
    parser.add_argument("--base-filters", type=int, default=32, help="generator width (32: thesis size, 16 M)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", default="16", help="crops per device call, or auto")
    parser.add_argument("--workers", type=int, default=None, help="threads for the CPU stage (default: all cores)")
    parser.add_argument("--processes", type=int, default=0, help="worker processes for the CPU stage instead")
    parser.add_argument("--no-fp32-run", action="store_true", help="skip the whole run at fp32")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check (trains a classifier)")
    parser.add_argument("--targets", choices=["cpu", "gpu"], default=None,
                        help="also print the issue's targets for this kind of machine and whether they hold")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from cellbatch.api import resolve_batch_size
    from cellbatch.export import export_generator, generator_metadata, untrained_generator
    from cellbatch.generate import resolve_device
    from cellbatch.models.classifier import ClassifierNet, export_classifier
    from cellbatch.precision import resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    result: dict[str, Any] = {"machine": machine(device), "device": device, "precision": precision}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        slide_dir, profile = make_inputs(tmp, args.captures, image_format=args.format)
        net = untrained_generator(base_filters=args.base_filters, seed=0)
        model = export_generator(net, tmp / "model.pt", metadata=generator_metadata(net, trained=False))["torchscript"]
        classifier = export_classifier(ClassifierNet(8).eval(), tmp / "clf.pt", classes=[f"c{i}" for i in range(8)],
                                       extra={})["torchscript"]
        extract_s, crops, masks, n_captures = bench_extract(slide_dir, workers=args.workers, processes=args.processes)
        n_cells = len(crops)
        stages = load_stages(model, profile, classifier, device=device, precision=precision, batch_size=16)
        batch_size = resolve_batch_size(args.batch_size, stages, crop_size=crops.shape[1])
        device_s = bench_device_stages(stages, crops, masks, batch_size)
        writer_s = bench_writer(stages, crops, masks, batch_size, tmp)
        stages.close()
        run_args = dict(model=model, profile=profile, classifier=classifier, device=device, batch_size=batch_size,
                        workers=args.workers, processes=args.processes)
        small = first_captures(slide_dir, tmp, STARTUP_CAPTURES)
        startup_s, startup_cells, _ = bench_run(small, tmp / "out-small", precision=precision, **run_args)
        run_s, run_cells, run_summary = bench_run(slide_dir, tmp / "out", precision=precision, **run_args)
        rows = {"(a) read+detect+crop": extract_s / n_cells}
        rows.update({f"(b) {name}": s / n_cells for name, s in device_s.items()})
        rows["(w) writer alone"] = writer_s / n_cells  # beside the consumer in a run: not in min(a, b)
        rows["(c) whole run"] = run_s / run_cells
        # start-up (imports, model self-test, cluster) is paid once per run, whatever its size
        rows["(c) whole run, past start-up"] = (run_s - startup_s) / (run_cells - startup_cells)
        if not args.no_fp32_run and precision != "fp32":
            fp32_s, fp32_cells, _ = bench_run(slide_dir, tmp / "out32", precision="fp32", **run_args)
            rows["(c) whole run at fp32"] = fp32_s / fp32_cells
            rows["(c) at fp32, past start-up"] = (fp32_s - startup_s) / (fp32_cells - startup_cells)
        slowest = max(rows["(a) read+detect+crop"], rows["(b) chained"])
        result.update({
            "captures": n_captures, "cells": n_cells, "base_filters": args.base_filters, "batch_size": batch_size,
            "image_format": args.format, "startup_seconds": startup_s,
            "whole_run_per_cell": {"page_faults": run_summary["usage"]["page_faults"] / run_cells,
                                   "kernel_cpu_ms": 1000 * run_summary["usage"]["kernel_cpu_s"] / run_cells},
            "whole_run_cores_busy": run_summary["usage"]["cores_busy"],
            "seconds_per_cell": rows, "ratio_run_over_slowest": slowest / rows["(c) whole run"],
            "ratio_past_startup": slowest / rows["(c) whole run, past start-up"],
        })
        # However well the stages overlap, a run cannot finish faster than its CPU time spread over
        # every core: that caps the ratio where both sides share the cores (docs/devices.md, round 8)
        cpu_per_cell = run_summary["usage"]["cores_busy"] * rows["(c) whole run"]
        result["whole_run_per_cell"]["cpu_ms"] = 1000 * cpu_per_cell
        result["ratio_bound_from_cpu"] = slowest / (cpu_per_cell / len(os.sched_getaffinity(0)))
        if not args.no_parity and precision != "fp32":
            result["parity"] = parity(crops, train_cell_classifier(tmp), precision=precision, device=device)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}")
    print(f"{n_captures} captures, {n_cells} cells; generator base_filters {args.base_filters}, "
          f"{device} at {precision}, batch {batch_size}")
    print(f"{'stage':28} {'cells/s':>9} {'ms/cell':>9} {'captures/s':>11}")
    for name, spc in rows.items():
        print(f"{name:30} {1 / spc:9.1f} {1000 * spc:9.2f} {n_captures / n_cells / spc:11.2f}")
    print(f"start-up (a run of {STARTUP_CAPTURES} captures): {result['startup_seconds']:.1f} s; "
          f"capture files: {args.format}")
    usage = result["whole_run_per_cell"]
    print(f"whole run, this process: {usage['page_faults']:.0f} page faults and {usage['kernel_cpu_ms']:.1f} ms "
          f"of kernel CPU a cell, {result['whole_run_cores_busy']:.2f} cores busy (CPU time over wall time)")
    print(f"ratio (c) / min(a, b chained) = {result['ratio_run_over_slowest']:.3f} whole run, "
          f"{result['ratio_past_startup']:.3f} past start-up; at most {result['ratio_bound_from_cpu']:.3f} "
          f"with any overlap: the run took {usage['cpu_ms']:.1f} ms of CPU a cell")
    for line in target_lines(args.targets, rows, result):
        print(line)
    if "parity" in result:
        p = result["parity"]
        print(f"parity {precision} vs fp32 on the demo model ({p['cells']} cells): mean |diff| "
              f"{p['mean_abs_diff']:.3f} grey levels (max {p['max_abs_diff']}, {100 * p['pixels_within_1']:.2f} % of "
              f"pixels within 1), classifier agreement {100 * p['classifier_agreement']:.2f} %")


if __name__ == "__main__":
    main()
