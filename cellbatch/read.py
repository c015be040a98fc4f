"""Find slides in the inputs and decode their captures, refusing bad input with a one-line reason.

A slide is one directory of capture files, one Zarr array (N, H, W, 3) uint8, or one OME-Zarr image
(a plate or well: one per field of view; see :mod:`cellbatch.omezarr`). Directories are walked
recursively; a Zarr store (v2 or v3) is recognised by its metadata file and may be one array or a
group of arrays, nested groups allowed.

Every input problem ends as :class:`~cellbatch.errors.InputFormatError` or
:class:`~cellbatch.errors.InputNotFoundError` with one line naming the file and the problem, or as a
conversion recorded in :attr:`Capture.notes`. Image sizes are read from the file header before any
pixel is decoded, so a header that claims a giant image costs nothing. ``docs/robustness.md`` holds the
full decision table.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import math
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

import numpy as np

from cellbatch.errors import CellbatchError, InputFormatError, InputNotFoundError

if TYPE_CHECKING:
    import zarr

IMAGE_SUFFIXES = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")

NOTE_GRAYSCALE = "converted from grayscale"
NOTE_ALPHA = "dropped alpha channel"
NOTE_PALETTE = "converted from palette colours"
NOTE_16BIT = "converted from 16-bit by keeping the high byte (value >> 8)"

# A 16-bit image whose brightest value is below this holds at most 12-bit data (common for camera
# sensors); keeping its high byte would leave values 0-15, a black image that silently finds no cells.
_MIN_16BIT_PEAK = 4096


@dataclass(frozen=True)
class ReadLimits:
    """Sizes a capture must have.

    Parameters
    ----------
    min_side : int
        Smallest accepted width and height in pixels; a white cell at 0.1 µm/px spans about 100 px,
        so anything much smaller cannot hold one.
    max_pixels : int
        Largest accepted width x height. Checked from the file header before decoding, so a file
        that claims 100000 x 100000 pixels is refused without allocating its pixels.
    max_file_bytes : int
        Largest accepted capture file. A capture is read into memory once, hashed and decoded from
        there (so provenance names exactly the bytes decoded); this bounds that read.
    max_frames : int
        Most frames one Zarr slide may declare: a slide's plan holds one entry per frame, so a store
        that declares 10^12 frames must be refused before any is listed.
    max_chunk_bytes : int
        Largest decoded Zarr chunk: reading one frame decodes its whole chunk, so one 480x640 frame
        stored in a 20000x20000 chunk would cost 1.2 GB.
    """

    min_side: int = 32
    max_pixels: int = 100_000_000
    max_file_bytes: int = 1 << 30
    max_frames: int = 1_000_000
    max_chunk_bytes: int = 256 << 20


DEFAULT_LIMITS = ReadLimits()


class Capture(NamedTuple):
    """One decoded capture: (H, W, 3) uint8 RGB and the conversions applied to get it.

    ``notes`` is empty for a capture used as it is; otherwise each entry names one conversion
    (e.g. ``"converted from grayscale"``) for the provenance record.
    """

    image: np.ndarray
    notes: tuple[str, ...]


@dataclass(frozen=True)
class Slide:
    """One unit of work: a folder of capture files, one Zarr array or one OME-Zarr image.

    ``name`` is the slide's path relative to its input root (POSIX form; ``"."`` for the root
    itself); it names the slide's output folder. ``captures`` lists the capture files (directory
    slides) and is empty for Zarr slides, whose frames are read by index from ``array_path``.
    A directory slide with no captures is a folder that could not be listed; :func:`validate_slide`
    says why.

    ``axes`` is empty for a plain (N, H, W, 3) array; for an OME-Zarr image it gives each dimension's
    role from the metadata (``y``, ``x``, ``c`` channels, ``f`` frames: every index of a time, z or
    other axis is one capture), e.g. ``"cyx"``. ``problem`` is set for an OME-Zarr image whose
    metadata cannot be used; :func:`validate_slide` fails the slide with it.
    """

    root: Path
    name: str
    kind: str  # "dir" or "zarr"
    captures: tuple[Path, ...] = ()
    store: Path | None = None
    array_path: str = ""
    axes: str = ""
    problem: str = ""


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has a capture file suffix (the content is checked only when it is read)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_zarr_store(path: Path) -> bool:
    """Whether ``path`` is a folder holding Zarr v2 or v3 metadata at its top."""
    return path.is_dir() and any((path / m).is_file() for m in ZARR_MARKERS)


# --- capture files -------------------------------------------------------------------------------


def read_image(path: str | Path, *, limits: ReadLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode one capture file to (H, W, 3) uint8 RGB; see :func:`read_capture` for the notes."""
    return read_capture(path, limits=limits).image


