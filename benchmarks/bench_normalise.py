"""Accuracy and speed of the colour normalisers on a known two-optics shift.

Each data set gives pixel-aligned pairs of the same cell in the DM96 look (the truth) and the DM1200
look (the same scene through :func:`cellbatch.synth.apply_optics`, a stain-dependent shift):

* ``synth``: synthetic captures from :func:`cellbatch.synth.synth_capture`;
* ``pbc``: real DM96 images from ../shared/data/pbc, segmented by the detector and shifted by
  ``apply_optics`` (the shift follows the detector's labels, with sensor noise).

Profiles are fitted on two disjoint, unpaired sets (source: DM1200 look, target: DM96 look) and
segmented by the detector, as ``cellbatch normalise fit`` does. Each test capture is segmented by
the detector on its DM1200 look (what the pipeline has), cropped 256x256 around the cell, normalised,
and compared with the DM96 crop: mean CIEDE2000 ΔE over the crop, and per class (true labels).
``hm, true labels`` is HM fitted and applied with the true labels (for pbc: the labels that drove
the shift), to show what segmentation errors cost. ``white cell`` is cytoplasm and nucleus together.
Speed is the CPU time per 256x256 crop with OpenCV and BLAS limited to one thread, i.e. the time
one core spends (process CPU time, so other load on a shared machine does not inflate it).

Run from the repository root::

    python benchmarks/bench_normalise.py                 # synth and pbc, defaults below
    python benchmarks/bench_normalise.py --sets synth --fit 16 --test 24
"""

from __future__ import annotations

import os

# One core for the timings: set before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from cellbatch.colour import delta_e_map  # noqa: E402
from cellbatch.detect.base import CYTOPLASM, DetectSettings  # noqa: E402
from cellbatch.normalise.fit import fit_profile  # noqa: E402
from cellbatch.normalise.hm import fit_hm  # noqa: E402
from cellbatch.normalise.profile import write_profile  # noqa: E402
from cellbatch.registry import detectors, normalisers  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WHITE_CELL_CLASSES = ("basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil")
METHODS = ("none", "global", "reinhard", "macenko", "hm")
CLASS_NAMES = ("background", "red cell", "cytoplasm", "nucleus", "white cell")
TIMING_REPEATS = 3
SIZE = 256


@dataclass(frozen=True)
class Pair:
    """One test cell: 256x256 crops of both looks, detector masks (on DM1200) and true labels."""

    dm1200: np.ndarray
    dm96: np.ndarray
    masks: np.ndarray
    truth: np.ndarray


