"""A corpus of bad (and some good) inputs, for reader tests and end-to-end run tests.

:func:`make_bad_corpus` writes, below one folder, every input problem cellbatch must survive and
returns what should become of each: ``"ok"`` (read as it is), ``"converted"`` (read, with a note),
``"failed"`` (a failed capture, frame or slide with a one-line reason) or ``"ignored"`` (never
discovered). :data:`EXPECTED_TEXT` gives, for many of them, a fragment of the reason or note.

Keys are POSIX paths relative to the corpus folder: a capture file (``"captures/empty.png"``), a
Zarr slide (``"zarr_wrong_dtype.zarr"``, ``"zarr_group.zarr/slide 1"``) or one frame of a Zarr slide
(``"zarr_missing_chunk.zarr[1]"``). See docs/robustness.md for the decision behind each outcome.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import zarr
from PIL import Image

CAPTURES = "captures"
ZARR_FRAMES = 3

# Fragment of the reason (failed) or note (converted) for each case, as relative key -> text.
EXPECTED_TEXT = {
    "captures/empty.png": "empty (0 bytes)",
    "captures/truncated.jpg": "truncated",
    "captures/truncated.png": "truncated",
    "captures/truncated.bmp": "truncated",
    "captures/truncated.tif": "truncated",
    "captures/text.bmp": "not a PNG, JPEG, BMP or TIFF",
    "captures/tiny.png": "too small",
    "captures/huge_header.png": "megapixel limit",
    "captures/huge_header.bmp": "megapixel limit",
    "captures/huge_header.jpg": "megapixel limit",
    "captures/huge_header.tif": "megapixel limit",
    "captures/cmyk.jpg": "colour mode CMYK",
    "captures/float32.tif": "float32",
    "captures/multipage.tif": "2 pages",
    "captures/rgb12_in_16.tif": "at most 12-bit",
    "captures/loop.png": "symlink loop",
    "captures/dangling.jpg": "broken symlink",
    "captures/fifo.png": "named pipe",
    "captures/gray.png": "converted from grayscale",
    "captures/gray16.png": "16-bit",
    "captures/rgba.png": "dropped alpha",
    "captures/palette.png": "palette",
    "captures/rgb16.tif": "16-bit",
    "zarr_missing_chunk.zarr[1]": "absent from the store",
    "zarr_damaged_chunk.zarr[1]": "could not be decoded",
    "zarr_wrong_dtype.zarr": "dtype uint16",
    "zarr_wrong_rank.zarr": "(N, H, W, 3)",
    "zarr_corrupt.zarr": "not a readable Zarr array",
}


def synthetic_capture(*, height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    """A pale (H, W, 3) uint8 field with one purple cell (light disc, dark nucleus) near the centre."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal((232, 226, 220), 3, (height, width, 3)), 0, 255)
    yy, xx = np.mgrid[:height, :width]
    cy, cx = height // 2 + int(rng.integers(-10, 11)), width // 2 + int(rng.integers(-10, 11))
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    image[r2 < 30**2] = (200, 170, 210)
    image[r2 < 14**2] = (90, 40, 120)
    return image.astype(np.uint8)


