"""Measure a detector against ground truth: white-cell boxes, or single-cell captures centred on their cell.

Boxes come from a CSV file (``filename,xmin,ymin,xmax,ymax``, one row per box, header optional) or a
Pascal VOC folder (one ``<image stem>.xml`` per image; only objects named like a white cell count).
A detection is a hit when its centroid falls inside a box that no other detection has claimed yet:
matching is one to one, so two detections in one box give one hit and one false detection.

Centred captures (a CellaVision export, the PBC dataset) hold one cell each, placed at the image centre
by the analyser; the figure is the share of captures with exactly one detected cell within a radius of
the centre, read two ways (see :class:`CentredCapture`).
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from cellbatch.detect.base import Detection
from cellbatch.errors import InputFormatError, InputNotFoundError

# Object names that mean "white cell" in VOC files (BCCD uses "WBC"); compared case-insensitively.
WHITE_CELL_NAMES = frozenset({"wbc", "white cell", "white_cell", "whitecell", "leukocyte", "leucocyte"})


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates, edges included."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float

    def contains(self, x: float, y: float) -> bool:
        return self.xmin <= x <= self.xmax and self.ymin <= y <= self.ymax


@dataclass(frozen=True)
class ImageMatch:
    """The outcome of matching one image's detections to its boxes."""

    name: str
    n_boxes: int
    n_detections: int
    missed: tuple[Box, ...]  # boxes no detection claimed
    false: tuple[tuple[float, float], ...]  # detection centroids outside every unclaimed box

    @property
    def hits(self) -> int:
        return self.n_boxes - len(self.missed)


@dataclass
class Score:
    """Recall and precision summed over images."""

    images: list[ImageMatch] = field(default_factory=list)

    def add(self, match: ImageMatch) -> None:
        self.images.append(match)

    @property
    def n_boxes(self) -> int:
        return sum(m.n_boxes for m in self.images)

    @property
    def n_detections(self) -> int:
        return sum(m.n_detections for m in self.images)

    @property
    def hits(self) -> int:
        return sum(m.hits for m in self.images)

    @property
    def recall(self) -> float:
        """Hits over boxes; 1.0 when there are no boxes at all."""
        return self.hits / self.n_boxes if self.n_boxes else 1.0

    @property
    def precision(self) -> float:
        """Hits over detections; 1.0 when nothing was detected."""
        return self.hits / self.n_detections if self.n_detections else 1.0

    def as_dict(self) -> dict[str, object]:
        return {
            "images": len(self.images),
            "boxes": self.n_boxes,
            "detections": self.n_detections,
            "hits": self.hits,
            "recall": self.recall,
            "precision": self.precision,
        }


def match_centroids(centroids: Sequence[tuple[float, float]], boxes: Sequence[Box], *, name: str = "") -> ImageMatch:
    """Match detection centroids to boxes one to one, maximising the number of hits.

    Parameters
    ----------
    centroids
        ``(x, y)`` per detection, in pixels.
    boxes
        The ground-truth boxes of the same image.
    name
        The image's name, carried into the result.

    Returns
    -------
    ImageMatch
        Boxes left unmatched (misses) and centroids left unmatched (false detections).

    Examples
    --------
    >>> m = match_centroids([(5, 5), (6, 6)], [Box(0, 0, 10, 10)])
    >>> m.hits, len(m.false)
    (1, 1)
    """
    inside = np.array([[b.contains(x, y) for b in boxes] for x, y in centroids], dtype=bool).reshape(
        len(centroids), len(boxes)
    )
    # An assignment on the inside/outside matrix maximises hits when boxes overlap and a centroid could
    # claim either; greedy order would depend on the detector's output order.
    rows, cols = linear_sum_assignment(-inside.astype(np.int64))
    pairs = [(r, c) for r, c in zip(rows, cols, strict=True) if inside[r, c]]
    hit_dets = {r for r, _ in pairs}
    hit_boxes = {c for _, c in pairs}
    return ImageMatch(
        name=name,
        n_boxes=len(boxes),
        n_detections=len(centroids),
        missed=tuple(b for j, b in enumerate(boxes) if j not in hit_boxes),
        false=tuple((float(x), float(y)) for i, (x, y) in enumerate(centroids) if i not in hit_dets),
    )