def read_capture(path: str | Path, *, limits: ReadLimits = DEFAULT_LIMITS) -> Capture:
    """Decode one capture file (PNG, JPEG, BMP or TIFF, recognised by content) to RGB uint8.

    Parameters
    ----------
    path : str or Path
        The capture file. Symlinks are followed.
    limits : ReadLimits
        Accepted image sizes, checked from the header before decoding.

    Returns
    -------
    Capture
        ``image`` (H, W, 3) uint8 RGB and ``notes``, the conversions applied (grayscale, alpha,
        palette, 16-bit).

    Raises
    ------
    InputNotFoundError
        The file or a symlink's target does not exist.
    InputFormatError
        Anything else that makes the file unusable, with a one-line reason.

    Examples
    --------
    >>> capture = read_capture("slide1/cell_001.jpg")  # doctest: +SKIP
    >>> capture.image.shape, capture.notes  # doctest: +SKIP
    ((480, 640, 3), ())
    """
    path = Path(path)
    return decode_capture(read_capture_bytes(path, limits=limits), where=display_path(path), limits=limits)


def read_capture_bytes(path: str | Path, *, limits: ReadLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of one capture file, read once (hash them, then :func:`decode_capture` them).

    Raises
    ------
    InputNotFoundError
        The file or a symlink's target does not exist.
    InputFormatError
        Not a regular file, empty, larger than ``limits.max_file_bytes``, or unreadable.
    """
    path = Path(path)
    where = display_path(path)
    with _open_regular_file(path, where) as fh:
        try:
            # checked before the read (and after, for a file that grew meanwhile): no giant buffer
            data = b"" if os.fstat(fh.fileno()).st_size > limits.max_file_bytes else fh.read()
        except OSError as exc:
            raise InputFormatError(f"{where} could not be read: {_one_line(exc)}") from exc
    if not data or len(data) > limits.max_file_bytes:
        raise InputFormatError(
            f"{where} is larger than {limits.max_file_bytes / 2**20:g} MiB; a capture is about 1 MB: "
            "remove it from the input"
        )
    return data


def decode_capture(data: bytes, *, where: str = "capture", limits: ReadLimits = DEFAULT_LIMITS) -> Capture:
    """Decode a capture file's bytes (PNG, JPEG, BMP or TIFF, recognised by content) to RGB uint8.

    ``where`` names the capture in error messages. See :func:`read_capture` for what is refused.
    """
    fh = io.BytesIO(data)
    try:
        head = fh.read(16)
        kind = _sniff(head)
        if kind is None:
            raise InputFormatError(
                f"{where} is not a PNG, JPEG, BMP or TIFF image (it starts with {head[:8]!r}): "
                "remove it from the input or re-export it"
            )
        if kind == "TIFF":
            image, notes = _decode_tiff(fh, where, limits)
        else:
            width, height, bits = _HEADER_READERS[kind](fh, where)
            _check_size(width, height, where, limits)
            image, notes = _decode_pillow(fh, kind, bits, where)
    except CellbatchError:
        raise
    except (OSError, EOFError, struct.error) as exc:
        raise InputFormatError(f"{where} could not be read: {_one_line(exc)}") from exc
    rgb, more = _convert_to_rgb8(image, where)
    return Capture(rgb, (*notes, *more))


def convert_to_rgb8(image: np.ndarray, *, where: str = "image") -> Capture:
    """Convert a decoded image to (H, W, 3) uint8 RGB, noting each conversion.

    Accepts (H, W) or (H, W, 1) grayscale, (H, W, 2) grayscale + alpha, (H, W, 3) RGB and
    (H, W, 4) RGBA, each uint8 or full-range uint16 (the high byte is kept).

    Raises
    ------
    InputFormatError
        Any other dtype or shape, or 16-bit data that uses only 12 bits or fewer.
    """
    rgb, notes = _convert_to_rgb8(image, where)
    return Capture(rgb, tuple(notes))


def as_rgb8(image: np.ndarray, where: str) -> np.ndarray:
    """Return :func:`convert_to_rgb8`'s image only, for callers that keep no provenance."""
    return convert_to_rgb8(image, where=where).image


def _convert_to_rgb8(image: np.ndarray, where: str) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    if not image.dtype.isnative:  # Pillow gives big-endian arrays for "I;16B" images
        image = image.astype(image.dtype.newbyteorder("="))
    if image.dtype == np.uint16:
        peak = int(image.max()) if image.size else 0
        if peak < _MIN_16BIT_PEAK:
            raise InputFormatError(_low_16bit_reason(where, peak))
        image = (image >> 8).astype(np.uint8)
        notes.append(NOTE_16BIT)
    elif image.dtype != np.uint8:
        raise InputFormatError(
            f"{where} has pixel type {image.dtype}; captures must be 8-bit RGB: convert it to 8-bit"
        )
    if image.ndim == 2:
        image = image[..., np.newaxis]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise InputFormatError(f"{where} has shape {image.shape}, not (H, W, 3) RGB")
    channels = image.shape[2]
    if channels in (2, 4):
        image = image[..., : channels - 1]
        notes.append(NOTE_ALPHA)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
        notes.append(NOTE_GRAYSCALE)
    return np.ascontiguousarray(image), notes


def display_path(path: str | os.PathLike[str]) -> str:
    r"""``path`` as text fit for a one-line message: control characters and undecodable bytes escaped.

    Spaces and non-ASCII letters are kept; a newline in a file name would otherwise split the
    message, and an undecodable byte (a lone surrogate in Python) cannot be written as UTF-8.

    Examples
    --------
    >>> display_path("slide é/new\nline.png")
    'slide é/new\\nline.png'
    """
    text = os.fspath(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _low_16bit_reason(where: str, peak: int) -> str:
    return (
        f"{where} is 16-bit but its brightest value is {peak} (at most 12-bit data): keeping the high "
        "byte would make it black; convert it to 8-bit RGB with the right scaling"
    )


def _open_regular_file(path: Path, where: str) -> IO[bytes]:
    # O_NONBLOCK: opening a FIFO named like a capture must not wait for a writer forever; it is
    # refused below as not a regular file. fstat on the open descriptor avoids a check-then-open race.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        if path.is_symlink():
            raise InputNotFoundError(
                f"{where} is a broken symlink to {display_path(os.readlink(path))}: fix or remove the link"
            ) from exc
        raise InputNotFoundError(f"{where} does not exist") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputFormatError(f"{where} is a symlink loop: fix or remove the link") from exc
        raise InputFormatError(f"{where} cannot be opened: {exc.strerror}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InputFormatError(f"{where} is not a regular file ({_file_kind(info.st_mode)}): remove it")
    if info.st_size == 0:
        os.close(fd)
        raise InputFormatError(f"{where} is empty (0 bytes): re-export the capture")
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def _sniff(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def _check_size(width: int, height: int, where: str, limits: ReadLimits) -> None:
    if width * height > limits.max_pixels:
        raise InputFormatError(
            f"{where} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), above the "
            f"{limits.max_pixels / 1e6:g} megapixel limit: captures are 640x480; crop or downscale it"
        )
    if min(width, height) < limits.min_side:
        raise InputFormatError(
            f"{where} is {width}x{height} pixels, too small for a cell "
            f"(minimum {limits.min_side}x{limits.min_side})"
        )


def _png_header(fh: IO[bytes], where: str) -> tuple[int, int, int]:
    fh.seek(8)
    chunk = fh.read(25)
    if len(chunk) < 25 or chunk[4:8] != b"IHDR":
        raise InputFormatError(f"{where} is a truncated or damaged PNG (no IHDR header): re-export it")
    width, height, bits = struct.unpack(">IIB", chunk[8:17])
    return width, height, bits


def _bmp_header(fh: IO[bytes], where: str) -> tuple[int, int, int]:
    fh.seek(14)
    dib = fh.read(12)
    if len(dib) < 8:
        raise InputFormatError(f"{where} is a truncated BMP (header cut short): re-export it")
    (size,) = struct.unpack("<I", dib[:4])
    if size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit dimensions
        width, height = struct.unpack("<HH", dib[4:8])
    elif len(dib) == 12:
        width, height = struct.unpack("<ii", dib[4:12])
    else:
        raise InputFormatError(f"{where} is a truncated BMP (header cut short): re-export it")
    # a negative height marks a top-down bitmap
    return abs(width), abs(height), 8


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# markers without a length field
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _jpeg_header(fh: IO[bytes], where: str) -> tuple[int, int, int]:
    truncated = InputFormatError(f"{where} is a truncated or damaged JPEG (no frame header): re-export it")
    fh.seek(2)
    while True:
        byte = fh.read(1)
        if not byte:
            raise truncated
        if byte != b"\xff":
            continue
        marker = fh.read(1)
        while marker == b"\xff":  # fill bytes
            marker = fh.read(1)
        if not marker:
            raise truncated
        code = marker[0]
        if code in _JPEG_STANDALONE:
            continue
        if code in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            raise truncated
        length_bytes = fh.read(2)
        if len(length_bytes) < 2:
            raise truncated
        (length,) = struct.unpack(">H", length_bytes)
        if code in _JPEG_SOF:
            frame = fh.read(5)
            if len(frame) < 5:
                raise truncated
            precision, height, width = struct.unpack(">BHH", frame)
            if height == 0:
                raise InputFormatError(
                    f"{where} is a JPEG whose height is set only at the end (DNL marker), "
                    "which is not supported: re-export it"
                )
            return width, height, precision
        fh.seek(length - 2, os.SEEK_CUR)


_HEADER_READERS = {"PNG": _png_header, "BMP": _bmp_header, "JPEG": _jpeg_header}

# Pillow modes accepted as they are or converted by _convert_to_rgb8; every other mode (CMYK, YCbCr,
# 1-bit, 32-bit integer, float) would be misread as RGB channels or is meaningless for a stained cell.
_PILLOW_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "I;16", "I;16B", "I;16L", "I;16N"})


def _decode_pillow(fh: IO[bytes], kind: str, bits: int, where: str) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    notes: list[str] = []
    fh.seek(0)
    try:
        with Image.open(fh, formats=[kind]) as im:
            if im.mode not in _PILLOW_MODES:
                raise InputFormatError(
                    f"{where} has colour mode {im.mode}; captures must be RGB: convert it to 8-bit RGB"
                )
            im.load()
            if im.mode in ("P", "PA"):
                transparent = im.mode == "PA" or "transparency" in im.info
                converted = im.convert("RGBA" if transparent else "RGB")
                notes.append(NOTE_PALETTE)
                image = np.asarray(converted)
            else:
                image = np.asarray(im)
    except CellbatchError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... for damaged files
        raise InputFormatError(f"{where} is truncated or damaged ({_one_line(exc)}): re-export it") from exc
    if kind == "PNG" and bits == 16 and image.dtype == np.uint8:
        # Pillow already kept the high byte of 16-bit colour PNGs; apply the same rule as for
        # uint16 arrays so a 12-bit image is refused rather than turned black.
        peak = int(image.max()) << 8
        if peak < _MIN_16BIT_PEAK:
            raise InputFormatError(_low_16bit_reason(where, peak))
        notes.append(NOTE_16BIT)
    return image, notes


def _decode_tiff(fh: IO[bytes], where: str, limits: ReadLimits) -> tuple[np.ndarray, list[str]]:
    import tifffile

    fh.seek(0, os.SEEK_END)
    file_size = fh.tell()
    fh.seek(0)
    try:
        with tifffile.TiffFile(fh, name=Path(where).name) as tif:
            pages = len(tif.pages)
            if pages != 1:
                raise InputFormatError(
                    f"{where} is a TIFF with {pages} pages; a capture is one image: save each page as a file"
                )
            page = tif.pages.first
            _check_size(page.imagewidth, page.imagelength, where, limits)
            if page.photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
                raise InputFormatError(
                    f"{where} is a TIFF with photometric {page.photometric.name}; captures must be RGB "
                    "or grayscale: convert it to 8-bit RGB"
                )
            if page.dtype not in (np.uint8, np.uint16) or page.samplesperpixel > 4:
                raise InputFormatError(
                    f"{where} is a TIFF with {page.samplesperpixel} samples of type {page.dtype} per pixel; "
                    "captures must be 8-bit RGB: convert it"
                )
            if page.compression not in tifffile.TIFF.DECOMPRESSORS:
                raise InputFormatError(
                    f"{where} is a TIFF compressed with {page.compression.name}, which needs the optional "
                    "'imagecodecs' package: install it or save the capture uncompressed"
                )
            end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)), default=0)
            if end > file_size:
                raise InputFormatError(
                    f"{where} is a truncated TIFF (pixel data ends at byte {end}, the file has "
                    f"{file_size}): re-export it"
                )
            image = page.asarray()
            if page.axes.startswith("S"):  # planar RGB: samples stored as separate planes
                image = np.moveaxis(image, 0, -1)
    except CellbatchError:
        raise
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, KeyError, ... for bad files
        raise InputFormatError(f"{where} is truncated or damaged ({_one_line(exc)}): re-export it") from exc
    return image, []


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --- Zarr slides ---------------------------------------------------------------------------------


