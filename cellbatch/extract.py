"""The CPU stage that runs as Dask tasks: read captures, detect white cells, crop them.

One task handles a chunk of captures of one slide and returns plain arrays and dicts, so it runs
the same in a local thread pool or on a remote Dask worker. A task carries only its capture
references and settings (never the slide's list of every capture), and hashes the very bytes it
decodes, so provenance names what was used even if a file changes during the run. A capture that
cannot be read or detected becomes a failure with its reason; the rest of the chunk goes on.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellbatch.crop import CROP_SIZE, background_colour, crop_window
from cellbatch.errors import CellbatchError
from cellbatch.read import (
    Capture,
    Slide,
    SlideFrames,
    decode_capture,
    display_path,
    read_capture_bytes,
    slide_frame_count,
)


@dataclass(frozen=True)
class ExtractSettings:
    """Settings of the read-detect-crop stage (all part of a slide's content key)."""

    detector: str = "threshold"
    cell_diameter: float = 110.0
    crop_size: int = CROP_SIZE
    drop_edge: bool = False


@dataclass(frozen=True)
class CaptureRef:
    """Where one capture lives: a file (``frame`` 0) or a frame of a Zarr slide."""

    source: str  # path relative to the input root, or the Zarr path
    frame: int
    path: str  # absolute file path, or the Zarr store path
    array_path: str | None = None  # the array inside the Zarr store; None for a capture file
    axes: str = ""  # an OME-Zarr image's axis roles (see cellbatch.read.Slide); "" for (N, H, W, 3)


def capture_refs(slide: Slide) -> list[CaptureRef]:
    """One reference per capture of a (validated) slide, in order."""
    if slide.kind == "zarr":
        # a store that is one array names its frames after itself, not "."
        source, store = slide.array_path or Path(slide.store).name, str(slide.store)
        return [CaptureRef(source, f, store, slide.array_path, slide.axes) for f in range(slide_frame_count(slide))]
    return [CaptureRef(p.relative_to(slide.root).as_posix(), 0, str(p)) for p in slide.captures]


@dataclass
class CaptureResult:
    """The cells of one capture, or why it failed."""

    ref: CaptureRef
    rows: list[dict[str, Any]] = field(default_factory=list)
    crops: np.ndarray | None = None  # (k, S, S, 3) uint8
    masks: np.ndarray | None = None  # (k, S, S) uint8
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    sha256: str | None = None  # of the file bytes decoded (files) or of the decoded frame (Zarr)
    bytes: int | None = None


@functools.lru_cache(maxsize=8)
def get_detector(name: str, cell_diameter: float) -> Any:
    """One detector per process and setting (Dask workers reuse it across tasks)."""
    from cellbatch.registry import make_detector

    return make_detector(name, cell_diameter=cell_diameter)


@dataclass
class Loaded:
    """One capture as read: its hash and size always when its bytes could be read, the image when decoded."""

    ref: CaptureRef
    sha256: str | None = None
    bytes: int | None = None
    capture: Capture | None = None
    error: str | None = None


def load_captures(refs: list[CaptureRef], *, decode: bool = True) -> Iterator[Loaded]:
    """Read each capture once: hash the bytes that are decoded (or, for Zarr, the decoded frame).

    A Zarr array is opened once per run of refs into the same array. Failures come back as
    ``error`` with the reason; a capture file whose bytes were read but not decoded keeps its hash.
    """
    frames: SlideFrames | None = None
    frames_of: tuple[str, str] | None = None
    for ref in refs:
        loaded = Loaded(ref)
        try:
            if ref.array_path is None:
                data = read_capture_bytes(ref.path)
                loaded.sha256, loaded.bytes = hashlib.sha256(data).hexdigest(), len(data)
                if decode:
                    loaded.capture = decode_capture(data, where=display_path(ref.path))
            else:
                if frames is None or frames_of != (ref.path, ref.array_path):
                    frames, frames_of = SlideFrames(_zarr_slide(ref)), (ref.path, ref.array_path)
                capture = frames.read(ref.frame)
                loaded.sha256 = hashlib.sha256(capture.image.tobytes()).hexdigest()
                loaded.bytes = int(capture.image.nbytes)
                loaded.capture = capture
        except CellbatchError as exc:
            loaded.error = str(exc)
        except Exception as exc:  # a decoder's bug must not stop the slide
            loaded.error = f"{ref.source}: {type(exc).__name__}: {exc}"
        yield loaded


def _zarr_slide(ref: CaptureRef) -> Slide:
    store = Path(ref.path)
    return Slide(root=store, name=ref.source, kind="zarr", store=store, array_path=ref.array_path or "", axes=ref.axes)


def hash_captures(refs: list[CaptureRef]) -> list[dict[str, Any]]:
    """The Dask task that hashes captures without detecting (a rerun deciding whether to skip)."""
    entries = []
    for loaded in load_captures(refs, decode=False):
        entry: dict[str, Any] = {"path": loaded.ref.source, "frame": loaded.ref.frame, "source": loaded.ref.source}
        if loaded.sha256 is not None:
            entry.update(bytes=loaded.bytes, sha256=loaded.sha256)
        entries.append(entry)
    return entries


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


def extract_chunk(refs: list[CaptureRef], settings: ExtractSettings) -> list[CaptureResult]:
    """The Dask task: every capture of ``refs`` read, hashed, detected and cropped, failures kept with reasons."""
    import cv2

    # Dask already runs one task per core; OpenCV's own threads would only oversubscribe them.
    cv2.setNumThreads(1)
    results = []
    for loaded in load_captures(refs):
        ref = loaded.ref
        if loaded.capture is None:
            result = CaptureResult(ref=ref, error=loaded.error)
        else:
            try:
                result = extract_capture(loaded.capture.image, ref, settings)
                result.notes = list(loaded.capture.notes)
            except CellbatchError as exc:
                result = CaptureResult(ref=ref, error=str(exc))
            except Exception as exc:  # a detector plugin's bug must not stop the slide
                result = CaptureResult(ref=ref, error=f"{ref.source}: {type(exc).__name__}: {exc}")
        result.sha256, result.bytes = loaded.sha256, loaded.bytes
        results.append(result)
    return results
