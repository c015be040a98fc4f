"""``--normalise global:PROFILE.json``: one affine colour transform for the whole image.

The baseline that HM improves on: fit one 3-D Gaussian to all source pixels and one to all target
pixels and map every pixel by the Monge map between them (the same map HM uses per class, see
:mod:`cellbatch.normalise.gaussian`). It corrects a shift of lamp colour or exposure, but not a
shift that depends on the stain, where nucleus and background must move differently.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from cellbatch.normalise.gaussian import ColourStats, monge_map
from cellbatch.normalise.profile import read_profile

if TYPE_CHECKING:
    import torch


def fit_global(source: Iterable[np.ndarray], target: Iterable[np.ndarray]) -> dict[str, Any]:
    """Fit global profile fields from (H, W, 3) uint8 RGB source and target captures (unpaired).

    Returns
    -------
    dict
        ``source`` and ``target`` Gaussians and the ``transform`` (A, b), for
        :func:`~cellbatch.normalise.profile.write_profile`.
    """
    fields: dict[str, Any] = {}
    for side, images in (("source", source), ("target", target)):
        stats = ColourStats(1)
        for image in images:
            stats.add(image)
        g = stats.gaussians()
        if g.pixels[0] == 0:
            raise ValueError(f"fit_global needs at least one {side} image")
        fields[side] = {"mean": g.mean[0], "cov": g.cov[0], "pixels": int(g.pixels[0])}
    a, b = monge_map(
        fields["source"]["mean"], fields["source"]["cov"], fields["target"]["mean"], fields["target"]["cov"]
    )
    fields["transform"] = {"A": a, "b": b}
    return fields


def apply_affine(image: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A x + b`` for every pixel of an (H, W, 3) uint8 image, rounded and clipped to uint8."""
    m = np.hstack([a, b[:, None]]).astype(np.float64)
    return cv2.transform(image, m)


class GlobalAffineNormaliser:
    """``--normalise global:PROFILE.json`` with a profile from ``cellbatch normalise fit --method global``."""

    name = "global"

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg
        self.profile = read_profile(arg, method="global")
        self.a = self.profile.array("transform", "A", shape=(3, 3))
        self.b = self.profile.array("transform", "b", shape=(3,))

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        out = np.empty_like(crops)
        for i in range(crops.shape[0]):
            out[i] = apply_affine(crops[i], self.a, self.b)
        return out

    def apply_tensors(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """The same on a batch of (N, H, W, 3) uint8 tensors on any device."""
        import torch

        from cellbatch.normalise.torch_ops import planar, to_images

        _, h, w, _ = images.shape
        a = torch.from_numpy(self.a).to(images.device, torch.float32)
        b = torch.from_numpy(self.b).to(images.device, torch.float32)
        y = a @ planar(images) + b[:, None]
        # cv2.transform rounds half to even; the +0.5-and-truncate of to_images differs only on exact halves
        return to_images(y.round(), h, w)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "arg": self.arg, "profile": self.profile.provenance()}
