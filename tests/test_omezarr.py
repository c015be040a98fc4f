"""OME-Zarr input (cellbatch.omezarr, cellbatch.read): images and plates written by the ome-zarr library
give the same cells as the same captures as PNG files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

from cellbatch.api import convert
from cellbatch.errors import InputFormatError
from cellbatch.read import discover_slides, read_frame, read_image, slide_frame_count, validate_slide
from cellbatch.schemas import validate
from cellbatch.synth import write_synth

FORMATS = {"0.4": FormatV04(), "0.5": FormatV05()}


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic DM1200 captures as PNG files (the folder is one slide)."""
    synth = write_synth(tmp_path_factory.mktemp("synth"), count=3, seed=11, looks=("dm1200",))
    return synth / "dm1200"


def _images(folder: Path) -> list[np.ndarray]:
    return [read_image(p) for p in sorted(folder.glob("*.png"))]


def write_ome_image(group: zarr.Group, images: list[np.ndarray], version: str) -> None:
    """Frames along t, channels first (t, c, y, x), with a pyramid level the reader must leave alone."""
    stack = np.stack([np.moveaxis(im, -1, 0) for im in images])
    write_image(stack, group, axes="tcyx", fmt=FORMATS[version], scale_factors=(2,))


def write_ome_plate(path: Path, images: list[np.ndarray], version: str) -> None:
    """A plate with wells A/1 (fields 0, 1) and B/2 (field 0): one capture per field, (c, y, x)."""
    fmt = FORMATS[version]
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    fields = {"A/1": ["0", "1"], "B/2": ["0"]}
    write_plate_metadata(root, ["A", "B"], ["1", "2"], list(fields), fmt=fmt)
    i = 0
    for well, names in fields.items():
        group = root.require_group(well)
        write_well_metadata(group, [{"path": n} for n in names], fmt=fmt)
        for name in names:
            write_image(np.moveaxis(images[i], -1, 0), group.require_group(name), axes="cyx", fmt=fmt,
                        scale_factors=(2,))
            i += 1


def _cells(out: Path, slide: str) -> list[dict[str, str]]:
    with open(out / slide / "cells.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: v for k, v in row.items() if k not in ("cell_id", "source", "frame")} for row in rows]


def _crops(out: Path, slide: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out / slide / "cells.zarr"), mode="r")["crop"][:])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_image_frames_are_the_full_resolution_captures(captures: Path, tmp_path: Path, version: str) -> None:
    images = _images(captures)
    store = tmp_path / "image.zarr"
    write_ome_image(zarr.open_group(str(store), mode="w", zarr_format=FORMATS[version].zarr_format), images, version)
    slides = discover_slides(store)
    assert [(s.name, s.axes) for s in slides] == [(".", "fcyx")]  # one slide, not one per pyramid level
    validate_slide(slides[0])
    assert slide_frame_count(slides[0]) == len(images)
    for i, image in enumerate(images):
        capture = read_frame(slides[0], i)
        np.testing.assert_array_equal(capture.image, image)
        assert capture.notes == ()


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_run_on_ome_zarr_finds_the_same_cells_as_on_the_png_files(captures: Path, tmp_path: Path,
                                                                  version: str) -> None:
    images = _images(captures)
    png = convert([captures], tmp_path / "png", device="cpu", workers=1)
    image_store = tmp_path / "image.zarr"
    write_ome_image(zarr.open_group(str(image_store), mode="w", zarr_format=FORMATS[version].zarr_format),
                    images, version)
    plate_store = tmp_path / "plate.zarr"
    write_ome_plate(plate_store, images, version)
    ome = convert([image_store], tmp_path / "image", device="cpu", workers=1)
    plate = convert([plate_store], tmp_path / "plate", device="cpu", workers=1)

    assert [s.status for s in png.slides + ome.slides] == ["done", "done"]
    expected = _cells(tmp_path / "png", "dm1200")
    assert expected, "the synthetic captures hold cells"
    assert _cells(tmp_path / "image", "image.zarr") == expected
    np.testing.assert_array_equal(_crops(tmp_path / "image", "image.zarr"), _crops(tmp_path / "png", "dm1200"))

    # a plate is one slide per well field; field k holds capture k
    assert [(s.name, s.status) for s in plate.slides] == [("A/1/0", "done"), ("A/1/1", "done"), ("B/2/0", "done")]
    by_capture: list[dict[str, str]] = []
    for name in ("A/1/0", "A/1/1", "B/2/0"):
        by_capture += _cells(tmp_path / "plate", name)
    assert by_capture == expected