def crop(image: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """256x256 window around (cx, cy), shifted to lie inside the image (no padding to distort ΔE)."""
    h, w = image.shape[:2]
    x0 = int(np.clip(round(cx) - SIZE // 2, 0, w - SIZE))
    y0 = int(np.clip(round(cy) - SIZE // 2, 0, h - SIZE))
    return image[y0 : y0 + SIZE, x0 : x0 + SIZE]


def make_pair(dm1200: np.ndarray, dm96: np.ndarray, truth: np.ndarray, detect) -> Pair:
    det = detect(dm1200)
    h, w = dm1200.shape[:2]
    cx, cy = (det.cells[0].cx, det.cells[0].cy) if det.cells else (w / 2, h / 2)
    return Pair(*(crop(a, cx, cy) for a in (dm1200, dm96, det.labels, truth)))


def synth_sets(n_fit: int, n_test: int, seed: int, detect):
    from cellbatch.synth import synth_capture

    def cap(stream: int, i: int, **kw):
        return synth_capture(np.random.default_rng([seed, stream, i]), **kw)

    source = [(c.dm1200, c.labels) for c in (cap(0, i) for i in range(n_fit))]
    target = [(c.dm96, c.labels) for c in (cap(1, i) for i in range(n_fit))]
    tests = []
    for i in range(n_test):
        c = cap(2, i, n_white=1)
        tests.append(make_pair(c.dm1200, c.dm96, c.labels, detect))
    return source, target, tests


def pbc_sets(n_fit: int, n_test: int, seed: int, detect):
    from cellbatch.read import read_image
    from cellbatch.synth import apply_optics

    files = sorted(p for c in WHITE_CELL_CLASSES for p in (DATA / "pbc" / c).glob("*.jpg"))
    rng = np.random.default_rng(seed)
    files = [files[i] for i in rng.permutation(len(files))[: 2 * n_fit + n_test]]
    looks = []
    for path in files:
        dm96 = read_image(path)
        labels = detect(dm96).labels
        looks.append((apply_optics(dm96, labels, optics="dm1200", rng=rng), dm96, labels))
    source = [(dm1200, labels) for dm1200, _, labels in looks[:n_fit]]
    target = [(dm96, labels) for _, dm96, labels in looks[n_fit : 2 * n_fit]]
    tests = [make_pair(*look, detect) for look in looks[2 * n_fit :]]
    return source, target, tests


def build(method: str, source, target, detect, folder: Path, *, true_labels: bool = False):
    """Fit ``method`` on (image, true labels) lists; segment with ``detect`` unless ``true_labels``."""
    if method == "none":
        return normalisers.get("none")(None)
    if true_labels:
        fields = fit_hm(source, target)
    else:
        images_s, images_t = [im for im, _ in source], [im for im, _ in target]
        fields, _ = fit_profile(
            method, source=images_s, target=images_t, segment=lambda im: detect(im).labels
        )
    path = write_profile(folder / f"{method}.json", method=method, fields=fields, fit={"benchmark": True})
    return normalisers.get(method)(str(path))


def evaluate(name: str, norm, tests: list[Pair], *, true_masks: bool = False) -> dict:
    crops = np.stack([t.dm1200 for t in tests])
    masks = np.stack([t.truth if true_masks else t.masks for t in tests])
    norm(crops[:1], masks[:1])  # warm-up: first-call allocations are not the steady state
    times = []
    for _ in range(TIMING_REPEATS):
        t0 = time.process_time()
        out = norm(crops, masks)
        times.append((time.process_time() - t0) / len(tests) * 1000)
    de = np.stack([delta_e_map(o, t.dm96) for o, t in zip(out, tests, strict=True)])
    truth = np.stack([t.truth for t in tests])
    regions = [truth == k for k in range(4)] + [truth >= CYTOPLASM]
    per_class = [float(de[r].mean()) if r.any() else float("nan") for r in regions]
    # CPU time of this (single-threaded) process, the least of a few runs: on a shared machine other
    # processes stretch wall time, and cache misses they cause only ever add
    return {"name": name, "mean": float(de.mean()), "per_class": per_class, "ms": min(times)}


def table(title: str, rows: list[dict]) -> str:
    head = "| method | mean ΔE00 | " + " | ".join(CLASS_NAMES) + " | CPU ms / 256² crop |"
    lines = [f"### {title}", "", head, "|" + "---|" * (len(CLASS_NAMES) + 3)]
    for r in rows:
        cls = " | ".join(f"{v:.2f}" for v in r["per_class"])
        lines.append(f"| {r['name']} | {r['mean']:.2f} | {cls} | {r['ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=["synth", "pbc"], default=["synth", "pbc"])
    parser.add_argument(
        "--fit", type=int, default=40, help="captures in each of the source and target fit sets"
    )
    parser.add_argument("--test", type=int, default=24, help="test cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detector", default="threshold")
    parser.add_argument("--cell-diameter", type=float, default=110.0)
    args = parser.parse_args()

    cv2.setNumThreads(1)
    detect = detectors.get(args.detector)(DetectSettings(cell_diameter=args.cell_diameter))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; timings on 1 thread"
    )
    for which in args.sets:
        if which == "pbc" and not (DATA / "pbc").is_dir():
            print(f"\n(pbc skipped: {DATA / 'pbc'} not found)")
            continue
        t0 = time.perf_counter()
        make = synth_sets if which == "synth" else pbc_sets
        source, target, tests = make(args.fit, args.test, args.seed, detect)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for method in METHODS:
                norm = build(method, source, target, detect, Path(tmp))
                rows.append(evaluate(method, norm, tests))
            oracle = build("hm", source, target, detect, Path(tmp), true_labels=True)
            rows.append(evaluate("hm, true labels", oracle, tests, true_masks=True))
        title = (
            f"{which}: {args.fit} + {args.fit} unpaired fit captures, {len(tests)} test cells, "
            f"detector {args.detector}, seed {args.seed} ({time.perf_counter() - t0:.0f} s)"
        )
        print("\n" + table(title, rows))


if __name__ == "__main__":
    main()