def make_bad_corpus(
    folder: Path, *, good: Sequence[np.ndarray] | None = None, special_files: bool = True
) -> dict[str, str]:
    """Write the bad-input corpus below ``folder`` and return each case's expected outcome.

    Parameters
    ----------
    folder : Path
        Created if needed; should be empty.
    good : sequence of (H, W, 3) uint8 arrays, optional
        Good captures, all one shape, at least 32x32 (default: three :func:`synthetic_capture`).
        They are written in each format, used as Zarr frames and turned into the converted cases.
    special_files : bool
        Also write a named pipe (``captures/fifo.png``), which some file systems do not allow.

    Returns
    -------
    dict of str to str
        Relative key -> ``"ok"``, ``"converted"``, ``"failed"`` or ``"ignored"``.
    """
    images = list(good) if good is not None else [synthetic_capture(seed=s) for s in range(3)]
    if not images or any(i.shape != images[0].shape or i.dtype != np.uint8 for i in images):
        raise ValueError("good captures must be non-empty, (H, W, 3) uint8 and all one shape")
    base = images[0]
    captures = folder / CAPTURES
    captures.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, str] = {}

    def put(name: str, data: bytes, result: str) -> None:
        (captures / name).write_bytes(data)
        outcome[f"{CAPTURES}/{name}"] = result

    for i, image in enumerate(images):
        for fmt in ("png", "jpg", "bmp", "tif"):
            put(f"good_{i}.{fmt}", _encode(image, fmt), "ok")
    put("name with spaces é.png", _encode(base, "png"), "ok")
    put("日本語 capture.png", _encode(base, "png"), "ok")
    put("misnamed_png.jpg", _encode(base, "png"), "ok")  # decoded by content, not by name

    put("empty.png", b"", "failed")
    for fmt in ("jpg", "png", "bmp", "tif"):
        data = _encode(base, fmt)
        put(f"truncated.{fmt}", data[: len(data) * 6 // 10], "failed")
    put("text.bmp", b"this is a note someone saved with the wrong name\n", "failed")
    put("tiny.png", _encode(base[:1, :1], "png"), "failed")
    put("huge_header.png", _png_claiming(100_000, 100_000), "failed")
    put("huge_header.bmp", _bmp_claiming(100_000, 100_000), "failed")
    put("huge_header.jpg", _jpeg_claiming(65_535, 65_535), "failed")  # JPEG cannot state more
    put("huge_header.tif", _tiff_claiming(100_000, 100_000), "failed")
    put("cmyk.jpg", _pil_bytes(Image.fromarray(base).convert("CMYK"), "JPEG"), "failed")
    put("float32.tif", _tiff_bytes(base.astype(np.float32)), "failed")
    put("multipage.tif", _tiff_bytes(np.stack([base, base])), "failed")
    put("rgb12_in_16.tif", _tiff_bytes(base.astype(np.uint16) * 16), "failed")

    gray = (base.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])).astype(np.uint8)
    put("gray.png", _encode(gray, "png"), "converted")
    put("gray16.png", _pil_bytes(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), "converted")
    alpha = np.full(base.shape[:2] + (1,), 255, np.uint8)
    put("rgba.png", _encode(np.concatenate([base, alpha], axis=2), "png"), "converted")
    put("palette.png", _pil_bytes(Image.fromarray(base).convert("P"), "PNG"), "converted")
    put("rgb16.tif", _tiff_bytes(base.astype(np.uint16) * 257), "converted")

    os.symlink("loop.png", captures / "loop.png")
    outcome[f"{CAPTURES}/loop.png"] = "failed"
    os.symlink("nowhere.jpg", captures / "dangling.jpg")
    outcome[f"{CAPTURES}/dangling.jpg"] = "failed"
    os.symlink("good_0.png", captures / "linked_good.png")
    outcome[f"{CAPTURES}/linked_good.png"] = "ok"
    if special_files:
        os.mkfifo(captures / "fifo.png")
        outcome[f"{CAPTURES}/fifo.png"] = "failed"

    put("notes.txt", b"not a capture\n", "ignored")
    put("._good_0.png", b"\x00\x05\x16\x07 macOS resource fork", "ignored")
    hidden = folder / ".hidden"
    hidden.mkdir(exist_ok=True)
    (hidden / "good.png").write_bytes(_encode(base, "png"))
    outcome[".hidden/good.png"] = "ignored"
    os.symlink(CAPTURES, folder / "linked_dir", target_is_directory=True)
    outcome["linked_dir"] = "ignored"

    outcome.update(_zarr_cases(folder, np.stack([images[i % len(images)] for i in range(ZARR_FRAMES)])))
    os.symlink("zarr_v3.zarr", folder / "linked_store.zarr", target_is_directory=True)
    outcome["linked_store.zarr"] = "ignored"
    return outcome