def test_plate_inside_a_folder_is_named_by_store_well_and_field(captures: Path, tmp_path: Path) -> None:
    write_ome_plate(tmp_path / "in" / "run1.zarr", _images(captures), "0.5")
    shutil.copytree(captures, tmp_path / "in" / "pngs")
    names = [s.name for s in discover_slides(tmp_path / "in")]
    assert names == ["pngs", "run1.zarr/A/1/0", "run1.zarr/A/1/1", "run1.zarr/B/2/0"]


@pytest.mark.parametrize("channels", [2, 5])
def test_image_with_other_than_1_3_or_4_channels_fails_as_a_slide(tmp_path: Path, channels: int) -> None:
    store = tmp_path / "odd.zarr"
    data = np.zeros((channels, 64, 64), np.uint8)
    write_image(data, zarr.open_group(str(store), mode="w", zarr_format=3), axes="cyx", fmt=FormatV05(),
                scale_factors=())
    (slide,) = discover_slides(store)
    with pytest.raises(InputFormatError, match=f"{channels} channels"):
        validate_slide(slide)


def test_image_with_invalid_axes_fails_as_a_slide_with_the_reason(tmp_path: Path) -> None:
    store = tmp_path / "bad.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=2)
    group.create_array("0", shape=(3, 64, 64), dtype="uint8")
    # 'space' before 'channel' breaks the v0.4 axis order
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}], "axes": [
        {"name": "y", "type": "space"}, {"name": "c", "type": "channel"}, {"name": "x", "type": "space"}]}]
    (slide,) = discover_slides(store)
    with pytest.raises(InputFormatError, match="axes .* are not valid"):
        validate_slide(slide)
    report = convert([store], tmp_path / "out", device="cpu", workers=1)
    assert report.slides[0].status == "failed" and "not valid" in report.slides[0].reason


def test_grayscale_image_without_channel_axis_is_converted_and_noted(tmp_path: Path) -> None:
    store = tmp_path / "gray.zarr"
    gray = np.random.default_rng(0).integers(0, 256, (2, 64, 80), dtype=np.uint8)
    write_image(gray, zarr.open_group(str(store), mode="w", zarr_format=3), axes="zyx", fmt=FormatV05(),
                scale_factors=())
    (slide,) = discover_slides(store)
    validate_slide(slide)
    capture = read_frame(slide, 1)
    assert capture.image.shape == (64, 80, 3) and capture.notes == ("converted from grayscale",)
    np.testing.assert_array_equal(capture.image[..., 0], gray[1])


def test_normalise_fit_reads_ome_zarr_through_the_same_reader(captures: Path, tmp_path: Path) -> None:
    from cellbatch.normalise.fit import iter_captures

    images = _images(captures)
    store = tmp_path / "image.zarr"
    write_ome_image(zarr.open_group(str(store), mode="w", zarr_format=3), images, "0.5")
    for got, want in zip(iter_captures(store), images, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_frame_whose_chunk_is_absent_fails_alone(captures: Path, tmp_path: Path) -> None:
    images = _images(captures)
    store = tmp_path / "image.zarr"
    stack = np.stack(images).transpose(3, 0, 1, 2)  # (c, z, y, x): the frame axis is not the first
    write_image(stack, zarr.open_group(str(store), mode="w", zarr_format=3), axes="czyx", fmt=FormatV05(),
                scale_factors=(), storage_options={"chunks": (3, 1, *stack.shape[2:])})
    (slide,) = discover_slides(store)
    assert slide.axes == "cfyx"
    chunk = store / slide.array_path / "c" / "0" / "1" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()  # frame 1 (z = 1) lost in a copy
    report = convert([store], tmp_path / "out", device="cpu", workers=1)
    (entry,) = report.slides
    assert entry.status == "done" and entry.captures == 3 and entry.failed_captures == 1
    (failure,) = report.failures
    assert failure["frame"] == 1 and "absent from the store" in failure["reason"]
    validate(json.loads((tmp_path / "out" / "run.json").read_text()), "run")
    validate(json.loads((tmp_path / "out" / "image.zarr" / "provenance.json").read_text()), "provenance")
