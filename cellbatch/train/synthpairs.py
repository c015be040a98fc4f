"""Training pairs from synthetic two-optics captures (:mod:`cellbatch.synth`).

A synthetic capture is rendered in the DM96 and the DM1200 look from one scene, so crops around each
known white-cell centre are aligned pixel to pixel without any matching: a clean stand-in for the
output of ``cellbatch pair`` when no real paired captures are at hand. Crops are padded past the
capture border with each look's background colour, as the pipeline pads them.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np

from cellbatch.crop import background_colour, crop_window
from cellbatch.errors import OutputError

COLUMNS = ("name", "source", "target", "source_cell", "target_cell", "source_cx", "source_cy", "x0", "y0")


def pairs_from_synth(
    out: str | Path,
    *,
    count: int,
    seed: int,
    size: int = 256,
    cell_diameter: float = 110.0,
) -> Path:
    """Write a pairs folder from ``count`` synthetic captures (DM1200 look -> DM96 look).

    Parameters
    ----------
    out : str or Path
        Folder to create: ``source/<name>.png`` (DM1200 look), ``target/<name>.png`` (DM96 look),
        ``pairs.csv``. It must not exist yet.
    count : int
        Synthetic captures to render; each gives one pair per white cell (usually one).
    seed : int
        Seed of the scenes: the same seed gives the same bytes.
    size : int
        Side of the square crops.
    cell_diameter : float
        White-cell diameter in pixels, as in :func:`cellbatch.synth.synth_capture`.

    Returns
    -------
    Path
        ``out``.
    """
    import imageio.v3 as iio

    from cellbatch.synth import synth_capture

    out = Path(out)
    if out.exists():
        raise OutputError(f"{out} exists already: pass a new folder for the pairs")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "source").mkdir(parents=True)
    (tmp / "target").mkdir()
    rng = np.random.default_rng(seed)
    with open(tmp / "pairs.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for i in range(count):
            capture = synth_capture(rng, cell_diameter=cell_diameter)
            fill_src = background_colour(capture.dm1200, capture.labels)
            fill_tgt = background_colour(capture.dm96, capture.labels)
            for j, cell in enumerate(capture.cells):
                name = f"synth_{i:05d}_{j}"
                src, (x0, y0, _, _) = crop_window(capture.dm1200, cell.cx, cell.cy, size=size, fill=fill_src)
                tgt, _ = crop_window(capture.dm96, cell.cx, cell.cy, size=size, fill=fill_tgt)
                iio.imwrite(tmp / "source" / f"{name}.png", src)
                iio.imwrite(tmp / "target" / f"{name}.png", tgt)
                capture_name = f"capture_{i:05d}"
                writer.writerow(
                    [name, capture_name, capture_name, j, j, f"{cell.cx:.2f}", f"{cell.cy:.2f}", x0, y0]
                )
    tmp.rename(out)
    return out
