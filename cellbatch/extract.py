"""The CPU stage that runs as Dask tasks: read captures, detect white cells, crop them.

One task handles a chunk of captures of one slide and returns plain arrays and dicts, so it runs
the same in a local thread pool or on a remote Dask worker. A capture that cannot be read or
detected becomes a failure with its reason; the rest of the chunk goes on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellbatch.crop import background_colour, crop_window
from cellbatch.detect.base import DetectSettings
from cellbatch.errors import CellbatchError
from cellbatch.read import Slide, read_capture, read_frame


@dataclass(frozen=True)
class ExtractSettings:
    """Settings of the read-detect-crop stage (all part of a slide's content key)."""

    detector: str = "threshold"
    cell_diameter: float = 110.0
    crop_size: int = 256
    drop_edge: bool = False


@dataclass(frozen=True)
class CaptureRef:
    """Where one capture lives: a file (``frame`` 0) or a frame of a Zarr slide."""

    source: str  # path relative to the input root, or the Zarr path
    frame: int
    path: str  # absolute file path, or the Zarr store path


@dataclass
class CaptureResult:
    """The cells of one capture, or why it failed."""

    ref: CaptureRef
    rows: list[dict[str, Any]] = field(default_factory=list)
    crops: np.ndarray | None = None  # (k, S, S, 3) uint8
    masks: np.ndarray | None = None  # (k, S, S) uint8
    notes: list[str] = field(default_factory=list)
    error: str | None = None


@functools.lru_cache(maxsize=8)
def get_detector(name: str, cell_diameter: float) -> Any:
    """One detector per process and setting (Dask workers reuse it across tasks)."""
    from cellbatch.registry import detectors

    return detectors.get(name)(DetectSettings(cell_diameter=cell_diameter))


def load_capture(slide: Slide, ref: CaptureRef) -> tuple[np.ndarray, list[str]]:
    if slide.kind == "zarr":
        return read_frame(slide, ref.frame)
    capture = read_capture(ref.path)
    return capture.image, list(capture.notes)


def extract_capture(image: np.ndarray, ref: CaptureRef, settings: ExtractSettings) -> CaptureResult:
    """Detect and crop the cells of one decoded capture."""
    detection = get_detector(settings.detector, settings.cell_diameter)(image)
    fill = background_colour(image, detection.labels)
    cells = [c for c in detection.cells if not (settings.drop_edge and c.edge)]
    size = settings.crop_size
    crops = np.empty((len(cells), size, size, 3), np.uint8)
    masks = np.empty((len(cells), size, size), np.uint8)
    rows = []
    for i, cell in enumerate(cells):
        crops[i], (x0, y0, x1, y1) = crop_window(image, cell.cx, cell.cy, size=size, fill=fill)
        masks[i], _ = crop_window(detection.labels, cell.cx, cell.cy, size=size, fill=0)
        rows.append({
            "source": ref.source, "frame": ref.frame, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "cx": float(cell.cx), "cy": float(cell.cy), "area_px": int(cell.area_px),
            "nucleus_area_px": int(cell.nucleus_area_px), "edge": bool(cell.edge),
        })
    return CaptureResult(ref=ref, rows=rows, crops=crops, masks=masks)


def extract_chunk(slide: Slide, refs: list[CaptureRef], settings: ExtractSettings) -> list[CaptureResult]:
    """The Dask task: every capture of ``refs`` read, detected and cropped, failures kept with reasons."""
    import cv2

    # Dask already runs one task per core; OpenCV's own threads would only oversubscribe them.
    cv2.setNumThreads(1)
    results = []
    for ref in refs:
        try:
            image, notes = load_capture(slide, ref)
            result = extract_capture(image, ref, settings)
            result.notes = notes
        except CellbatchError as exc:
            result = CaptureResult(ref=ref, error=str(exc))
        except Exception as exc:  # a decoder's or detector plugin's bug must not stop the slide
            result = CaptureResult(ref=ref, error=f"{ref.source}: {type(exc).__name__}: {exc}")
        results.append(result)
    return results
