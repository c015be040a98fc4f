"""Speed of white-cell detection + segmentation against JPEG decoding, per core.

Each capture is JPEG-encoded in memory once; then, per capture and repeat, the benchmark decodes it
(``cv2.imdecode`` + BGR->RGB, what any reader must at least do) and runs the detector on the fresh
image, timing each with the process CPU clock (so other load on a shared machine inflates neither
much). OpenCV and BLAS are limited to one thread: the figures are per core. Decoding is excluded
from the detection figure and printed beside it, with the ratio, because the ratio travels between
machines better than milliseconds do.

Captures: synthetic 640x480 DM-scale captures from :func:`cellbatch.synth.synth_capture`
(``--source synth``, the default) or the real BCCD JPEGs in ../shared/data (``--source bccd``; they
are more magnified, so use ``--cell-diameter 200``; the detector's cost depends on the number of
pixels at the working scale, so that run is cheaper than DM captures at 110).

``--pbc`` instead prints the PBC figures of the issue (../shared/data/pbc, 1,200 DM96 captures, one
centred cell each): per class, the share of captures with exactly one cell within 25 px of the image
centre (nucleated classes; by the cell's centroid and by its body, see ``cellbatch eval centred``) or
with no cell whose body reaches within 25 px of the centre (platelets). BCCD recall and precision come from
``cellbatch eval detect`` (see docs/detection.md).

Run from the repository root::

    python benchmarks/bench_detect.py
    python benchmarks/bench_detect.py --source bccd --cell-diameter 200 --json
    python benchmarks/bench_detect.py --pbc
"""

from __future__ import annotations

import os

# One core for the timings: set before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from cellbatch.detect.base import DetectSettings  # noqa: E402
from cellbatch.evaluate import evaluate_centred  # noqa: E402
from cellbatch.modelcard import cpu_name  # noqa: E402
from cellbatch.registry import detectors  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BUDGET_MS = 2.5  # detection + segmentation per 640x480 capture per core (the target)


def synth_captures(n: int, cell_diameter: float, seed: int) -> list[np.ndarray]:
    from cellbatch.synth import synth_capture

    rng = np.random.default_rng(seed)
    return [synth_capture(rng, cell_diameter=cell_diameter).dm1200 for _ in range(n)]


def bccd_captures(n: int) -> list[np.ndarray]:
    folder = DATA / "bccd" / "JPEGImages"
    if not folder.is_dir():
        raise SystemExit(f"BCCD images not found at {folder}: use --source synth")
    paths = sorted(folder.glob("*.jpg"))[:n]
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]


def measure(captures: list[np.ndarray], detector_name: str, cell_diameter: float, repeats: int) -> dict:
    detector = detectors.get(detector_name)(DetectSettings(cell_diameter=cell_diameter))
    encoded = [
        cv2.imencode(".jpg", cv2.cvtColor(c, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1] for c in captures
    ]
    detector(captures[0])  # first call pays for lazy imports and allocations
    decode_s: list[float] = []
    detect_s: list[float] = []
    cells = 0
    for _ in range(repeats):
        for buffer in encoded:
            t0 = time.process_time()
            image = cv2.cvtColor(cv2.imdecode(buffer, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            t1 = time.process_time()
            detection = detector(image)
            t2 = time.process_time()
            decode_s.append(t1 - t0)
            detect_s.append(t2 - t1)
            cells += len(detection.cells)
    detect_ms = 1000 * float(np.mean(detect_s))
    decode_ms = 1000 * float(np.mean(decode_s))
    return {
        "detector": detector_name,
        "cell_diameter": cell_diameter,
        "captures": len(captures),
        "shape": list(captures[0].shape[:2]),
        "repeats": repeats,
        "cells_per_capture": cells / (repeats * len(captures)),
        "detect_ms_mean": detect_ms,
        "detect_ms_median": 1000 * float(np.median(detect_s)),
        "detect_ms_p95": 1000 * float(np.percentile(detect_s, 95)),
        "decode_ms_mean": decode_ms,
        "detect_over_decode": detect_ms / decode_ms,
        "budget_ms": BUDGET_MS,
        "within_budget": detect_ms <= BUDGET_MS,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }


def pbc_rates(detector_name: str, cell_diameter: float, radius: float = 25.0) -> dict[str, dict[str, float]]:
    """Per PBC class: captures, and the share that meets the issue's criterion under both readings."""
    folder = DATA / "pbc"
    if not folder.is_dir():
        raise SystemExit(f"PBC images not found at {folder}")
    detector = detectors.get(detector_name)(DetectSettings(cell_diameter=cell_diameter))
    rates: dict[str, dict[str, float]] = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        captures = evaluate_centred(sorted(class_dir.glob("*.jpg")), detector)
        if class_dir.name == "platelet":
            no_central = _share(c.central(radius, "body") == 0 for c in captures)
            rates[class_dir.name] = {"captures": len(captures), "no_central_cell": no_central}
            continue
        rates[class_dir.name] = {
            "captures": len(captures),
            "centroid": _share(c.central(radius, "centroid") == 1 for c in captures),
            "body": _share(c.central(radius, "body") == 1 for c in captures),
        }
    return rates


def _share(outcomes: Iterable[bool]) -> float:
    values = list(outcomes)
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=("synth", "bccd"), default="synth")
    parser.add_argument("-n", type=int, default=40, help="number of captures")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cell-diameter", type=float, default=110.0)
    parser.add_argument("--detector", default="threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--pbc", action="store_true", help="print the PBC centre and platelet rates instead")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    if args.pbc:
        rates = pbc_rates(args.detector, args.cell_diameter)
        if args.json:
            print(json.dumps(rates, indent=2))
            return
        for name, r in rates.items():
            if "no_central_cell" in r:
                print(f"{name:13s} {r['captures']:4d} captures  no cell within 25 px (body) {r['no_central_cell']:.4f}")
            else:
                print(
                    f"{name:13s} {r['captures']:4d} captures  one cell within 25 px of the centre: "
                    f"centroid {r['centroid']:.4f}  body {r['body']:.4f}"
                )
        return
    if args.source == "synth":
        captures = synth_captures(args.n, args.cell_diameter, args.seed)
    else:
        captures = bccd_captures(args.n)
    result = measure(captures, args.detector, args.cell_diameter, args.repeats)
    result["source"] = args.source
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['source']}: {result['captures']} captures {result['shape'][1]}x{result['shape'][0]}, "
        f"cell diameter {result['cell_diameter']:g} px, {result['cells_per_capture']:.2f} cells/capture, "
        f"1 thread, process CPU time"
    )
    print(
        f"detect+segment {result['detect_ms_mean']:.2f} ms/capture (median {result['detect_ms_median']:.2f}, "
        f"p95 {result['detect_ms_p95']:.2f}); decode {result['decode_ms_mean']:.2f} ms; "
        f"ratio {result['detect_over_decode']:.2f}; budget {BUDGET_MS} ms: "
        f"{'met' if result['within_budget'] else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
