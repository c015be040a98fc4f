"""The threshold detector on hand-drawn captures: one hard situation per test.

Scenes are drawn with OpenCV in MGG-like colours measured on real DM96 captures (white-balanced:
nucleus B - G about 0.45 and dark; red cells pink with B - G about 0.1; platelets a lighter,
more magenta purple). Sizes are in units of the cell diameter ``D`` the detector is given.
"""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest

from cellbatch.detect.base import BACKGROUND, CYTOPLASM, NUCLEUS, RED_CELL, DetectSettings
from cellbatch.detect.threshold import ThresholdDetector
from cellbatch.registry import detectors

D = 110.0
SHAPE = (480, 640)

BACKGROUND_RGB = (250, 235, 212)
RED_CELL_RGB = (200, 160, 165)
CYTOPLASM_RGB = (214, 186, 210)
NUCLEUS_RGB = (70, 40, 130)
PLATELET_RGB = (150, 104, 172)


def blank(colour: tuple[int, int, int] = BACKGROUND_RGB, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    return np.full((*shape, 3), colour, np.uint8)


def disc(image: np.ndarray, x: float, y: float, r: float, colour: tuple[int, int, int]) -> None:
    cv2.circle(image, (round(x), round(y)), round(r), colour, -1, lineType=cv2.LINE_AA)


def red_cell(image: np.ndarray, x: float, y: float, d: float = D) -> None:
    """A red cell: 0.7 D across, pale centre."""
    disc(image, x, y, 0.35 * d, RED_CELL_RGB)
    disc(image, x, y, 0.13 * d, (222, 192, 190))


def neutrophil(image: np.ndarray, x: float, y: float, d: float = D, lobes: int = 3) -> None:
    """Pink-lilac cytoplasm with ``lobes`` separate round lobes on an arc (not touching each other).

    The lobes together cover 0.25 D^2, about a third of the cell, as in real neutrophils.
    """
    disc(image, x, y, 0.5 * d, CYTOPLASM_RGB)
    r = np.sqrt(0.25 / (np.pi * lobes)) * d
    for k in range(lobes):
        a = 2 * np.pi * k / lobes
        disc(image, x + 0.26 * d * np.cos(a), y + 0.26 * d * np.sin(a), r, NUCLEUS_RGB)


def lymphocyte(image: np.ndarray, x: float, y: float, d: float = D) -> None:
    disc(image, x, y, 0.42 * d, (170, 170, 215))
    disc(image, x, y, 0.34 * d, NUCLEUS_RGB)


def erythroblast(image: np.ndarray, x: float, y: float, d: float = D) -> None:
    """Red-cell-coloured cytoplasm around a small, very dense round nucleus."""
    disc(image, x, y, 0.4 * d, (190, 160, 185))
    disc(image, x, y, 0.2 * d, (45, 25, 95))


def detect(image: np.ndarray, d: float = D):
    return ThresholdDetector(DetectSettings(cell_diameter=d))(image)


def crowded_red_cells(rng: np.random.Generator, n: int = 45) -> np.ndarray:
    """Red cells packed so that many overlap (overlaps darker, as in a thick smear)."""
    image = blank().astype(np.float32)
    for _ in range(n):
        layer = blank().astype(np.float32)
        x, y = rng.uniform(0, SHAPE[1]), rng.uniform(0, SHAPE[0])
        red_cell(layer, x, y)
        image *= layer / np.array(BACKGROUND_RGB, np.float32)  # transmittances multiply
    return np.clip(image, 0, 255).astype(np.uint8)


def test_single_white_cell_is_found_at_its_centre() -> None:
    image = blank()
    red_cell(image, 120, 100)
    red_cell(image, 500, 380)
    neutrophil(image, 320, 240)
    cells = detect(image).cells
    assert len(cells) == 1
    assert abs(cells[0].cx - 320) < 6 and abs(cells[0].cy - 240) < 6
    assert not cells[0].edge


def test_empty_capture_gives_no_cell_and_a_background_label_image() -> None:
    detection = detect(blank())
    assert detection.cells == ()
    assert detection.labels.shape == SHAPE and detection.labels.dtype == np.uint8
    assert (detection.labels == BACKGROUND).all()


def test_labels_put_each_class_where_it_was_drawn() -> None:
    image = blank()
    red_cell(image, 120, 100)
    lymphocyte(image, 320, 240)
    labels = detect(image).labels
    assert labels[240, 320] == NUCLEUS
    assert labels[240, 320 + round(0.39 * D)] == CYTOPLASM  # in the rim between nucleus and edge
    assert labels[100 + 30, 120] == RED_CELL
    assert labels[20, 20] == BACKGROUND and labels[240, 600] == BACKGROUND
    assert set(np.unique(labels)) <= {BACKGROUND, RED_CELL, CYTOPLASM, NUCLEUS}


def test_areas_measure_the_drawn_cell_and_nucleus() -> None:
    image = blank()
    lymphocyte(image, 320, 240)
    cell = detect(image).cells[0]
    assert cell.area_px == pytest.approx(np.pi * (0.42 * D) ** 2, rel=0.2)
    assert cell.nucleus_area_px == pytest.approx(np.pi * (0.34 * D) ** 2, rel=0.2)


def test_two_touching_white_cells_are_split() -> None:
    image = blank()
    lymphocyte(image, 320 - 0.42 * D, 240)
    lymphocyte(image, 320 + 0.42 * D, 240)  # rims touch
    cells = detect(image).cells
    assert len(cells) == 2
    assert sorted(round(c.cx) for c in cells) == pytest.approx([320 - 0.42 * D, 320 + 0.42 * D], abs=8)


def test_two_touching_neutrophils_are_two_cells() -> None:
    image = blank()
    neutrophil(image, 320 - 0.5 * D, 240)
    neutrophil(image, 320 + 0.5 * D, 240)
    assert len(detect(image).cells) == 2


@pytest.mark.parametrize("lobes", [2, 3, 4, 5])
def test_lobes_of_one_neutrophil_are_one_cell(lobes: int) -> None:
    image = blank()
    neutrophil(image, 320, 240, lobes=lobes)
    assert len(detect(image).cells) == 1


def test_large_band_neutrophil_with_far_apart_ends_is_one_cell() -> None:
    """Two heavy lobes 0.9 D apart joined by a thin chromatin band (PBC band cells reach 1.6 D across)."""
    image = blank()
    disc(image, 320, 240, 0.8 * D, CYTOPLASM_RGB)
    cv2.ellipse(image, (320, 220), (round(0.45 * D), round(0.4 * D)), 0, 0, 180, NUCLEUS_RGB, round(0.06 * D))
    for side in (-1, 1):
        disc(image, 320 + side * 0.45 * D, 220, 0.17 * D, NUCLEUS_RGB)
    cells = detect(image).cells
    assert len(cells) == 1
    assert (cells[0].cx, cells[0].cy) == pytest.approx((320, 240), abs=0.1 * D)


def test_cell_cut_by_the_border_is_kept_and_flagged() -> None:
    image = blank()
    neutrophil(image, 15, 240)
    lymphocyte(image, 320, 240)
    cells = detect(image).cells
    assert len(cells) == 2
    edge = {c.edge for c in cells if c.cx < 100}, {c.edge for c in cells if c.cx > 200}
    assert edge == ({True}, {False})


def test_platelets_alone_are_not_white_cells() -> None:
    image = blank()
    rng = np.random.default_rng(0)
    for _ in range(12):
        disc(image, rng.uniform(30, 610), rng.uniform(30, 450), rng.uniform(0.08, 0.14) * D, PLATELET_RGB)
    assert detect(image).cells == ()


def test_giant_platelet_is_not_a_white_cell() -> None:
    image = blank()
    disc(image, 320, 240, 0.3 * D, PLATELET_RGB)  # as large as a small red cell
    red_cell(image, 150, 240)
    assert detect(image).cells == ()


def test_giant_platelet_lying_on_a_red_cell_is_not_a_white_cell() -> None:
    """The red cell under it gives the blob a large stained body; its chromatin stays granulomere-pale."""
    image = blank()
    disc(image, 320, 240, 0.45 * D, RED_CELL_RGB)
    disc(image, 320, 240, 0.3 * D, PLATELET_RGB)
    red_cell(image, 150, 240)
    assert detect(image).cells == ()


def test_erythroblast_with_a_small_dense_nucleus_is_found() -> None:
    image = blank()
    erythroblast(image, 320, 240)
    red_cell(image, 150, 240)
    assert len(detect(image).cells) == 1


def test_small_lymphocyte_below_the_expected_size_is_found() -> None:
    """A small Wright-stained lymphocyte when the diameter is set for the larger cells of the field.

    BCCD fields at --cell-diameter 200 hold small lymphocytes 90-100 px across, nearly all nucleus.
    """
    image = blank((222, 224, 236))
    disc(image, 320, 240, 0.24 * D, (205, 195, 230))
    disc(image, 320, 240, 0.185 * D, (122, 100, 222))
    red_cell(image, 150, 240)
    assert len(detect(image).cells) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crowded_overlapping_red_cells_alone_give_no_cell(seed: int) -> None:
    assert detect(crowded_red_cells(np.random.default_rng(seed))).cells == ()


def test_white_cell_among_crowded_red_cells_is_found_once() -> None:
    image = crowded_red_cells(np.random.default_rng(3))
    neutrophil(image, 320, 240)
    cells = detect(image).cells
    assert len(cells) == 1
    assert abs(cells[0].cx - 320) < 15 and abs(cells[0].cy - 240) < 15


def test_stain_precipitate_specks_are_not_white_cells() -> None:
    image = blank()
    rng = np.random.default_rng(1)
    for _ in range(300):
        disc(image, rng.uniform(0, 640), rng.uniform(0, 480), rng.uniform(1, 4), (40, 20, 90))
    assert detect(image).cells == ()


def test_smudge_cell_is_one_cell() -> None:
    """A smudge cell (a burst lymphocyte) is a pale, frayed smear of chromatin without cytoplasm,
    flattened to about a cell's size.

    It is a white cell (differentials count it), so it is found, once.
    """
    image = blank().astype(np.float32)
    smear = np.zeros(SHAPE, np.float32)
    cv2.ellipse(smear, (320, 240), (round(0.55 * D), round(0.4 * D)), 20, 0, 360, 1.0, -1)
    rng = np.random.default_rng(2)
    smear *= rng.uniform(0.6, 1.0, SHAPE).astype(np.float32)
    smear = cv2.GaussianBlur(smear, (0, 0), 4)
    smudge = np.array((120, 90, 165), np.float32)
    image = image * (1 - smear[..., None]) + smudge * smear[..., None]
    assert len(detect(image.astype(np.uint8)).cells) == 1


@pytest.mark.parametrize(
    "name, background, nucleus, cytoplasm",
    [
        ("mgg", BACKGROUND_RGB, NUCLEUS_RGB, CYTOPLASM_RGB),
        ("wright", (222, 224, 236), (122, 100, 222), (205, 195, 230)),  # pale blue-violet nucleus
        ("wright-giemsa", (238, 232, 230), (90, 60, 160), (205, 185, 210)),
    ],
)
@pytest.mark.parametrize("gain", [0.75, 1.0])
@pytest.mark.parametrize("blur", [0.0, 3.0])
def test_stain_tone_illumination_and_focus_do_not_lose_the_cell(
    name: str,
    background: tuple[int, int, int],
    nucleus: tuple[int, int, int],
    cytoplasm: tuple[int, int, int],
    gain: float,
    blur: float,
) -> None:
    image = blank(background)
    red_cell(image, 130, 120)
    disc(image, 320, 240, 0.5 * D, cytoplasm)
    for k in range(3):
        a = 2 * np.pi * k / 3
        disc(image, 320 + 0.22 * D * np.cos(a), 240 + 0.22 * D * np.sin(a), 0.14 * D, nucleus)
    if blur:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    image = np.clip(image * gain, 0, 255).astype(np.uint8)  # dimmer lamp
    cells = detect(image).cells
    assert len(cells) == 1, name


def test_uneven_illumination_does_not_make_cells() -> None:
    image = blank().astype(np.float32)
    ramp = np.linspace(0.8, 1.0, SHAPE[1], dtype=np.float32)[None, :, None]
    image = (image * ramp).astype(np.uint8)
    red_cell(image, 200, 200)
    assert detect(image).cells == ()


@pytest.mark.parametrize("d", [60.0, 110.0, 200.0])
def test_sizes_scale_with_the_cell_diameter(d: float) -> None:
    image = blank(shape=(round(4.4 * d), round(5.8 * d)))
    h, w = image.shape[:2]
    neutrophil(image, w / 2, h / 2, d=d)
    red_cell(image, w / 5, h / 4, d=d)
    disc(image, w * 0.8, h * 0.8, 0.1 * d, PLATELET_RGB)
    cells = detect(image, d=d).cells
    assert len(cells) == 1
    assert abs(cells[0].cx - w / 2) < 0.08 * d


def test_detector_is_picklable_and_stateless() -> None:
    image = blank()
    neutrophil(image, 320, 240)
    detector = ThresholdDetector(DetectSettings(cell_diameter=D))
    first = detector(image)
    clone = pickle.loads(pickle.dumps(detector))
    detector(blank())  # a call in between changes nothing
    again = clone(image)
    assert first.cells == again.cells
    assert np.array_equal(first.labels, again.labels)


def test_detector_leaves_the_input_untouched() -> None:
    image = blank()
    neutrophil(image, 320, 240)
    before = image.copy()
    detect(image)
    assert np.array_equal(image, before)


def test_odd_sized_capture_gets_full_size_labels() -> None:
    image = blank(shape=(363, 361))
    lymphocyte(image, 180, 181)
    detection = detect(image)
    assert detection.labels.shape == (363, 361)
    assert len(detection.cells) == 1


def test_registry_name_threshold_builds_this_detector() -> None:
    assert detectors.get("threshold") is ThresholdDetector


def test_non_rgb_input_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect(np.zeros((100, 100), np.uint8))


def test_cell_in_the_leftover_corner_of_an_odd_capture_reaches_the_border() -> None:
    """483 x 643 is not a multiple of the working factor (4): the last rows and columns still get labels."""
    image = blank(shape=(483, 643))
    lymphocyte(image, 630, 470)
    detection = detect(image)
    assert len(detection.cells) == 1 and detection.cells[0].edge
    assert detection.labels[482, 642] == NUCLEUS


def test_fast_median_and_percentile_give_numpys_floats() -> None:
    from cellbatch.detect.threshold import _median, _percentile75

    rng = np.random.default_rng(0)
    for n in (*range(1, 12), 100, 1001, 4096):
        values = (rng.random(n) * rng.choice([1.0, 7.0])).astype(np.float32)
        assert float(_median(values)) == float(np.median(values))
        assert float(_percentile75(values)) == float(np.percentile(values, 75))


def test_optical_density_table_gives_the_floats_of_the_logarithm() -> None:
    """The per-channel table behind ``_Maps.mean_density`` equals ``_density`` of each white-balanced pixel."""
    from cellbatch.detect.threshold import _density, _Maps

    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    small[0, :3] = 0  # below the 1/255 floor of the logarithm
    for white in (np.array([231.0, 224.0, 219.0], np.float32), np.array([1.0, 255.0, 97.0], np.float32)):
        balanced = small.astype(np.float32) * (1.0 / white)
        maps = _Maps(nucleus=balanced[..., 0] > 2, stained=balanced[..., 0] > 2, dark=balanced[..., 0],
                     purple=balanced[..., 0], balanced=balanced, small=small, white=white)
        od = _density(balanced)
        np.testing.assert_array_equal(maps.mean_density(), (od[..., 0] + od[..., 1] + od[..., 2]) / 3)
