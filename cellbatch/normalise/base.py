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
    """

    name: str

    def __init__(self, arg: str | None = None) -> None: ...

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray: ...

    def provenance(self) -> dict[str, Any]: ...


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``"hm:profile.json"`` into ``("hm", "profile.json")``; ``"display"`` into ``("display", None)``."""
    name, sep, arg = spec.partition(":")
    return name.strip(), (arg if sep else None)
