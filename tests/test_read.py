"""Reading capture files: good formats round-trip, bad files fail with one line, conversions are noted."""

from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellbatch.errors import InputFormatError, InputNotFoundError
from cellbatch.read import (
    NOTE_16BIT,
    NOTE_ALPHA,
    NOTE_GRAYSCALE,
    Capture,
    ReadLimits,
    as_rgb8,
    convert_to_rgb8,
    read_capture,
    read_image,
)
from tests.badinput import EXPECTED_TEXT, synthetic_capture

_CAPTURE_CASES = sorted(k for k in EXPECTED_TEXT if k.startswith("captures/"))


@pytest.mark.parametrize("key", _CAPTURE_CASES)
def test_bad_or_odd_capture_fails_with_one_line_or_is_converted_with_a_note(corpus, key):
    folder, expected = corpus
    if expected[key] == "converted":
        capture = read_capture(folder / key)
        assert capture.image.dtype == np.uint8 and capture.image.ndim == 3 and capture.image.shape[2] == 3
        assert any(EXPECTED_TEXT[key] in note for note in capture.notes)
        return
    assert expected[key] == "failed"
    with pytest.raises((InputFormatError, InputNotFoundError)) as info:
        read_capture(folder / key)
    message = str(info.value)
    assert "\n" not in message
    assert str(folder / key) in message
    assert EXPECTED_TEXT[key] in message


def test_every_good_capture_in_the_corpus_reads_without_notes(corpus):
    folder, expected = corpus
    good = [k for k, v in expected.items() if v == "ok" and k.startswith("captures/")]
    assert len(good) >= 12
    for key in good:
        capture = read_capture(folder / key)
        assert capture.notes == ()
        assert capture.image.shape == (240, 320, 3)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_round_trip_exactly(tmp_path, fmt):
    image = synthetic_capture(height=48, width=64)
    path = tmp_path / f"capture.{fmt.lower()}"
    if fmt == "TIFF":
        tifffile.imwrite(path, image)
    else:
        Image.fromarray(image).save(path, fmt)
    capture = read_capture(path)
    assert isinstance(capture, Capture)
    np.testing.assert_array_equal(capture.image, image)
    np.testing.assert_array_equal(read_image(path), image)


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_is_read_whether_baseline_or_progressive(tmp_path, progressive):
    image = synthetic_capture(height=48, width=64)
    path = tmp_path / "capture.jpg"
    Image.fromarray(image).save(path, "JPEG", quality=95, progressive=progressive)
    decoded = read_image(path)
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image).mean() < 4


def test_planar_rgb_tiff_is_reordered_to_pixels_last(tmp_path):
    image = synthetic_capture(height=48, width=64)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(image, 2, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(path), image)


def test_grayscale_is_copied_to_three_equal_channels(tmp_path):
    gray = synthetic_capture(height=48, width=64)[..., 1]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    capture = read_capture(tmp_path / "gray.png")
    assert capture.notes == (NOTE_GRAYSCALE,)
    for channel in range(3):
        np.testing.assert_array_equal(capture.image[..., channel], gray)


def test_full_range_16bit_keeps_the_high_byte(tmp_path):
    image = synthetic_capture(height=48, width=64)
    tifffile.imwrite(tmp_path / "rgb16.tif", image.astype(np.uint16) * 257 + 3)
    capture = read_capture(tmp_path / "rgb16.tif")
    assert capture.notes == (NOTE_16BIT,)
    np.testing.assert_array_equal(capture.image, image)


def test_sixteen_bit_png_colour_is_noted(tmp_path):
    import cv2

    image = synthetic_capture(height=48, width=64)
    cv2.imwrite(str(tmp_path / "rgb16.png"), image[..., ::-1].astype(np.uint16) * 257)
    capture = read_capture(tmp_path / "rgb16.png")
    assert capture.notes == (NOTE_16BIT,)
    np.testing.assert_array_equal(capture.image, image)


def test_twelve_bit_png_colour_is_refused(tmp_path):
    import cv2

    image = synthetic_capture(height=48, width=64)
    cv2.imwrite(str(tmp_path / "rgb12.png"), image[..., ::-1].astype(np.uint16) * 16)
    with pytest.raises(InputFormatError, match="at most 12-bit"):
        read_capture(tmp_path / "rgb12.png")


@pytest.mark.parametrize(
    ("shape", "notes"),
    [
        ((40, 40), (NOTE_GRAYSCALE,)),
        ((40, 40, 1), (NOTE_GRAYSCALE,)),
        ((40, 40, 2), (NOTE_ALPHA, NOTE_GRAYSCALE)),
        ((40, 40, 3), ()),
        ((40, 40, 4), (NOTE_ALPHA,)),
    ],
)
def test_convert_to_rgb8_accepts_gray_and_alpha_layouts(shape, notes):
    image = np.full(shape, 200, np.uint8)
    capture = convert_to_rgb8(image)
    assert capture.image.shape == (40, 40, 3)
    assert capture.image.flags.c_contiguous
    assert capture.notes == notes
    np.testing.assert_array_equal(as_rgb8(image, "x"), capture.image)