def load_boxes(path: str | Path) -> dict[str, list[Box]]:
    """Read white-cell boxes keyed by image file name (no folder).

    Parameters
    ----------
    path
        A CSV file ``filename,xmin,ymin,xmax,ymax`` or a folder of Pascal VOC ``.xml`` files.

    Returns
    -------
    dict
        Image file name -> its boxes. An image a VOC file describes without white cells maps to an empty
        list; images absent from the source are not keys (callers treat them as holding no white cell).
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"boxes {path} do not exist: pass a CSV file or a Pascal VOC folder")
    if path.is_dir():
        return _load_voc_folder(path)
    return _load_csv(path)


def _load_csv(path: Path) -> dict[str, list[Box]]:
    boxes: dict[str, list[Box]] = {}
    with path.open(newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and row[0].strip().lower() in {"filename", "file", "image", "name"}:
                continue
            if len(row) < 5:
                raise InputFormatError(
                    f"{path} line {lineno} has {len(row)} fields: write filename,xmin,ymin,xmax,ymax"
                )
            try:
                xmin, ymin, xmax, ymax = (float(v) for v in row[1:5])
            except ValueError as exc:
                raise InputFormatError(f"{path} line {lineno}: box coordinates must be numbers ({exc})") from exc
            boxes.setdefault(Path(row[0].strip()).name, []).append(Box(xmin, ymin, xmax, ymax))
    return boxes


def _load_voc_folder(folder: Path) -> dict[str, list[Box]]:
    files = sorted(folder.glob("*.xml"))
    if not files:
        raise InputFormatError(f"{folder} holds no .xml files: pass a Pascal VOC Annotations folder or a CSV")
    boxes: dict[str, list[Box]] = {}
    for xml in files:
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as exc:
            raise InputFormatError(f"{xml} is not valid Pascal VOC XML: {exc}") from exc
        name = (root.findtext("filename") or "").strip()
        key = Path(name).name if name else xml.stem
        found = boxes.setdefault(key, [])
        # Keyed by stem as well, so a VOC filename without or with another extension still matches.
        boxes.setdefault(xml.stem, found)
        for obj in root.iter("object"):
            if (obj.findtext("name") or "").strip().lower() not in WHITE_CELL_NAMES:
                continue
            bb = obj.find("bndbox")
            if bb is None:
                raise InputFormatError(f"{xml}: an object has no <bndbox>")
            try:
                found.append(Box(*(float(bb.findtext(t) or "") for t in ("xmin", "ymin", "xmax", "ymax"))))
            except ValueError as exc:
                raise InputFormatError(f"{xml}: box coordinates must be numbers ({exc})") from exc
    return boxes


def boxes_for(image: Path, boxes: dict[str, list[Box]]) -> list[Box]:
    """The boxes of one image file: looked up by file name, then by stem (VOC); none when absent."""
    return boxes.get(image.name, boxes.get(image.stem, []))


def evaluate_detector(
    images: Sequence[Path],
    boxes: dict[str, list[Box]],
    detector: Callable[[np.ndarray], Detection],
) -> Score:
    """Run ``detector`` on each image file and match its cells to that image's boxes.

    Parameters
    ----------
    images
        Capture files; each is looked up in ``boxes`` by file name (an image absent there holds no
        white cell, so all its detections are false).
    boxes
        From :func:`load_boxes`.
    detector
        Any :class:`~cellbatch.detect.Detector` instance.

    Returns
    -------
    Score
        One :class:`ImageMatch` per image, in the order given.
    """
    from cellbatch.read import read_image

    if boxes and not any(image.name in boxes or image.stem in boxes for image in images):
        raise InputFormatError(
            "no image file is named in the boxes: check that the boxes and the captures describe the same images"
        )
    score = Score()
    for image in images:
        detection = detector(read_image(image))
        centroids = [(cell.cx, cell.cy) for cell in detection.cells]
        score.add(match_centroids(centroids, boxes_for(image, boxes), name=image.name))
    return score


@dataclass(frozen=True)
class CentredCapture:
    """The cells found in one capture that should hold one cell at its centre.

    Two readings of "a cell within ``radius`` of the centre": its centroid is (``centroid``), or its
    body reaches there (``body``: the centroid distance less the radius of a disc of the cell's area).
    They differ where the analyser left the cell off-centre: a correctly outlined cell can have its
    centroid 25-40 px from the centre while covering it.
    """

    name: str
    group: str  # the capture's folder: the cell class in a dataset sorted by class
    centroid_px: tuple[float, ...]  # per cell: centroid distance from the image centre
    body_px: tuple[float, ...]  # per cell: distance from the image centre to the cell's equivalent disc

    def central(self, radius: float, reading: str = "centroid") -> int:
        """Number of cells within ``radius`` of the centre under ``reading`` (``centroid`` or ``body``)."""
        distances = self.centroid_px if reading == "centroid" else self.body_px
        return sum(d <= radius for d in distances)


def centred_capture(name: str, group: str, detection: Detection, shape: tuple[int, int]) -> CentredCapture:
    """Distances of each detected cell from the centre of a capture of ``shape`` (H, W)."""
    cy, cx = shape[0] / 2.0, shape[1] / 2.0
    centroid = tuple(float(np.hypot(c.cx - cx, c.cy - cy)) for c in detection.cells)
    body = tuple(d - float(np.sqrt(c.area_px / np.pi)) for d, c in zip(centroid, detection.cells, strict=True))
    return CentredCapture(name=name, group=group, centroid_px=centroid, body_px=body)


def half_of_each_folder(images: Sequence[Path], half: str) -> list[Path]:
    """Every other capture of each folder in name order: ``even`` the 0th, 2nd, ...; ``odd`` the 1st, 3rd, ...

    A deterministic split of each class into a tuning half and a held-out half.
    """
    by_folder: dict[Path, list[Path]] = {}
    for image in sorted(images):
        by_folder.setdefault(image.parent, []).append(image)
    start = {"even": 0, "odd": 1}[half]
    return [image for folder in sorted(by_folder) for image in by_folder[folder][start::2]]


def evaluate_centred(images: Sequence[Path], detector: Callable[[np.ndarray], Detection]) -> list[CentredCapture]:
    """Run ``detector`` on each single-cell capture; group each by its parent folder's name."""
    from cellbatch.read import read_image

    out = []
    for image in images:
        pixels = read_image(image)
        out.append(centred_capture(image.name, image.parent.name, detector(pixels), pixels.shape[:2]))
    return out
