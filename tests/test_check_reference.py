"""Reference cells from paired captures (cellbatch.check.reference), with a stand-in detector.

Captures are white 640x480 fields with coloured discs; the stand-in detector reports every disc, so
the tests do not depend on the real detector's tuning.
"""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from scipy import ndimage

from cellbatch.check.reference import ReferenceSource
from cellbatch.detect.base import Cell, Detection, DetectSettings
from cellbatch.errors import InputNotFoundError


class DiscDetector:
    """Every non-white blob is a cell; counts its calls to show the capture cache works."""

    def __init__(self, settings: DetectSettings | None = None) -> None:
        self.calls = 0

    def __call__(self, image: np.ndarray) -> Detection:
        self.calls += 1
        foreground = image.min(axis=2) < 200
        labels, n = ndimage.label(foreground)
        cells = []
        for i, (cy, cx) in enumerate(ndimage.center_of_mass(foreground, labels, range(1, n + 1)), start=1):
            cells.append(
                Cell(cx=float(cx), cy=float(cy), area_px=int((labels == i).sum()), nucleus_area_px=0, edge=False)
            )
        return Detection(cells=tuple(cells), labels=(labels > 0).astype(np.uint8) * 2)


def capture(discs: list[tuple[int, int, tuple[int, int, int]]]) -> np.ndarray:
    """A 640x480 white capture with discs of radius 40 at (cx, cy) in the given colours."""
    image = np.full((480, 640, 3), 255, np.uint8)
    yy, xx = np.mgrid[0:480, 0:640]
    for cx, cy, colour in discs:
        image[(xx - cx) ** 2 + (yy - cy) ** 2 <= 40**2] = colour
    return image


@pytest.fixture()
def reference_dir(tmp_path: Path) -> Path:
    root = tmp_path / "dm96"
    (root / "slide1").mkdir(parents=True)
    iio.imwrite(root / "slide1" / "a.png", capture([(200, 240, (150, 0, 150)), (450, 240, (0, 150, 0))]))
    iio.imwrite(root / "slide1" / "empty.png", capture([]))
    return root


def test_the_detected_cell_nearest_the_input_cell_is_cropped_centred(reference_dir):
    detector = DiscDetector()
    source = ReferenceSource(reference_dir, detector=detector, cell_diameter=80)
    left, right = source.crops_for(
        [
            {"source": "slide1/a.png", "frame": 0, "cx": 190.0, "cy": 250.0},
            {"source": "slide1/a.png", "frame": 0, "cx": 470.0, "cy": 230.0},
        ]
    )
    assert left.shape == right.shape == (256, 256, 3) and left.dtype == np.uint8
    assert tuple(left[128, 128]) == (150, 0, 150)
    assert tuple(right[128, 128]) == (0, 150, 0)
    assert detector.calls == 1, "two cells of one capture cost one detection"


def test_missing_capture_or_cell_gives_none(reference_dir):
    source = ReferenceSource(reference_dir, detector=DiscDetector(), cell_diameter=80)
    crops = source.crops_for(
        [
            {"source": "slide1/missing.png", "frame": 0, "cx": 200.0, "cy": 240.0},
            {"source": "slide1/empty.png", "frame": 0, "cx": 200.0, "cy": 240.0},
            {"source": "slide1/a.png", "frame": 0, "cx": 325.0, "cy": 50.0},  # further than max_offset from both
        ]
    )
    assert crops == [None, None, None]


def test_a_crop_past_the_border_is_padded_with_the_background(tmp_path):
    root = tmp_path / "ref"
    root.mkdir()
    iio.imwrite(root / "edge.png", capture([(30, 240, (150, 0, 150))]))
    (crop,) = ReferenceSource(root, detector=DiscDetector(), cell_diameter=80).crops_for(
        [{"source": "edge.png", "frame": 0, "cx": 30.0, "cy": 240.0}]
    )
    assert tuple(crop[128, 0]) == (255, 255, 255), "left of the capture: background colour, not black"


def test_zarr_reference_reads_the_frame_of_the_same_array(tmp_path):
    import zarr

    store = tmp_path / "dm96.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    frames = np.stack([capture([(320, 240, (0, 0, 150))]), capture([(320, 240, (150, 0, 0))])])
    group.create_array("slideA", data=frames, chunks=(1, 480, 640, 3))
    source = ReferenceSource(store, detector=DiscDetector(), cell_diameter=80)
    first, second, missing = source.crops_for(
        [
            {"source": "slideA", "frame": 0, "cx": 320.0, "cy": 240.0},
            {"source": "slideA", "frame": 1, "cx": 320.0, "cy": 240.0},
            {"source": "slideA", "frame": 2, "cx": 320.0, "cy": 240.0},
        ]
    )
    assert tuple(first[128, 128]) == (0, 0, 150)
    assert tuple(second[128, 128]) == (150, 0, 0)
    assert missing is None


def test_zarr_store_inside_a_reference_folder_is_found_through_the_slide_name(tmp_path):
    import zarr

    store = tmp_path / "ref" / "batch.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    group.create_array("s1", data=capture([(320, 240, (0, 150, 0))])[None], chunks=(1, 480, 640, 3))
    source = ReferenceSource(tmp_path / "ref", detector=DiscDetector(), cell_diameter=80)
    (crop,) = source.crops_for([{"source": "s1", "frame": 0, "cx": 320.0, "cy": 240.0}], slide="batch.zarr/s1")
    assert tuple(crop[128, 128]) == (0, 150, 0)


def test_a_reference_root_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(InputNotFoundError, match="paired DM96"):
        ReferenceSource(tmp_path / "nope", detector=DiscDetector(), cell_diameter=80)


def test_a_detector_name_comes_from_the_registry(reference_dir):
    from cellbatch.registry import detectors

    detectors.register("test-discs", DiscDetector)
    source = ReferenceSource(reference_dir, detector="test-discs", cell_diameter=80)
    assert source.provenance()["detector"] == "test-discs"
    (crop,) = source.crops_for([{"source": "slide1/a.png", "frame": 0, "cx": 200.0, "cy": 240.0}])
    assert crop is not None
