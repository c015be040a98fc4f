"""Finding slides and reading Zarr frames: v2 and v3 stores, bad arrays, missing chunks, odd folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from cellbatch.errors import CellbatchError, InputFormatError, InputNotFoundError
from cellbatch.read import (
    Slide,
    discover_slides,
    iter_image_files,
    read_capture,
    read_frame,
    slide_frame_count,
    validate_slide,
)
from tests.badinput import EXPECTED_TEXT, synthetic_capture


def _frames(n: int = 3, height: int = 40, width: int = 48) -> np.ndarray:
    return np.stack([synthetic_capture(height=height, width=width, seed=s) for s in range(n)])


def _outcomes(src: Path) -> dict[str, tuple[str, str]]:
    """Read everything discovered below src the way a run would: key -> (outcome, reason or notes)."""
    seen: dict[str, tuple[str, str]] = {}
    for slide in discover_slides(src):
        try:
            validate_slide(slide)
        except CellbatchError as exc:
            seen[slide.name] = ("failed", str(exc))
            continue
        for index in range(slide_frame_count(slide)):
            key = slide.captures[index].relative_to(src).as_posix() if slide.kind == "dir" else f"{slide.name}[{index}]"
            try:
                capture = read_frame(slide, index)
            except CellbatchError as exc:
                seen[key] = ("failed", str(exc))
            else:
                seen[key] = ("converted" if capture.notes else "ok", "; ".join(capture.notes))
    return seen


def test_whole_corpus_ends_as_expected_with_one_line_reasons(corpus):
    folder, expected = corpus
    seen = _outcomes(folder)
    for key, outcome in expected.items():
        got, text = seen.get(key, ("ignored", ""))
        assert got == outcome, (key, text)
        assert EXPECTED_TEXT.get(key, "") in text, key
        assert "\n" not in text
    assert set(seen) <= set(expected)


def test_discovery_finds_folders_and_every_zarr_array_but_not_links_or_hidden(corpus):
    folder, _ = corpus
    names = [s.name for s in discover_slides(folder)]
    assert names == sorted(names)
    assert names == [
        "captures",
        "zarr_corrupt.zarr",
        "zarr_damaged_chunk.zarr",
        "zarr_group.zarr/slide 1",
        "zarr_group.zarr/sub/slide-2",
        "zarr_missing_chunk.zarr",
        "zarr_v2.zarr",
        "zarr_v3.zarr",
        "zarr_wrong_dtype.zarr",
        "zarr_wrong_rank.zarr",
    ]
    captures = {p.name for p in discover_slides(folder)[0].captures}
    assert "._good_0.png" not in captures and "notes.txt" not in captures
    assert {"loop.png", "dangling.jpg", "fifo.png", "linked_good.png"} <= captures


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_frames_read_back_exactly_from_v2_and_v3_stores(tmp_path, zarr_format):
    frames = _frames()
    store = tmp_path / "slide.zarr"
    zarr.create_array(
        store=str(store), shape=frames.shape, chunks=(1, 20, 24, 3), dtype="uint8", zarr_format=zarr_format
    )[:] = frames
    (slide,) = discover_slides(store)
    assert slide.name == "." and slide.kind == "zarr"
    validate_slide(slide)
    assert slide_frame_count(slide) == 3
    for index in range(3):
        image, notes = read_frame(slide, index)
        np.testing.assert_array_equal(image, frames[index])
        assert notes == ()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_frame_with_one_missing_spatial_chunk_fails_alone(tmp_path, zarr_format):
    frames = _frames()
    store = tmp_path / "slide.zarr"
    array = zarr.create_array(
        store=str(store), shape=frames.shape, chunks=(1, 20, 24, 3), dtype="uint8", zarr_format=zarr_format
    )
    array[:] = frames
    key = array.metadata.encode_chunk_key((2, 1, 1, 0))
    (store / key).unlink()
    (slide,) = discover_slides(store)
    read_frame(slide, 0)
    read_frame(slide, 1)
    with pytest.raises(InputFormatError, match="absent from the store") as info:
        read_frame(slide, 2)
    assert key in str(info.value)


def test_missing_shard_of_a_sharded_array_is_detected(tmp_path):
    frames = _frames(4)
    store = tmp_path / "sharded.zarr"
    array = zarr.create_array(
        store=str(store), shape=frames.shape, chunks=(1, 20, 24, 3), shards=(2, 40, 48, 3), dtype="uint8"
    )
    array[:] = frames
    (store / array.metadata.encode_chunk_key((1, 0, 0, 0))).unlink()
    (slide,) = discover_slides(store)
    np.testing.assert_array_equal(read_frame(slide, 1).image, frames[1])
    for index in (2, 3):
        with pytest.raises(InputFormatError, match="absent from the store"):
            read_frame(slide, index)


def test_frame_index_outside_the_array_is_a_programming_error(tmp_path):
    store = tmp_path / "slide.zarr"
    zarr.create_array(store=str(store), shape=(2, 40, 40, 3), dtype="uint8")[:] = 9
    (slide,) = discover_slides(store)
    with pytest.raises(IndexError):
        read_frame(slide, 2)


@pytest.mark.parametrize(
    ("shape", "dtype", "text"),
    [
        ((0, 40, 40, 3), "uint8", "no frames"),
        ((2, 8, 8, 3), "uint8", "too small"),
        ((2, 40, 40, 4), "uint8", "(N, H, W, 3)"),
        ((2, 40, 40, 3), "float32", "dtype float32"),
    ],
)
def test_unusable_zarr_array_fails_the_slide(tmp_path, shape, dtype, text):
    store = tmp_path / "slide.zarr"
    zarr.create_array(store=str(store), shape=shape, chunks=(1, *shape[1:]), dtype=dtype)
    (slide,) = discover_slides(store)
    with pytest.raises(InputFormatError) as info:
        validate_slide(slide)
    assert text in str(info.value) and "\n" not in str(info.value)


def test_group_with_a_corrupt_member_still_yields_a_failing_slide(tmp_path):
    store = tmp_path / "group.zarr"
    group = zarr.open_group(str(store), mode="w")
    group.create_array("good", shape=(1, 40, 40, 3), dtype="uint8")[:] = 5
    (store / "good" / "zarr.json").write_text("[1, 2")
    slides = discover_slides(tmp_path)
    assert [s.name for s in slides] == ["group.zarr"]
    with pytest.raises(InputFormatError, match="not a readable Zarr array"):
        validate_slide(slides[0])


def test_output_folder_inside_the_input_is_excluded(tmp_path):
    synthetic = tmp_path / "slide" / "a.png"
    synthetic.parent.mkdir()
    Image.fromarray(synthetic_capture(height=40, width=40)).save(synthetic)
    out = tmp_path / "out" / "slide"
    out.mkdir(parents=True)
    Image.fromarray(synthetic_capture(height=40, width=40)).save(out / "crop.png")
    assert [s.name for s in discover_slides(tmp_path)] == ["out/slide", "slide"]
    assert [s.name for s in discover_slides(tmp_path, exclude=[tmp_path / "out"])] == ["slide"]


def test_unlistable_folder_becomes_a_failing_slide(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", lambda path: scandir(path))
    (slide,) = discover_slides(tmp_path)
    assert slide.name == "locked" and slide.kind == "dir" and slide.captures == ()
    with pytest.raises(InputFormatError, match="cannot be listed: Permission denied"):
        validate_slide(slide)


def test_folder_symlink_loop_does_not_hang_discovery(tmp_path):
    (tmp_path / "slide").mkdir()
    Image.fromarray(synthetic_capture(height=40, width=40)).save(tmp_path / "slide" / "a.png")
    os.symlink("..", tmp_path / "slide" / "up", target_is_directory=True)
    os.symlink("loop", tmp_path / "loop")
    assert [s.name for s in discover_slides(tmp_path)] == ["slide"]
    assert [p.name for p in iter_image_files(tmp_path)] == ["a.png"]


def test_src_that_is_a_folder_symlink_is_followed(tmp_path):
    (tmp_path / "real").mkdir()
    Image.fromarray(synthetic_capture(height=40, width=40)).save(tmp_path / "real" / "a.png")
    os.symlink("real", tmp_path / "link", target_is_directory=True)
    (slide,) = discover_slides(tmp_path / "link")
    assert slide.name == "." and [p.name for p in slide.captures] == ["a.png"]


def test_bad_src_arguments_are_reported(tmp_path):
    with pytest.raises(InputNotFoundError):
        discover_slides(tmp_path / "absent")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(InputFormatError, match="neither a folder"):
        discover_slides(tmp_path / "file.png")


def test_directory_slide_frames_are_its_capture_files(corpus):
    folder, _ = corpus
    slide = discover_slides(folder)[0]
    assert slide_frame_count(slide) == len(slide.captures)
    index = [p.name for p in slide.captures].index("good_0.png")
    np.testing.assert_array_equal(read_frame(slide, index).image, read_capture(slide.captures[index]).image)


def test_empty_directory_slide_says_it_has_no_captures(tmp_path):
    with pytest.raises(InputFormatError, match="holds no capture files"):
        validate_slide(Slide(tmp_path, ".", "dir"))


def test_giant_zarr_frame_is_refused_even_without_validation(tmp_path):
    store = tmp_path / "giant.zarr"
    zarr.create_array(store=str(store), shape=(1, 100_000, 100_000, 3), chunks=(1, 1000, 1000, 3), dtype="uint8")
    (slide,) = discover_slides(store)
    for check in (validate_slide, lambda s: read_frame(s, 0)):
        with pytest.raises(InputFormatError, match="megapixel limit"):
            check(slide)
