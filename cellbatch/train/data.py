"""Training data: aligned pairs, unpaired folders, the train/validation split and augmentation.

A pairs folder (written by ``cellbatch pair``) holds ``source/<name>.png`` (DM1200 look) and
``target/<name>.png`` (DM96 look) with the same names, aligned pixel to pixel, plus ``pairs.csv``.
Everything is read into memory once as uint8 (N, Y, X, 3): 10,000 pairs of 256x256 take about 4 GB,
and sampling from memory keeps a GPU fed without a loader process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellbatch.errors import InputFormatError, InputNotFoundError
from cellbatch.read import iter_image_files, read_image

# Shared gain and offset for intensity augmentation: a brighter or dimmer lamp, a denser or paler
# stain. Source and target get the same change, so the mapping to learn stays the same.
GAIN_RANGE = (0.9, 1.1)
OFFSET_RANGE = (-0.05, 0.05)


@dataclass(frozen=True)
class PairSet:
    """Aligned pairs in memory: ``source`` and ``target`` are (N, Y, X, 3) uint8, row i = ``names[i]``."""

    names: tuple[str, ...]
    source: np.ndarray
    target: np.ndarray
    sha256: str


@dataclass(frozen=True)
class AugmentSettings:
    """Random rotation by multiples of 90 degrees, intensity change, and square crop (``None``: whole)."""

    rotate: bool = True
    intensity: bool = True
    crop: int | None = None


def _read_folder(folder: Path, names: list[str], digest: Any) -> np.ndarray:
    images = []
    for name in names:
        path = folder / f"{name}.png"
        digest.update(f"{folder.name}/{name}\0".encode())
        digest.update(path.read_bytes())
        images.append(read_image(path))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise InputFormatError(
            f"images in {folder} differ in size ({sorted(shapes)[:2]}): pairs must all match"
        )
    return np.stack(images)


def read_pairs(pairs: str | Path) -> PairSet:
    """Read a pairs folder; ``sha256`` identifies its names and bytes (recorded in exported models)."""
    pairs = Path(pairs)
    src_dir, tgt_dir = pairs / "source", pairs / "target"
    if not src_dir.is_dir() or not tgt_dir.is_dir():
        raise InputNotFoundError(
            f"{pairs} is not a pairs folder (needs source/ and target/): make one with `cellbatch pair`"
        )
    src_names = sorted(p.stem for p in src_dir.glob("*.png"))
    tgt_names = {p.stem for p in tgt_dir.glob("*.png")}
    unmatched = [n for n in src_names if n not in tgt_names]
    if unmatched:
        raise InputFormatError(
            f"{src_dir / unmatched[0]}.png has no partner in {tgt_dir}: every pair needs both"
        )
    if len(src_names) < 2:
        raise InputFormatError(f"{pairs} holds {len(src_names)} pairs: training needs at least 2")
    digest = hashlib.sha256()
    source = _read_folder(src_dir, src_names, digest)
    target = _read_folder(tgt_dir, src_names, digest)
    if source.shape != target.shape:
        raise InputFormatError(f"source and target images in {pairs} differ in size: pairs must be aligned")
    return PairSet(names=tuple(src_names), source=source, target=target, sha256=digest.hexdigest())


def read_unpaired(folder: str | Path, *, min_size: int) -> list[np.ndarray]:
    """Every image in ``folder`` as (Y, X, 3) uint8; each must be at least ``min_size`` on both sides."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(f"unpaired folder {folder} does not exist")
    images = [read_image(p) for p in iter_image_files(folder)]
    if not images:
        raise InputFormatError(f"unpaired folder {folder} holds no images")
    for image in images:
        if min(image.shape[:2]) < min_size:
            raise InputFormatError(
                f"an image in {folder} is {image.shape[1]}x{image.shape[0]}, smaller than the "
                f"{min_size}x{min_size} training crop: use cell crops of at least that size"
            )
    return images


def split_indices(n: int, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into train and validation indices (at least one of each)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, Y, X, 3) -> float32 (N, 3, Y, X) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, Y, X) in [-1, 1] -> uint8 (N, Y, X, 3), rounded as the pipeline writes it."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def augment(
    images: list[np.ndarray], *, rng: np.random.Generator, settings: AugmentSettings
) -> list[torch.Tensor]:
    """Apply one random crop, rotation and intensity change to each row of all ``images`` alike.

    ``images`` are uint8 (N, Y, X, 3) arrays of the same N, Y, X (a source batch and its targets);
    the result is float (N, 3, y, x) tensors in [-1, 1].
    """
    n, height, width = images[0].shape[:3]
    out = [np.empty((n, settings.crop or height, settings.crop or width, 3), np.float32) for _ in images]
    for i in range(n):
        y0 = x0 = 0
        if settings.crop:
            y0 = int(rng.integers(0, height - settings.crop + 1))
            x0 = int(rng.integers(0, width - settings.crop + 1))
        k = int(rng.integers(0, 4)) if settings.rotate else 0
        gain = rng.uniform(*GAIN_RANGE) if settings.intensity else 1.0
        offset = rng.uniform(*OFFSET_RANGE) if settings.intensity else 0.0
        for src, dst in zip(images, out, strict=True):
            size_y, size_x = dst.shape[1:3]
            window = src[i, y0 : y0 + size_y, x0 : x0 + size_x].astype(np.float32) / 255.0
            dst[i] = np.clip(np.rot90(window, k) * gain + offset, 0.0, 1.0)
    return [torch.from_numpy(a).permute(0, 3, 1, 2).mul(2.0).sub(1.0).contiguous() for a in out]


def sample_unpaired(
    images: list[np.ndarray], batch_size: int, size: int, *, rng: np.random.Generator
) -> np.ndarray:
    """A batch (batch_size, size, size, 3) uint8 of random crops of random images."""
    batch = np.empty((batch_size, size, size, 3), np.uint8)
    for i in range(batch_size):
        image = images[int(rng.integers(0, len(images)))]
        y0 = int(rng.integers(0, image.shape[0] - size + 1))
        x0 = int(rng.integers(0, image.shape[1] - size + 1))
        batch[i] = image[y0 : y0 + size, x0 : x0 + size]
    return batch
