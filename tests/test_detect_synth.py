"""The threshold detector on :mod:`cellbatch.synth` captures, whose true cells and labels are known."""

from __future__ import annotations

import numpy as np
import pytest

from cellbatch.detect.base import BACKGROUND, CYTOPLASM, NUCLEUS, RED_CELL, DetectSettings
from cellbatch.detect.threshold import ThresholdDetector

synth = pytest.importorskip("cellbatch.synth")

N_CAPTURES = 16


@pytest.fixture(scope="module")
def captures() -> list:
    rng = np.random.default_rng(2026)
    return [synth.synth_capture(rng) for _ in range(N_CAPTURES)]


@pytest.mark.parametrize("look", ["dm1200", "dm96"])
def test_every_synthetic_white_cell_is_found_once(captures: list, look: str) -> None:
    detector = ThresholdDetector(DetectSettings(cell_diameter=110.0))
    boxes = hits = detections = 0
    for capture in captures:
        cells = detector(getattr(capture, look)).cells
        detections += len(cells)
        claimed: set[int] = set()
        for truth in capture.cells:
            boxes += 1
            for j, cell in enumerate(cells):
                if j not in claimed and np.hypot(cell.cx - truth.cx, cell.cy - truth.cy) <= truth.diameter / 2:
                    claimed.add(j)
                    hits += 1
                    break
    assert hits / boxes >= 0.95
    assert hits == detections  # no false detections


def test_labels_agree_with_the_true_classes(captures: list) -> None:
    """Intersection over union per class, over all captures (DM1200 look, what the pipeline sees)."""
    detector = ThresholdDetector(DetectSettings(cell_diameter=110.0))
    inter = np.zeros(4)
    union = np.zeros(4)
    for capture in captures:
        labels = detector(capture.dm1200).labels
        for k in (BACKGROUND, RED_CELL, CYTOPLASM, NUCLEUS):
            inter[k] += np.count_nonzero((labels == k) & (capture.labels == k))
            union[k] += np.count_nonzero((labels == k) | (capture.labels == k))
    iou = inter / union
    assert iou[BACKGROUND] >= 0.95 and iou[RED_CELL] >= 0.9
    assert iou[CYTOPLASM] >= 0.75 and iou[NUCLEUS] >= 0.65
