"""The threshold detector on real captures (../shared/data): the issue's floors.

- BCCD (Wright stain, more magnified: cell diameter 200 px): recall >= 0.97, precision >= 0.95
  against the white-cell boxes.
- PBC (MGG, DM96, default diameter 110 px): over all nucleated classes together, exactly one cell whose
  body reaches within 25 px of the image centre in >= 98 % of the held-out half of the captures
  (cellbatch.evaluate.CentredCapture; analysers leave 2-8 % of cells 25-50 px off centre, so the
  centroid reading is only a looser guard); no cell whose body reaches within 25 px of the centre in
  >= 95 % of platelet images (a white cell at the border is a real cell, not an error).

Skipped with a reason where the data folder is absent. All 292 + 1,200 images run in a few seconds.

The perturbation tests check that the floors survive what varies between microscopes and
scanners (gamma, exposure, colour cast, focus, JPEG compression) on a subsample of each set.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellbatch.detect.base import DetectSettings
from cellbatch.detect.threshold import ThresholdDetector
from cellbatch.evaluate import CentredCapture, centred_capture, evaluate_detector, load_boxes
from cellbatch.read import iter_image_files, read_image

NUCLEATED = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil")
CENTRE_RADIUS = 25.0

# The PBC floor: exactly one cell whose body reaches within 25 px of the centre, over all nucleated classes
# together, on the held-out half of each class (odd positions in name order; the detector was tuned on the
# even half). Captures with no single central cell (ERB_810174: a red cell at the centre; ERB_115599 two
# touching erythroblasts; ERB_915601 a bare nucleus) count as misses.
NUCLEATED_FLOOR = 0.98
HELD_OUT_START = 1  # every second capture from the second: `cellbatch eval centred --half odd`


# Captures vary between instruments in their tone curve, exposure, white balance, focus and compression.
PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gamma 1.3": lambda im: _tone(im, lambda f: f**1.3),
    "gamma 0.8": lambda im: _tone(im, lambda f: f**0.8),
    "brightness x1.1": lambda im: _tone(im, lambda f: f * 1.1),
    "brightness x0.85": lambda im: _tone(im, lambda f: f * 0.85),
    "yellow cast": lambda im: _tone(im, lambda f: f * np.array([1.04, 1.0, 0.88], np.float32)),
    "blur sigma 1.5": lambda im: cv2.GaussianBlur(im, (0, 0), 1.5),
    "JPEG quality 40": lambda im: cv2.imdecode(cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 40])[1], -1),
}
BCCD_SUBSAMPLE = 3  # every third BCCD capture keeps the perturbation tests to a few seconds
PBC_SUBSAMPLE = 3  # likewise for the PBC classes not already run whole


def _tone(image: np.ndarray, curve: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``curve`` to the capture's values scaled to [0, 1], clipping like a camera."""
    return np.clip(curve(image.astype(np.float32) / 255.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)


@pytest.fixture
def bccd(shared_data: Path) -> Path:
    return shared_data / "bccd"


@cache
def pbc_captures(
    folder: Path, cell_class: str, perturbation: str | None = None, step: int = 1, start: int = 0
) -> tuple[CentredCapture, ...]:
    """The detector's cells in each ``step``-th capture from ``start`` of a PBC class, as distances from the centre."""
    detector = ThresholdDetector(DetectSettings(cell_diameter=110.0))
    captures = []
    for path in sorted(iter_image_files(folder / cell_class))[start::step]:
        image = read_image(path)
        detection = detector(PERTURBATIONS[perturbation](image) if perturbation else image)
        captures.append(centred_capture(path.name, cell_class, detection, image.shape[:2]))
    return tuple(captures)


def pbc_rate(
    folder: Path,
    cell_class: str,
    reading: str = "centroid",
    perturbation: str | None = None,
    step: int = 1,
    start: int = 0,
) -> float:
    """Share of the class' captures with exactly one central cell (platelets: with no central cell by body)."""
    captures = pbc_captures(folder, cell_class, perturbation, step, start)
    if cell_class == "platelet":
        return float(np.mean([c.central(CENTRE_RADIUS, "body") == 0 for c in captures]))
    return float(np.mean([c.central(CENTRE_RADIUS, reading) == 1 for c in captures]))


def test_bccd_recall_and_precision_beat_the_floor(bccd: Path) -> None:
    images = list(iter_image_files(bccd / "JPEGImages"))
    score = evaluate_detector(
        images, load_boxes(bccd / "wbc_boxes.csv"), ThresholdDetector(DetectSettings(cell_diameter=200.0))
    )
    assert len(images) == 292
    assert score.recall >= 0.97
    assert score.precision >= 0.95


def test_bccd_voc_annotations_give_the_same_score_as_the_csv(bccd: Path) -> None:
    images = sorted(iter_image_files(bccd / "JPEGImages"))[:40]
    detector = ThresholdDetector(DetectSettings(cell_diameter=200.0))
    from_csv = evaluate_detector(images, load_boxes(bccd / "wbc_boxes.csv"), detector)
    from_voc = evaluate_detector(images, load_boxes(bccd / "Annotations"), detector)
    assert from_csv.as_dict() == from_voc.as_dict()


def test_pbc_nucleated_cells_together_beat_the_floor_on_the_held_out_half(shared_data: Path) -> None:
    captures = [c for k in NUCLEATED for c in pbc_captures(shared_data / "pbc", k, step=2, start=HELD_OUT_START)]
    hits = [c.central(CENTRE_RADIUS, "body") == 1 for c in captures]
    assert len(captures) == 515
    assert np.mean(hits) >= NUCLEATED_FLOOR


@pytest.mark.parametrize("cell_class", NUCLEATED)
def test_pbc_nucleated_cell_found_at_the_centre_in_at_least_nine_in_ten(shared_data: Path, cell_class: str) -> None:
    """Looser guards than the floor: regressions show here even while a class is below 99 %."""
    assert pbc_rate(shared_data / "pbc", cell_class, "centroid") >= 0.9
    assert pbc_rate(shared_data / "pbc", cell_class, "body") >= 0.95


def test_pbc_platelet_captures_give_no_central_cell(shared_data: Path) -> None:
    assert pbc_rate(shared_data / "pbc", "platelet") >= 0.95
    assert pbc_rate(shared_data / "pbc", "platelet", step=2, start=HELD_OUT_START) >= 0.95


@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
def test_pbc_platelets_stay_rejected_under_capture_variation(shared_data: Path, perturbation: str) -> None:
    assert pbc_rate(shared_data / "pbc", "platelet", perturbation=perturbation) >= 0.95


@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
@pytest.mark.parametrize("cell_class", ["erythroblast", "lymphocyte"])
def test_pbc_small_nuclei_stay_found_under_capture_variation(
    shared_data: Path, cell_class: str, perturbation: str
) -> None:
    """Erythroblasts and small lymphocytes are the nuclei the platelet test could take for platelets."""
    unchanged = pbc_rate(shared_data / "pbc", cell_class)
    assert pbc_rate(shared_data / "pbc", cell_class, perturbation=perturbation) >= unchanged - 0.03


@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
def test_pbc_large_cells_stay_found_at_the_centre_under_capture_variation(shared_data: Path, perturbation: str) -> None:
    """Body reading, every third capture of the classes whose outline (not the platelet test) can move."""
    for cell_class in ("basophil", "eosinophil", "ig", "monocyte", "neutrophil"):
        rate = pbc_rate(shared_data / "pbc", cell_class, "body", perturbation, step=PBC_SUBSAMPLE)
        assert rate >= 0.97, cell_class


@pytest.mark.parametrize("perturbation", ["gamma 1.3", "gamma 0.8", "brightness x1.1", "JPEG quality 40"])
def test_bccd_floors_hold_under_capture_variation(bccd: Path, perturbation: str) -> None:
    images = sorted(iter_image_files(bccd / "JPEGImages"))[::BCCD_SUBSAMPLE]
    detector = ThresholdDetector(DetectSettings(cell_diameter=200.0))
    score = evaluate_detector(
        images, load_boxes(bccd / "wbc_boxes.csv"), lambda image: detector(PERTURBATIONS[perturbation](image))
    )
    assert score.recall >= 0.97
    assert score.precision >= 0.95
