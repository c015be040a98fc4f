"""Training pairs from synthetic two-optics captures (:mod:`cellbatch.synth`).

A synthetic capture is rendered in the DM96 and the DM1200 look from one scene, so crops around each
known white-cell centre are aligned pixel to pixel without any matching: a clean stand-in for the
output of ``cellbatch pair`` when no real paired captures are at hand. Crops are padded past the
capture border with each look's background colour, as the pipeline pads them.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cellbatch.crop import CROP_SIZE, background_colour, crop_window
from cellbatch.errors import OutputError

COLUMNS = ("name", "source", "target", "source_cell", "target_cell", "source_cx", "source_cy", "x0", "y0")


def pairs_from_synth(
    out: str | Path,
    *,
    count: int,
    seed: int,
    size: int = CROP_SIZE,
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
    from cellbatch.synth import synth_capture

    rng = np.random.default_rng(seed)

    def scenes() -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, list[tuple[float, float]]]]:
        for i in range(count):
            capture = synth_capture(rng, cell_diameter=cell_diameter)
            centres = [(c.cx, c.cy) for c in capture.cells]
            yield f"capture_{i:05d}", capture.dm1200, capture.dm96, capture.labels, centres

    return _write_pairs(out, scenes(), prefix="synth", size=size)


def pairs_from_shifted_captures(
    src: str | Path,
    out: str | Path,
    *,
    seed: int,
    skip: int = 0,
    limit: int | None = None,
    half: str | None = None,
    size: int = CROP_SIZE,
    cell_diameter: float = 110.0,
) -> Path:
    """Write a pairs folder from real DM96 captures pushed through the synthetic DM1200 optics.

    Each capture below ``src`` is segmented by the ``threshold`` detector and shifted by
    :func:`cellbatch.synth.apply_optics` (stain-dependent, with sensor noise); each detected white
    cell gives one aligned pair (shifted -> original). Real cell texture with a known optics shift:
    a check that a generator trained on it undoes the shift on real cells. ``skip`` and ``limit``
    select, per folder (e.g. per PBC class), which captures are used, so held-out captures stay out;
    ``half`` (``even`` or ``odd``) first keeps every other capture of each folder in name order
    (:func:`cellbatch.evaluate.half_of_each_folder`), a split with every class on both sides.
    """
    from cellbatch.evaluate import half_of_each_folder
    from cellbatch.read import iter_image_files, read_image
    from cellbatch.registry import make_detector
    from cellbatch.synth import apply_optics

    rng = np.random.default_rng(seed)
    detector = make_detector("threshold", cell_diameter=cell_diameter)
    root = Path(src)

    def scenes() -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, list[tuple[float, float]]]]:
        by_folder: dict[Path, list[Path]] = {}
        paths = list(iter_image_files(root))
        for path in paths if half is None else half_of_each_folder(paths, half):
            by_folder.setdefault(path.parent, []).append(path)
        for paths in by_folder.values():
            for path in paths[skip : None if limit is None else skip + limit]:
                truth = read_image(path)
                detection = detector(truth)
                shifted = apply_optics(truth, detection.labels, optics="dm1200", rng=rng)
                name = path.relative_to(root).with_suffix("").as_posix().replace("/", "__")
                yield name, shifted, truth, detection.labels, [(c.cx, c.cy) for c in detection.cells]

    return _write_pairs(out, scenes(), prefix="shifted", size=size)


def _write_pairs(
    out: str | Path,
    scenes: Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, list[tuple[float, float]]]],
    *,
    prefix: str,
    size: int,
) -> Path:
    """Crop every (capture name, source image, target image, labels, cell centres) into ``out``."""
    import imageio.v3 as iio

    out = Path(out)
    if out.exists():
        raise OutputError(f"{out} exists already: pass a new folder for the pairs")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "source").mkdir(parents=True)
    (tmp / "target").mkdir()
    with open(tmp / "pairs.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for i, (capture_name, source, target, labels, centres) in enumerate(scenes):
            fill_src = background_colour(source, labels)
            fill_tgt = background_colour(target, labels)
            for j, (cx, cy) in enumerate(centres):
                name = f"{prefix}_{i:05d}_{j}"
                src, (x0, y0, _, _) = crop_window(source, cx, cy, size=size, fill=fill_src)
                tgt, _ = crop_window(target, cx, cy, size=size, fill=fill_tgt)
                iio.imwrite(tmp / "source" / f"{name}.png", src)
                iio.imwrite(tmp / "target" / f"{name}.png", tgt)
                writer.writerow([name, capture_name, capture_name, j, j, f"{cx:.2f}", f"{cy:.2f}", x0, y0])
    tmp.rename(out)
    return out