def open_slide_array(slide: Slide) -> zarr.Array:
    """Open a Zarr slide's array read-only (v2 or v3), or raise :class:`InputFormatError`."""
    import zarr

    where = _zarr_where(slide)
    try:
        return zarr.open_array(store=str(slide.store), path=slide.array_path, mode="r")
    except Exception as exc:  # zarr raises many types for missing or corrupt metadata
        raise InputFormatError(f"{where} is not a readable Zarr array ({_one_line(exc)})") from exc


def validate_slide(slide: Slide, *, limits: ReadLimits = DEFAULT_LIMITS) -> None:
    """Check a slide before any frame is read, raising one :class:`InputFormatError` for the slide.

    A Zarr slide must be a readable (N, H, W, 3) uint8 array with N >= 1 and H, W within ``limits``.
    A directory slide must list at least one capture; one that does not is a folder that could not
    be read, and the error says why. Capture files themselves are checked when read.
    """
    if slide.kind == "dir":
        if not slide.captures:
            folder = slide.root / slide.name
            try:
                os.listdir(folder)
            except OSError as exc:
                raise InputFormatError(f"folder {display_path(folder)} cannot be listed: {exc.strerror}") from exc
            raise InputFormatError(f"folder {display_path(folder)} holds no capture files")
        return
    SlideFrames(slide, limits=limits)