def _zarr_cases(folder: Path, frames: np.ndarray) -> dict[str, str]:
    outcome: dict[str, str] = {}
    chunks = (1, *frames.shape[1:])

    def frames_ok(name: str) -> None:
        outcome.update({f"{name}[{i}]": "ok" for i in range(len(frames))})

    for fmt in (2, 3):
        array = zarr.create_array(
            store=str(folder / f"zarr_v{fmt}.zarr"),
            shape=frames.shape,
            chunks=chunks,
            dtype="uint8",
            zarr_format=fmt,
        )
        array[:] = frames
        frames_ok(f"zarr_v{fmt}.zarr")

    group = zarr.open_group(str(folder / "zarr_group.zarr"), mode="w")
    group.create_array("slide 1", shape=frames.shape, chunks=chunks, dtype="uint8")[:] = frames
    group.create_group("sub").create_array("slide-2", shape=frames.shape, chunks=chunks, dtype="uint8")[:] = (
        frames
    )
    frames_ok("zarr_group.zarr/slide 1")
    frames_ok("zarr_group.zarr/sub/slide-2")

    missing = zarr.create_array(
        store=str(folder / "zarr_missing_chunk.zarr"), shape=frames.shape, chunks=chunks, dtype="uint8"
    )
    missing[:] = frames
    (folder / "zarr_missing_chunk.zarr" / missing.metadata.encode_chunk_key((1, 0, 0, 0))).unlink()
    frames_ok("zarr_missing_chunk.zarr")
    outcome["zarr_missing_chunk.zarr[1]"] = "failed"

    damaged = zarr.create_array(
        store=str(folder / "zarr_damaged_chunk.zarr"), shape=frames.shape, chunks=chunks, dtype="uint8"
    )
    damaged[:] = frames
    (folder / "zarr_damaged_chunk.zarr" / damaged.metadata.encode_chunk_key((1, 0, 0, 0))).write_bytes(b"garbage")
    frames_ok("zarr_damaged_chunk.zarr")
    outcome["zarr_damaged_chunk.zarr[1]"] = "failed"

    wide = zarr.create_array(
        store=str(folder / "zarr_wrong_dtype.zarr"), shape=frames.shape, chunks=chunks, dtype="uint16"
    )
    wide[:] = frames.astype(np.uint16) * 257
    outcome["zarr_wrong_dtype.zarr"] = "failed"
    flat = zarr.create_array(
        store=str(folder / "zarr_wrong_rank.zarr"), shape=frames.shape[:3], chunks=chunks[:3], dtype="uint8"
    )
    flat[:] = frames[..., 0]
    outcome["zarr_wrong_rank.zarr"] = "failed"
    (folder / "zarr_corrupt.zarr").mkdir()
    (folder / "zarr_corrupt.zarr" / "zarr.json").write_text("{this is not json")
    outcome["zarr_corrupt.zarr"] = "failed"
    return outcome


def _encode(image: np.ndarray, fmt: str) -> bytes:
    if fmt == "tif":
        return _tiff_bytes(image)
    return _pil_bytes(Image.fromarray(image), {"png": "PNG", "jpg": "JPEG", "bmp": "BMP"}[fmt])


def _pil_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _tiff_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    photometric = "rgb" if image.ndim >= 3 and image.shape[-1] == 3 else "minisblack"
    tifffile.imwrite(buffer, image, photometric=photometric)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _bmp_claiming(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 64, 0, 0, 14 + len(info)) + info + b"\x00" * 64


def _jpeg_claiming(width: int, height: int) -> bytes:
    frame = struct.pack(">BHHB", 8, height, width, 3) + b"".join(bytes([c, 0x11, 0]) for c in (1, 2, 3))
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(frame) + 2) + frame + b"\xff\xd9"


def _tiff_claiming(width: int, height: int) -> bytes:
    """A little-endian baseline RGB TIFF whose tags claim ``width`` x ``height``, with 8 bytes of data."""
    tags = [  # (tag, type, count, value); type 3 = SHORT, 4 = LONG
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, 0),  # BitsPerSample: offset patched below
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, 0),  # StripOffsets: patched below
        (277, 3, 1, 3),
        (278, 4, 1, height),
        (279, 4, 1, 8),
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    bits_offset = 8 + ifd_size
    data_offset = bits_offset + 6
    entries = b""
    for tag, kind, count, value in tags:
        if tag == 258:
            value = bits_offset
        elif tag == 273:
            value = data_offset
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 and count == 1 else struct.pack("<I", value)
        entries += struct.pack("<HHI", tag, kind, count) + packed
    ifd = struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<HHH", 8, 8, 8) + b"\x00" * 8
