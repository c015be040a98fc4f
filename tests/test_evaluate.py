"""Box matching and box loading for detection evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellbatch.detect.base import Cell, Detection
from cellbatch.errors import InputFormatError, InputNotFoundError
from cellbatch.evaluate import Box, boxes_for, centred_capture, evaluate_detector, load_boxes, match_centroids

VOC = """<annotation>
  <filename>{name}</filename>
  <object><name>WBC</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>110</xmax><ymax>120</ymax></bndbox></object>
  <object><name>RBC</name><bndbox><xmin>200</xmin><ymin>200</ymin><xmax>260</xmax><ymax>260</ymax></bndbox></object>
</annotation>
"""


def test_centroid_inside_a_box_is_a_hit() -> None:
    m = match_centroids([(50, 50)], [Box(0, 0, 100, 100)])
    assert (m.hits, m.missed, m.false) == (1, (), ())


def test_two_detections_in_one_box_give_one_hit_and_one_false() -> None:
    m = match_centroids([(40, 40), (60, 60)], [Box(0, 0, 100, 100)])
    assert m.hits == 1 and len(m.false) == 1


def test_box_without_detection_is_missed() -> None:
    m = match_centroids([(500, 500)], [Box(0, 0, 100, 100)])
    assert m.hits == 0 and m.missed == (Box(0, 0, 100, 100),) and m.false == ((500.0, 500.0),)


def test_matching_is_one_to_one_and_maximises_hits_in_overlapping_boxes() -> None:
    # The first centroid lies in both boxes, the second only in the first: a greedy first-come match
    # would give one hit; the best assignment gives two.
    boxes = [Box(0, 0, 100, 100), Box(50, 50, 150, 150)]
    m = match_centroids([(75, 75), (10, 10)], boxes)
    assert m.hits == 2 and m.false == () and m.missed == ()


def test_no_boxes_and_no_detections_is_perfect() -> None:
    m = match_centroids([], [])
    assert (m.hits, m.n_boxes, m.n_detections) == (0, 0, 0)


def test_csv_boxes_load_with_or_without_header(tmp_path: Path) -> None:
    with_header = tmp_path / "a.csv"
    with_header.write_text("filename,xmin,ymin,xmax,ymax\nimg1.jpg,1,2,3,4\nimg1.jpg,5,6,7,8\nsub/img2.jpg,0,0,9,9\n")
    without = tmp_path / "b.csv"
    without.write_text("img1.jpg,1,2,3,4\n")
    boxes = load_boxes(with_header)
    assert boxes["img1.jpg"] == [Box(1, 2, 3, 4), Box(5, 6, 7, 8)]
    assert boxes["img2.jpg"] == [Box(0, 0, 9, 9)]  # keyed by file name
    assert load_boxes(without) == {"img1.jpg": [Box(1, 2, 3, 4)]}


def test_voc_folder_keeps_only_white_cell_boxes(tmp_path: Path) -> None:
    (tmp_path / "img1.xml").write_text(VOC.format(name="img1.jpg"))
    boxes = load_boxes(tmp_path)
    assert boxes_for(Path("x/img1.jpg"), boxes) == [Box(10, 20, 110, 120)]
    assert boxes_for(Path("img9.jpg"), boxes) == []


def test_missing_boxes_path_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="CSV file or a Pascal VOC folder"):
        load_boxes(tmp_path / "nope.csv")


def test_malformed_csv_row_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,xmin,ymin,xmax,ymax\nimg.jpg,1,2\n")
    with pytest.raises(InputFormatError, match="line 2"):
        load_boxes(bad)
    bad.write_text("img.jpg,1,2,three,4\n")
    with pytest.raises(InputFormatError, match="must be numbers"):
        load_boxes(bad)


def test_folder_without_voc_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputFormatError, match="no .xml files"):
        load_boxes(tmp_path)


def test_broken_voc_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.xml").write_text("<annotation><object>")
    with pytest.raises(InputFormatError, match="not valid Pascal VOC"):
        load_boxes(tmp_path)


class FixedDetector:
    """Returns the same cells for every image."""

    def __init__(self, *centres: tuple[float, float]) -> None:
        self.centres = centres

    def __call__(self, image: np.ndarray) -> Detection:
        cells = tuple(Cell(x, y, 100, 50, False) for x, y in self.centres)
        return Detection(cells, np.zeros(image.shape[:2], np.uint8))


def write_png(path: Path) -> Path:
    import imageio.v3 as iio

    iio.imwrite(path, np.full((40, 50, 3), 200, np.uint8))
    return path


def test_evaluate_detector_scores_every_image(tmp_path: Path) -> None:
    a, b = write_png(tmp_path / "a.png"), write_png(tmp_path / "b.png")
    boxes = {"a.png": [Box(0, 0, 20, 20)]}
    score = evaluate_detector([a, b], boxes, FixedDetector((10, 10)))
    # a: one hit; b has no box, so its detection is false.
    assert (score.n_boxes, score.n_detections, score.hits) == (1, 2, 1)
    assert score.recall == 1.0 and score.precision == 0.5


def test_boxes_that_name_no_image_are_refused(tmp_path: Path) -> None:
    a = write_png(tmp_path / "a.png")
    with pytest.raises(InputFormatError, match="same images"):
        evaluate_detector([a], {"other.png": [Box(0, 0, 1, 1)]}, FixedDetector())


def test_centred_capture_reads_within_radius_by_centroid_and_by_body() -> None:
    # A cell of area 2,500 pi px^2 (radius 50) whose centroid lies 30 px below the centre: it covers the
    # centre, but its centroid is outside 25 px.
    cell = Cell(cx=160.0, cy=150.0, area_px=round(2500 * np.pi), nucleus_area_px=0, edge=False)
    capture = centred_capture("a.png", "neutrophil", Detection(cells=(cell,), labels=np.zeros((1, 1))), (240, 320))
    assert capture.centroid_px == pytest.approx((30.0,))
    assert capture.body_px == pytest.approx((-20.0,), abs=0.01)
    assert capture.central(25.0, "centroid") == 0
    assert capture.central(25.0, "body") == 1


def test_centred_capture_counts_a_far_neighbour_under_neither_reading() -> None:
    near = Cell(cx=160.0, cy=120.0, area_px=3000, nucleus_area_px=0, edge=False)
    far = Cell(cx=300.0, cy=120.0, area_px=3000, nucleus_area_px=0, edge=False)
    capture = centred_capture("b.png", "x", Detection(cells=(near, far), labels=np.zeros((1, 1))), (240, 320))
    assert capture.central(25.0, "centroid") == capture.central(25.0, "body") == 1
