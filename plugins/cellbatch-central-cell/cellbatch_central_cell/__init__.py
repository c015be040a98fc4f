"""A cellbatch detector plugin: the one white cell an analyser centred in a single-cell export.

CellaVision exports (and the PBC dataset) hold one cell per image, centred by the analyser, often with
a neighbour cut by the image edge. Converting such an export cell by cell wants that one cell, not its
neighbours. This plugin wraps any registered detector and keeps the cell whose body comes nearest the
image centre, if it comes within ``max_offset`` cell diameters; the labels are the wrapped detector's,
so a neighbour's pixels keep their classes in the crop's ``mask``.

Install with ``pip install plugins/cellbatch-central-cell``; then ``cellbatch run EXPORT --detector
central ...``. It shows the whole plugin contract in a few lines: a class built from ``DetectSettings``,
called on an (H, W, 3) uint8 RGB capture, returning a ``Detection``, picklable and stateless.
"""

from __future__ import annotations

import numpy as np

from cellbatch.detect.base import Detection, DetectSettings
from cellbatch.registry import detectors

#: The wrapped detector (any name in the cellbatch.detectors registry).
INNER = "threshold"
#: A body further than this many cell diameters from the centre is not the centred cell.
MAX_OFFSET = 0.5


class CentralCellDetector:
    """Keep only the detected cell nearest the image centre.

    Parameters
    ----------
    settings
        Passed to the wrapped detector; ``cell_diameter`` also scales ``MAX_OFFSET``.
    """

    def __init__(self, settings: DetectSettings) -> None:
        self.settings = settings
        self._inner = detectors.get(INNER)(settings)

    def __call__(self, image: np.ndarray) -> Detection:
        detection = self._inner(image)
        if not detection.cells:
            return detection
        cy, cx = image.shape[0] / 2.0, image.shape[1] / 2.0
        # Distance from the centre to the cell's body, a disc of the cell's area: a cell the analyser
        # left 30 px off centre still covers the centre, and wins over a neighbour whose middle is nearer.
        gaps = [np.hypot(c.cx - cx, c.cy - cy) - np.sqrt(c.area_px / np.pi) for c in detection.cells]
        best = int(np.argmin(gaps))
        if gaps[best] > MAX_OFFSET * self.settings.cell_diameter:
            return Detection(cells=(), labels=detection.labels)
        return Detection(cells=(detection.cells[best],), labels=detection.labels)