@pytest.mark.parametrize(
    ("image", "text"),
    [
        (np.zeros((40, 40, 3), np.float32), "float32"),
        (np.zeros((40, 40, 3), bool), "bool"),
        (np.zeros((40, 40, 3), np.int16), "int16"),
        (np.zeros((40, 40, 5), np.uint8), "shape"),
        (np.zeros((2, 40, 40, 3), np.uint8), "shape"),
        (np.full((40, 40, 3), 4095, np.uint16), "at most 12-bit"),
    ],
)
def test_convert_to_rgb8_refuses_other_layouts(image, text):
    with pytest.raises(InputFormatError, match=text):
        convert_to_rgb8(image, where="frame 3")


def test_big_endian_16bit_is_converted_like_native():
    native = np.full((40, 40, 3), 0xAB12, np.uint16)
    capture = convert_to_rgb8(native.astype(">u2"))
    assert (capture.image == 0xAB).all()


def test_limits_are_configurable(tmp_path):
    Image.fromarray(synthetic_capture(height=48, width=64)).save(tmp_path / "c.png")
    with pytest.raises(InputFormatError, match="too small"):
        read_capture(tmp_path / "c.png", limits=ReadLimits(min_side=50))
    with pytest.raises(InputFormatError, match="megapixel limit"):
        read_capture(tmp_path / "c.png", limits=ReadLimits(max_pixels=1000))


@pytest.mark.parametrize("name", ["huge_header.png", "huge_header.bmp", "huge_header.jpg", "huge_header.tif"])
def test_giant_header_is_refused_without_allocating(corpus, name):
    folder, _ = corpus
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InputFormatError, match="megapixel limit"):
            read_capture(folder / "captures" / name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000
    assert time.perf_counter() - start < 1.0


def test_jpeg_whose_scan_starts_before_any_frame_header_is_refused(tmp_path):
    path = tmp_path / "nosof.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + struct.pack(">H", 4) + b"JF" + b"\xff\xda\x00\x02" + b"\x00" * 64)
    with pytest.raises(InputFormatError, match="no frame header"):
        read_capture(path)


@pytest.mark.timeout(10)
def test_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputFormatError, match="named pipe"):
        read_capture(tmp_path / "pipe.png")


def test_missing_file_and_folder_are_reported(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        read_capture(tmp_path / "absent.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InputFormatError, match="a folder"):
        read_capture(tmp_path / "dir.png")


def test_symlink_to_a_good_capture_is_followed(corpus):
    folder, expected = corpus
    assert expected["captures/linked_good.png"] == "ok"
    np.testing.assert_array_equal(
        read_image(folder / "captures" / "linked_good.png"), read_image(folder / "captures" / "good_0.png")
    )


def test_names_with_spaces_and_non_ascii_characters_are_read(tmp_path):
    image = synthetic_capture(height=48, width=64)
    for name in ["slide 1 é.png", "日本語 capture.png", "tab\there.png"]:
        Image.fromarray(image).save(tmp_path / name)
        np.testing.assert_array_equal(read_image(tmp_path / name), image)


def test_damaged_png_chunk_is_refused_not_crashed(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(synthetic_capture(height=48, width=64)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[60:80] = b"\xff" * 20  # inside the image data: zlib stream and CRC no longer match
    (tmp_path / "damaged.png").write_bytes(bytes(data))
    with pytest.raises(InputFormatError) as info:
        read_capture(tmp_path / "damaged.png")
    assert "\n" not in str(info.value)


def test_tiff_needing_a_missing_codec_says_which_package(tmp_path):
    if 5 in tifffile.TIFF.DECOMPRESSORS:
        pytest.skip("imagecodecs is installed, so LZW decodes")
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, synthetic_capture(height=48, width=64))
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages.first.tags["Compression"].valueoffset
    data = bytearray(path.read_bytes())
    data[offset : offset + 2] = (5).to_bytes(2, "little")  # claim LZW
    path.write_bytes(bytes(data))
    with pytest.raises(InputFormatError, match="compressed with LZW.*imagecodecs"):
        read_capture(path)


def test_reason_stays_one_line_for_names_with_control_characters(tmp_path):
    path = tmp_path / "new\nline\x1b.png"
    path.write_bytes(b"")
    with pytest.raises(InputFormatError, match="empty") as info:
        read_capture(path)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert "new\\nline\\x1b.png" in str(info.value)
