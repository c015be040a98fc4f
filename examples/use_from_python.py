"""Use cellbatch from Python: convert a folder, then read the results back.

    python examples/use_from_python.py CAPTURES_DIR OUT_DIR [MODEL.pt]
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import zarr

from cellbatch.api import convert


def main(captures: Path, out: Path, model: Path | None) -> int:
    report = convert([captures], out, model=model, normalise=["display"], device="auto")
    for slide in report.slides:
        print(f"{slide.name}: {slide.status}, {slide.cells} cells, {slide.failed_captures} failed captures")
        if slide.status not in ("done", "qc_failed"):
            continue
        folder = Path(slide.output)
        rows = list(csv.DictReader(open(folder / "cells.csv")))
        cells = zarr.open_group(str(folder / "cells.zarr"), mode="r")
        last = "normalised" if "normalised" in cells else "generated" if "generated" in cells else "crop"
        for row in rows[:3]:
            image = cells[last][int(row["cell_id"])]  # (256, 256, 3) uint8 RGB
            print(f"  cell {row['cell_id']} from {row['source']} at ({row['cx']}, {row['cy']}): {last} {image.shape}")
    return report.exit_code


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    sys.exit(main(Path(args[0]), Path(args[1]), Path(args[2]) if len(args) > 2 else None))