def _check_array(array: zarr.Array, where: str, limits: ReadLimits) -> None:
    if array.dtype != np.uint8:
        raise InputFormatError(
            f"{where} has dtype {array.dtype}; a slide array must be uint8 (N, H, W, 3): convert it"
        )
    if array.ndim != 4 or array.shape[3] != 3:
        raise InputFormatError(f"{where} has shape {array.shape}; a slide array must be (N, H, W, 3) RGB")
    frames, height, width, _ = array.shape
    _check_frame_count(array, frames, where, limits)
    _check_size(width, height, f"{where} (each frame)", limits)
    _check_chunk_bytes(array, where, limits)


def _check_frame_count(array: zarr.Array, frames: int, where: str, limits: ReadLimits) -> None:
    if frames == 0:
        raise InputFormatError(f"{where} holds no frames (shape {array.shape})")
    if frames > limits.max_frames:
        raise InputFormatError(
            f"{where} declares {frames} frames, more than the {limits.max_frames} a slide may hold: "
            "split it into several arrays"
        )


def _check_chunk_bytes(array: zarr.Array, where: str, limits: ReadLimits) -> None:
    chunk_bytes = math.prod(array.chunks) * array.dtype.itemsize
    if chunk_bytes > limits.max_chunk_bytes:
        raise InputFormatError(
            f"{where} is stored in chunks of {'x'.join(map(str, array.chunks))} ({chunk_bytes / 2**20:.0f} MiB "
            f"decoded, limit {limits.max_chunk_bytes / 2**20:g} MiB): rechunk it, e.g. one frame per chunk"
        )


