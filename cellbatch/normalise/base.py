"""The normaliser interface (contract for plugins: documented in the README)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Normaliser(Protocol):
    """``Normaliser(arg)(crops, masks) -> crops``.

    ``arg`` is the text after ``NAME:`` in ``--normalise NAME:ARG`` (``None`` when absent).
    ``crops`` is (N, H, W, 3) uint8 RGB, ``masks`` (N, H, W) uint8 labels (0 background, 1 red cell,
    2 cytoplasm, 3 nucleus) or ``None`` when no segmentation is available.
    ``provenance()`` returns what must be recorded to reproduce the result (name, argument, sha256 of
    any profile file).
    A run on a CPU calls one normaliser from several threads at once (its stage threads, a batch
    each), as it calls a detector from its Dask threads: keep what a call computes in locals.
    """

    name: str

    def __init__(self, arg: str | None = None) -> None: ...

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray: ...

    def provenance(self) -> dict[str, Any]: ...


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``"hm:profile.json"`` into ``("hm", "profile.json")``; ``"display"`` into ``("display", None)``."""
    name, sep, arg = spec.partition(":")
    return name.strip(), (arg if sep else None)


def planar(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H*W) float32: per-pixel colour arithmetic then runs over long contiguous rows."""
    return image.reshape(-1, 3).T.astype(np.float32, order="C")


def to_image(planes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(3, H*W) float32 colours (modified in place) -> (H, W, 3) uint8, rounded and clipped."""
    import cv2

    h, w = shape[:2]
    planes += 0.5
    np.clip(planes, 0, 255, out=planes)
    # OpenCV interleaves the three planes several times faster than a numpy transpose copy
    return cv2.merge([plane.reshape(h, w) for plane in planes.astype(np.uint8)])
