"""Reference cells for the agreement check: the same cell in a paired DM96 capture.

The reference tree mirrors the input tree: a cell from capture ``source`` (frame ``frame``) has its
reference in ``ROOT/source`` (frame ``frame``). The white cells of that capture are detected with the
same detector as the run, the one nearest the input cell's centre is taken and cropped 256x256 the
way the run crops (:func:`cellbatch.crop.crop_window`, padded with the capture's background colour).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from cellbatch.crop import CROP_SIZE
from cellbatch.detect.base import Cell, Detector
from cellbatch.errors import CellbatchError, InputNotFoundError
from cellbatch.read import Slide, discover_slides, is_image_file, is_zarr_store, read_frame, read_image

_Capture = tuple[np.ndarray, tuple[Cell, ...], np.ndarray]


class ReferenceSource:
    """Paired reference captures: a directory of capture files or a Zarr store.

    Parameters
    ----------
    root
        Folder or Zarr store laid out like the run's input root.
    detector
        Name in the ``cellbatch.detectors`` registry, or a detector instance.
    cell_diameter
        Expected white-cell diameter in pixels, passed to the detector.
    max_offset
        A detected reference cell further than this (pixels) from the input cell's centre is taken to
        be another cell, and the reference is missing. Default: one cell diameter.
    cache_size
        Decoded and detected captures kept, so the cells of one capture cost one decode.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        detector: str | Detector,
        cell_diameter: float,
        max_offset: float | None = None,
        cache_size: int = 8,
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise InputNotFoundError(
                f"reference {self.root} does not exist: pass the folder or Zarr store of paired DM96 captures"
            )
        if isinstance(detector, str):
            from cellbatch.registry import make_detector

            self.detector_name = detector
            self.detector: Detector = make_detector(detector, cell_diameter=cell_diameter)
        else:
            self.detector_name = type(detector).__name__
            self.detector = detector
        self.cell_diameter = float(cell_diameter)
        self.max_offset = float(cell_diameter if max_offset is None else max_offset)
        self.cache_size = cache_size
        # (slide, source, frame) -> (capture, its cells, its background colour), or None when unusable
        self._captures: OrderedDict[tuple[str | None, str, int], _Capture | None] = OrderedDict()
        self._zarr_slides: dict[tuple[str | None, str], Slide | None] = {}
        self._stores: dict[Path, list[Slide]] = {}

    def crops_for(self, rows: list[dict[str, Any]], *, slide: str | None = None) -> list[np.ndarray | None]:
        """The reference crop of each row, (256, 256, 3) uint8, or ``None`` when there is none.

        ``None`` means the reference capture is missing or unreadable, or no detected cell lies within
        ``max_offset`` of the row's ``(cx, cy)``. ``slide`` (the slide's name, ``<store>/<array>``
        for a Zarr slide) finds the store when the reference root is a folder of Zarr stores: a Zarr
        row's ``source`` is only the array path inside its store.
        """
        from cellbatch.crop import crop_window

        crops: list[np.ndarray | None] = []
        for row in rows:
            capture = self._capture(str(row["source"]), int(row.get("frame") or 0), slide)
            if capture is None:
                crops.append(None)
                continue
            image, cells, fill = capture
            cell = self._nearest(cells, float(row["cx"]), float(row["cy"]))
            if cell is None:
                crops.append(None)
                continue
            crop, _ = crop_window(image, cell.cx, cell.cy, size=CROP_SIZE, fill=fill)
            crops.append(crop)
        return crops

    def provenance(self) -> dict[str, Any]:
        return {
            "root": str(self.root.resolve()),
            "detector": self.detector_name,
            "cell_diameter": self.cell_diameter,
            "max_offset": self.max_offset,
        }

    def _nearest(self, cells: tuple[Cell, ...], cx: float, cy: float) -> Cell | None:
        best, best_d = None, self.max_offset
        for cell in cells:
            d = float(np.hypot(cell.cx - cx, cell.cy - cy))
            if d <= best_d:
                best, best_d = cell, d
        return best

    def _capture(self, source: str, frame: int, slide: str | None) -> _Capture | None:
        from cellbatch.crop import background_colour

        key = (slide, source, frame)
        if key in self._captures:
            self._captures.move_to_end(key)
            return self._captures[key]
        try:
            image = self._read(source, frame, slide)
        except CellbatchError:
            image = None
        if image is None:
            entry = None
        else:
            detection = self.detector(image)
            entry = (image, tuple(detection.cells), background_colour(image, detection.labels))
        self._captures[key] = entry
        while len(self._captures) > self.cache_size:
            self._captures.popitem(last=False)
        return entry

    def _read(self, source: str, frame: int, slide: str | None) -> np.ndarray | None:
        path = self.root / source
        if path.is_file() and is_image_file(path):
            return read_image(path)
        found = self._zarr_slide(source, slide)
        if found is None:
            return None
        try:  # the run's reader, with its checks: a reference is read like an input
            return read_frame(found, frame).image
        except IndexError:
            return None

    def _zarr_slide(self, source: str, slide: str | None) -> Slide | None:
        """The Zarr slide (array or OME-Zarr image) holding ``source``'s frames, or ``None``.

        ``source`` is the array path inside its store (the store's own name, or ``"."`` in outputs
        written before, for a store that is one array). The store is the reference root itself, or
        the folder the slide name gives below the root (the slide name minus the array path).
        """
        key = (slide, source)
        if key in self._zarr_slides:
            return self._zarr_slides[key]
        inner = "/".join(p for p in source.split("/") if p not in ("", "."))
        candidates: list[tuple[Path, str]] = []
        if is_zarr_store(self.root):
            candidates.append((self.root, inner))
        if slide:
            store = slide[: -len(inner) - 1] if inner and slide.endswith("/" + inner) else slide
            if store and is_zarr_store(self.root / store):
                candidates.append((self.root / store, inner))
        found = None
        for store, path in candidates:
            if store not in self._stores:
                self._stores[store] = [s for s in discover_slides(store) if s.kind == "zarr"]
            found = next((s for s in self._stores[store] if s.array_path.strip("/") == path), None)
            if found is None and path:  # a store that is one array is the slide whatever its source says
                found = next((s for s in self._stores[store] if not s.array_path.strip("/")), None)
            if found is not None:
                break
        self._zarr_slides[key] = found
        return found