def slide_frame_count(slide: Slide) -> int:
    """Number of captures in a slide: capture files, or the first axis of a Zarr array."""
    if slide.kind == "dir":
        return len(slide.captures)
    if slide.axes:
        return _ome_frame_count(open_slide_array(slide), slide.axes)
    return int(open_slide_array(slide).shape[0])


def read_frame(slide: Slide, index: int, *, limits: ReadLimits = DEFAULT_LIMITS) -> Capture:
    """Read capture ``index`` of a slide: a capture file, or one frame of a Zarr array.

    For a Zarr slide, the array is checked as by :func:`validate_slide`, and a frame whose chunk is
    absent from the store is refused: zarr would silently return the fill value for it.

    Raises
    ------
    IndexError
        ``index`` is outside ``range(slide_frame_count(slide))``.
    InputFormatError
        The capture is unusable (see :func:`read_capture`), or a Zarr frame is missing or damaged.
    """
    if slide.kind == "dir":
        return read_capture(slide.captures[index], limits=limits)
    return SlideFrames(slide, limits=limits).read(index)


class SlideFrames:
    """The frames of one Zarr slide, its array opened and checked once for many reads.

    The checks of :func:`validate_slide` run here too (they are cheap), so a caller that skipped
    validation still cannot allocate a giant frame or chunk.
    """

    def __init__(self, slide: Slide, *, limits: ReadLimits = DEFAULT_LIMITS) -> None:
        self.where = _zarr_where(slide)
        self.axes = slide.axes
        if slide.problem:
            raise InputFormatError(f"{self.where}: {slide.problem}")
        self.array = open_slide_array(slide)
        if self.axes:
            _check_ome_array(self.array, self.axes, self.where, limits)
        else:
            _check_array(self.array, self.where, limits)

    def read(self, index: int) -> Capture:
        if self.axes:
            return _read_ome_frame(self.array, self.axes, self.where, index)
        count = self.array.shape[0]
        if not 0 <= index < count:
            raise IndexError(f"frame {index} outside 0..{count - 1} of {self.where}")
        where = f"{self.where} frame {index}"
        missing = _missing_chunk(self.array, index)
        if missing is not None:
            raise InputFormatError(
                f"{where} is missing: chunk {missing!r} is absent from the store (copy incomplete?)"
            )
        try:
            frame = np.asarray(self.array[index])
        except Exception as exc:  # codecs raise many types for damaged chunk bytes
            raise InputFormatError(f"{where} could not be decoded ({_one_line(exc)})") from exc
        return Capture(frame, ())


