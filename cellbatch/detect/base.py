"""The detector interface (contract for plugins: documented in the README)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Classes of the segmentation label image (contract: ``mask`` in cells.zarr).
BACKGROUND, RED_CELL, CYTOPLASM, NUCLEUS = 0, 1, 2, 3


@dataclass(frozen=True)
class DetectSettings:
    """Settings every detector receives.

    ``cell_diameter`` is the expected white-cell diameter in pixels (about 110 px for DM captures at
    0.1 µm/px); every size threshold scales with it.
    """

    cell_diameter: float = 110.0


@dataclass(frozen=True)
class Cell:
    """One detected white cell, in capture pixel coordinates."""

    cx: float
    cy: float
    area_px: int
    nucleus_area_px: int
    edge: bool  # the cell touches the capture border


@dataclass(frozen=True)
class Detection:
    """What a detector returns for one capture.

    ``labels`` is a (H, W) uint8 class image of the whole capture (``BACKGROUND``, ``RED_CELL``,
    ``CYTOPLASM``, ``NUCLEUS``); crops of it become the per-cell ``mask``.
    """

    cells: tuple[Cell, ...]
    labels: np.ndarray


class Detector(Protocol):
    """``Detector(settings)(image) -> Detection`` for an (H, W, 3) uint8 RGB image."""

    def __init__(self, settings: DetectSettings) -> None: ...

    def __call__(self, image: np.ndarray) -> Detection: ...
