"""Find slides in the inputs and decode their captures.

A slide is one leaf directory of capture files or one Zarr array (N, H, W, 3) uint8. Directories are
walked recursively; a Zarr store (v2 or v3) is recognised by its metadata file and may be one array
or a group of arrays, nested groups allowed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellbatch.errors import InputFormatError, InputNotFoundError

IMAGE_SUFFIXES = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


@dataclass(frozen=True)
class Slide:
    """One unit of work: a folder of capture files or one Zarr array.

    ``name`` is the slide's path relative to its input root (POSIX form; ``"."`` for the root
    itself); it names the slide's output folder. ``captures`` lists the capture files (directory
    slides) and is empty for Zarr slides, whose frames are read by index from ``array_path``.
    """

    root: Path
    name: str
    kind: str  # "dir" or "zarr"
    captures: tuple[Path, ...] = ()
    store: Path | None = None
    array_path: str = ""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_zarr_store(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in ZARR_MARKERS)


def read_image(path: str | Path) -> np.ndarray:
    """Decode one capture file to (H, W, 3) uint8 RGB, or raise :class:`InputFormatError`."""
    import imageio.v3 as iio

    path = Path(path)
    try:
        image = iio.imread(path)
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"{path} does not exist") from exc
    except Exception as exc:  # decoders raise many types for corrupt files
        raise InputFormatError(f"{path} could not be decoded as an image: {exc}") from exc
    return as_rgb8(image, str(path))


def as_rgb8(image: np.ndarray, where: str) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB view of a decoded image, or raise :class:`InputFormatError`."""
    if image.dtype != np.uint8:
        raise InputFormatError(f"{where} has pixel type {image.dtype}, not 8-bit: convert it to 8-bit RGB")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputFormatError(f"{where} has shape {image.shape}, not (H, W, 3) RGB")
    return np.ascontiguousarray(image)


def iter_image_files(root: str | Path) -> Iterator[Path]:
    """Capture files below ``root``, recursively, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_image_file(path):
                yield path


def discover_slides(src: str | Path) -> list[Slide]:
    """Every slide below one SRC argument (a directory or a Zarr store), in sorted order."""
    root = Path(src)
    if not root.exists():
        raise InputNotFoundError(f"input {root} does not exist: pass a folder of captures or a Zarr store")
    if is_zarr_store(root) or root.suffix == ".zarr":
        return list(_zarr_slides(root))
    if not root.is_dir():
        raise InputFormatError(f"input {root} is neither a folder of captures nor a Zarr store")
    slides: list[Slide] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for d in list(dirnames):
            if is_zarr_store(here / d):
                dirnames.remove(d)
                for slide in _zarr_slides(here / d):
                    rel = (here / d).relative_to(root).as_posix()
                    name = rel if slide.name == "." else f"{rel}/{slide.name}"
                    slides.append(Slide(root, name, "zarr", store=slide.store, array_path=slide.array_path))
        captures = tuple(here / n for n in sorted(filenames) if is_image_file(here / n))
        if captures:
            slides.append(Slide(root, here.relative_to(root).as_posix(), "dir", captures=captures))
    return slides


def _zarr_slides(store: Path) -> Iterator[Slide]:
    import zarr

    try:
        node = zarr.open(store=str(store), mode="r")
    except Exception as exc:
        raise InputFormatError(f"{store} is not a readable Zarr store: {exc}") from exc
    if isinstance(node, zarr.Array):
        yield Slide(store, ".", "zarr", store=store, array_path="")
        return
    yield from _zarr_group_slides(store, node, "")


def _zarr_group_slides(store: Path, group, prefix: str) -> Iterator[Slide]:
    for name, _ in sorted(group.arrays(), key=lambda kv: kv[0]):
        path = f"{prefix}{name}"
        yield Slide(store, path, "zarr", store=store, array_path=path)
    for name, sub in sorted(group.groups(), key=lambda kv: kv[0]):
        yield from _zarr_group_slides(store, sub, f"{prefix}{name}/")