def absent_frames(slide: Slide) -> list[int]:
    """Frames of a Zarr slide whose chunks (or shards) are absent from the store, listing the store once.

    Asking the store frame by frame costs a query each: an array declaring 10^5 frames with two
    present took 110 s. :meth:`SlideFrames.read` still checks each frame it reads.
    """
    from zarr.core.sync import sync

    array = open_slide_array(slide)
    grid = array.shards or array.chunks
    store = array.store_path.store
    prefix = array.store_path.path

    async def listed() -> set[str]:
        return {key async for key in store.list_prefix(prefix)}

    present = sync(listed())
    if slide.axes:  # an OME-Zarr image: frames are spread over its frame axes
        return [i for i in range(_ome_frame_count(array, slide.axes))
                if any(key not in present for key in _chunk_keys(array, _ome_selection(array, slide.axes, i)))]
    rest = list(itertools.product(*(range(math.ceil(size / step))
                                    for size, step in zip(array.shape[1:], grid[1:], strict=True))))
    frames = array.shape[0]
    absent: list[int] = []
    for first in range(0, frames, grid[0]):
        keys = (array.metadata.encode_chunk_key((first // grid[0], *r)) for r in rest)
        if any((f"{prefix}/{key}" if prefix else key) not in present for key in keys):
            absent.extend(range(first, min(frames, first + grid[0])))
    return absent


def _missing_chunk(array: zarr.Array, index: int) -> str | None:
    """Store key of the first chunk (or shard) of frame ``index`` that is absent, else None."""
    return _missing_chunk_at(array, (index, *(None,) * (array.ndim - 1)))


def _missing_chunk_at(array: zarr.Array, selection: tuple[int | None, ...]) -> str | None:
    """Store key of the first chunk (or shard) that ``selection`` reads and is absent, else None.

    ``selection`` holds one index per axis, or ``None`` for the whole axis.
    """
    from zarr.core.sync import sync

    store = array.store_path.store
    return next((key for key in _chunk_keys(array, selection) if not sync(store.exists(key))), None)


def _chunk_keys(array: zarr.Array, selection: tuple[int | None, ...]) -> Iterator[str]:
    """Store keys of the chunks (or shards) that ``selection`` (an index or ``None`` per axis) reads."""
    grid = array.shards or array.chunks
    ranges = [range(math.ceil(size / step)) if at is None else (at // step,)
              for size, step, at in zip(array.shape, grid, selection, strict=True)]
    prefix = array.store_path.path
    for chunk in itertools.product(*ranges):
        key = array.metadata.encode_chunk_key(chunk)
        yield f"{prefix}/{key}" if prefix else key


def _ome_frame_count(array: zarr.Array, axes: str) -> int:
    return math.prod(size for size, role in zip(array.shape, axes, strict=True) if role == "f")


def _check_ome_array(array: zarr.Array, axes: str, where: str, limits: ReadLimits) -> None:
    """An OME-Zarr image's full resolution: axes as the metadata says, 1, 3 or 4 channels, frames within limits."""
    if array.ndim != len(axes):
        raise InputFormatError(f"{where} has {array.ndim} dimensions but its OME-Zarr metadata names {len(axes)} axes")
    sizes = dict(zip(axes, array.shape, strict=True))
    if sizes.get("c", 1) not in (1, 3, 4):
        raise InputFormatError(
            f"{where} has {sizes['c']} channels; a capture is RGB (3), RGBA (4) or grayscale (1): export it as RGB"
        )
    _check_frame_count(array, _ome_frame_count(array, axes), where, limits)
    _check_size(sizes["x"], sizes["y"], f"{where} (each frame)", limits)
    _check_chunk_bytes(array, where, limits)


def _read_ome_frame(array: zarr.Array, axes: str, where: str, index: int) -> Capture:
    """Frame ``index`` (over the frame axes in C order) of an OME-Zarr image as (H, W, 3) uint8 RGB."""
    count = _ome_frame_count(array, axes)
    if not 0 <= index < count:
        raise IndexError(f"frame {index} outside 0..{count - 1} of {where}")
    selection = _ome_selection(array, axes, index)
    where = f"{where} frame {index}"
    missing = _missing_chunk_at(array, selection)
    if missing is not None:
        raise InputFormatError(f"{where} is missing: chunk {missing!r} is absent from the store (copy incomplete?)")
    try:
        pixels = np.asarray(array[tuple(slice(None) if at is None else at for at in selection)])
    except Exception as exc:  # codecs raise many types for damaged chunk bytes
        raise InputFormatError(f"{where} could not be decoded ({_one_line(exc)})") from exc
    kept = [role for role in axes if role != "f"]  # the order of pixels' axes
    order = [kept.index("y"), kept.index("x"), *([kept.index("c")] if "c" in kept else [])]
    return convert_to_rgb8(np.transpose(pixels, order), where=where)


def _ome_selection(array: zarr.Array, axes: str, index: int) -> tuple[int | None, ...]:
    """Frame ``index`` of an OME-Zarr image as one index per frame axis (C order), ``None`` elsewhere."""
    frame_axes = [i for i, role in enumerate(axes) if role == "f"]
    selection: list[int | None] = [None] * array.ndim
    for axis, at in zip(frame_axes, np.unravel_index(index, [array.shape[i] for i in frame_axes]), strict=True):
        selection[axis] = int(at)
    return tuple(selection)


def _zarr_where(slide: Slide) -> str:
    array = f" array {display_path(slide.array_path)!r}" if slide.array_path else ""
    return f"Zarr {display_path(slide.store or slide.root)}{array}"


# --- change detection ----------------------------------------------------------------------------

# A file changed within this many seconds before it is stat'ed may change again within the same
# filesystem timestamp tick, leaving its stat as it was: such a slide gets no fingerprint (as git's
# "racily clean" entries), and a rerun hashes it instead of trusting the stat.
RACY_SECONDS = 2.0


def slide_fingerprint(slide: Slide) -> str | None:
    """A digest of the stat (inode, size, mtime, ctime) of every file a slide reads, or ``None``.

    Taken before the slide's captures are decoded, it tells a rerun, without reading a byte, that
    nothing was written since: every write or replacement moves a file's ctime, which no user can
    set back. ``None`` when a file changed too recently to trust its stat (see ``RACY_SECONDS``).
    """
    import time

    if slide.kind == "dir":
        files = [(p.name, p) for p in slide.captures]
    else:
        files = list(_zarr_files(slide))
    newest = 0
    digest = hashlib.sha256()
    for name, path in files:
        try:
            info = os.stat(path)
            record = f"{info.st_ino} {info.st_size} {info.st_mtime_ns} {info.st_ctime_ns}"
            newest = max(newest, info.st_mtime_ns, info.st_ctime_ns)
        except OSError as exc:
            record = f"error {exc.errno}"
        digest.update(f"{name}\0{record}\n".encode("utf-8", "surrogateescape"))
    if time.time_ns() - newest < RACY_SECONDS * 1e9:
        return None
    return digest.hexdigest()


def _zarr_files(slide: Slide) -> Iterator[tuple[str, Path]]:
    """The files of a Zarr slide's store that its frames are read from: root metadata and the array's files."""
    store = slide.store or slide.root
    if not store.is_dir():
        yield store.name, store
        return
    if slide.array_path:  # the array's own files are walked below; the group's metadata may hold it too
        for marker in (*ZARR_MARKERS, ".zattrs", ".zmetadata"):
            if (store / marker).exists():
                yield marker, store / marker
    array_dir = store / slide.array_path if slide.array_path else store
    for dirpath, dirnames, filenames in os.walk(array_dir):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            yield path.relative_to(store).as_posix(), path


# --- discovery -----------------------------------------------------------------------------------


def _visible(name: str) -> bool:
    # Hidden entries include macOS "._name.jpg" resource forks copied onto lab shares: not captures.
    return not name.startswith(".")


def iter_image_files(root: str | Path) -> Iterator[Path]:
    """Capture files below ``root``, recursively, in sorted order.

    Hidden files and folders are skipped and folder symlinks are not followed, as in
    :func:`discover_slides`.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _visible(name) and is_image_file(path):
                yield path


def discover_slides(src: str | Path, *, exclude: Iterable[str | Path] = ()) -> list[Slide]:
    """Every slide below one SRC argument (a directory or a Zarr store), sorted by name.

    Parameters
    ----------
    src : str or Path
        A folder of captures (searched recursively) or a Zarr store.
    exclude : iterable of str or Path
        Folders not to enter, e.g. the output folder when it lies inside SRC.

    Notes
    -----
    Folder symlinks below SRC are not followed (SRC itself may be one): a link loop cannot hang
    discovery and no slide is found twice. File symlinks are kept and checked when read. Hidden files
    and folders are skipped. A Zarr store or folder that cannot be read still becomes a slide, which
    :func:`validate_slide` then fails with the reason, so one bad slide does not stop the others.
    """
    root = Path(src)
    if not root.exists():
        raise InputNotFoundError(f"input {root} does not exist: pass a folder of captures or a Zarr store")
    if is_zarr_store(root) or root.suffix == ".zarr":
        return sorted(_zarr_slides(root, root, "."), key=lambda s: s.name)
    if not root.is_dir():
        raise InputFormatError(f"input {root} is neither a folder of captures nor a Zarr store")
    excluded = {Path(p).resolve() for p in exclude}
    slides: list[Slide] = []

    def unreadable(exc: OSError) -> None:
        folder = Path(exc.filename)
        slides.append(Slide(root, folder.relative_to(root).as_posix(), "dir"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        kept = []
        for d in sorted(dirnames):
            sub = here / d
            if not _visible(d) or sub.is_symlink() or (excluded and sub.resolve() in excluded):
                continue
            if is_zarr_store(sub):
                slides.extend(_zarr_slides(root, sub, sub.relative_to(root).as_posix()))
            else:
                kept.append(d)
        dirnames[:] = kept
        captures = tuple(here / n for n in sorted(filenames) if _visible(n) and is_image_file(here / n))
        if captures:
            slides.append(Slide(root, here.relative_to(root).as_posix(), "dir", captures=captures))
    return sorted(slides, key=lambda s: s.name)


def _zarr_slides(root: Path, store: Path, name: str) -> list[Slide]:
    import zarr

    try:
        node = zarr.open(store=str(store), mode="r")
        if isinstance(node, zarr.Array):
            return [Slide(root, name, "zarr", store=store, array_path="")]
        return list(_zarr_group_slides(root, store, node, name))
    except Exception:  # validate_slide re-opens it and reports why
        return [Slide(root, name, "zarr", store=store, array_path="")]


def _zarr_group_slides(root: Path, store: Path, group: zarr.Group, name: str) -> Iterator[Slide]:
    from cellbatch.omezarr import ome_attributes, ome_images

    if ome_attributes(store, group.path) is not None:  # an image, plate or well: not its pyramid levels
        for image in ome_images(store, group.path):
            slide_name = image.name or name
            if name != "." and image.name:
                slide_name = f"{name}/{image.name}"
            yield Slide(root, slide_name, "zarr", store=store, array_path=image.array_path, axes=image.axes,
                        problem=image.problem)
        return
    for key, _ in sorted(group.arrays(), key=lambda kv: kv[0]):
        path = f"{group.path}/{key}" if group.path else key
        slide_name = key if name == "." else f"{name}/{key}"
        yield Slide(root, slide_name, "zarr", store=store, array_path=path)
    for key, sub in sorted(group.groups(), key=lambda kv: kv[0]):
        yield from _zarr_group_slides(root, store, sub, key if name == "." else f"{name}/{key}")
