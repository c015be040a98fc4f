"""Small synthetic captures and a matching toy detector, for pipeline tests that must not depend on
the real detector's tuning."""

from __future__ import annotations

from pathlib import Path

import cv2
import imageio.v3 as iio
import numpy as np

from cellbatch.detect.base import BACKGROUND, CYTOPLASM, NUCLEUS, Cell, Detection, DetectSettings


def scene(rng: np.random.Generator, *, centres: list[tuple[int, int]], shape=(240, 320)) -> np.ndarray:
    """A pale capture with a purple 'cell' (light disc, dark nucleus) at each centre."""
    h, w = shape
    image = np.empty((h, w, 3), np.uint8)
    image[:] = (232, 226, 220)
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    for cx, cy in centres:
        cv2.circle(image, (cx, cy), 30, (200, 170, 210), -1)
        cv2.circle(image, (cx, cy), 14, (90, 40, 120), -1)
    return image


class DarkBlobDetector:
    """Toy detector: each dark blob is a nucleus, its cell a disc around it."""

    def __init__(self, settings: DetectSettings) -> None:
        self.settings = settings

    def __call__(self, image: np.ndarray) -> Detection:
        dark = (image.sum(axis=2) < 330).astype(np.uint8)
        n, comp, stats, centroids = cv2.connectedComponentsWithStats(dark)
        labels = np.full(image.shape[:2], BACKGROUND, np.uint8)
        labels[image.sum(axis=2) < 620] = CYTOPLASM
        labels[dark > 0] = NUCLEUS
        cells = []
        h, w = image.shape[:2]
        for i in range(1, n):
            if stats[i, cv2.CC_STAT_AREA] < 50:
                continue
            cx, cy = centroids[i]
            r = self.settings.cell_diameter / 2
            edge = cx < r or cy < r or cx > w - r or cy > h - r
            cells.append(Cell(cx=float(cx), cy=float(cy), area_px=int(np.pi * r * r),
                              nucleus_area_px=int(stats[i, cv2.CC_STAT_AREA]), edge=bool(edge)))
        return Detection(cells=tuple(sorted(cells, key=lambda c: (c.cy, c.cx))), labels=labels)


def write_slides(root: Path, *, slides: dict[str, int], seed: int = 0, suffix: str = ".png") -> list[Path]:
    """``slides`` maps a slide folder to its number of captures; each capture holds 1-2 cells."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, count in slides.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            centres = [(int(rng.integers(60, 260)), int(rng.integers(60, 180)))]
            if i % 3 == 2:
                centres.append((int(rng.integers(0, 40)), int(rng.integers(0, 40))))
            path = folder / f"capture_{i:03d}{suffix}"
            iio.imwrite(path, scene(rng, centres=centres))
            paths.append(path)
    return paths
