"""A generator on real captures through an optics shift: mean CIEDE2000 ΔE to the true DM96 look.

Real DM96 captures (../shared/data/pbc) are segmented by the detector and pushed through the
synthetic stain-dependent DM1200 optics (:func:`cellbatch.synth.apply_optics`); the generator
must undo the shift. Prints ΔE (whole crop and white cell) of the shifted input and of the
generated crop against the original, per cell class and overall.

    python benchmarks/bench_generator_pbc.py --model examples/demo-model/demo-l1net.pt --per-class 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbc"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no PBC images at {args.data}: pass --data")

    from cellbatch.colour import mean_delta_e
    from cellbatch.crop import background_colour, crop_window
    from cellbatch.detect.base import CYTOPLASM, NUCLEUS, DetectSettings
    from cellbatch.detect.threshold import ThresholdDetector
    from cellbatch.generate import Generator
    from cellbatch.read import iter_image_files, read_image
    from cellbatch.synth import apply_optics

    rng = np.random.default_rng(args.seed)
    detector = ThresholdDetector(DetectSettings(cell_diameter=110.0))
    generator = Generator.load(args.model, device="cpu")
    rows = []
    for folder in sorted(p for p in args.data.iterdir() if p.is_dir() and p.name != "platelet"):
        files = sorted(iter_image_files(folder))[: args.per_class]
        for path in files:
            truth = read_image(path)
            detection = detector(truth)
            if not detection.cells:
                continue
            cell = detection.cells[0]
            shifted = apply_optics(truth, detection.labels, optics="dm1200", rng=rng)
            crops = []
            for image, fill_labels in ((truth, detection.labels), (shifted, detection.labels)):
                crops.append(crop_window(image, cell.cx, cell.cy, fill=background_colour(image, fill_labels))[0])
            mask, _ = crop_window(detection.labels, cell.cx, cell.cy, fill=0)
            generated = generator.generate(crops[1][None])[0]
            wbc = (mask == CYTOPLASM) | (mask == NUCLEUS)
            rows.append((folder.name,
                         mean_delta_e(crops[1], crops[0]), mean_delta_e(generated, crops[0]),
                         mean_delta_e(crops[1], crops[0], mask=wbc), mean_delta_e(generated, crops[0], mask=wbc)))
    print(f"{'class':14} {'n':>3} {'input dE':>9} {'gen dE':>7} {'input dE (cell)':>16} {'gen dE (cell)':>14}")
    for name in sorted({r[0] for r in rows}) + ["all"]:
        sel = np.array([r[1:] for r in rows if name in ("all", r[0])])
        print(f"{name:14} {len(sel):3d} {sel[:, 0].mean():9.2f} {sel[:, 1].mean():7.2f} "
              f"{sel[:, 2].mean():16.2f} {sel[:, 3].mean():14.2f}")


if __name__ == "__main__":
    main()
