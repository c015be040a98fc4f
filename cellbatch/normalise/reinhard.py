"""``--normalise reinhard:PROFILE.json``: Reinhard colour transfer (Reinhard et al., 2001).

Each crop's per-channel mean and standard deviation in CIELAB are moved to those of the target
set: ``L' = (L - mean_img) * std_tgt / std_img + mean_tgt`` for L*, a* and b* independently. The
statistics of the crop are its own, so the transform adapts to every image, and that is also its
weakness: a crop with a large dark nucleus gets a different transform from one with a small
nucleus, even from the same slide. The profile holds only the target statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from cellbatch.normalise.profile import read_profile

if TYPE_CHECKING:
    import torch

# A flat channel (a blank crop) would otherwise divide by zero and blow the image up.
MIN_STD = 1e-3


def rgb_to_lab32(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float32 CIELAB (OpenCV, D65; L in [0, 100])."""
    return cv2.cvtColor(image.astype(np.float32) * (1 / 255), cv2.COLOR_RGB2LAB)


def lab32_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab32`, rounded and clipped to uint8."""
    rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) * 255 + 0.5
    return np.clip(rgb, 0, 255).astype(np.uint8)


def fit_reinhard(target: Iterable[np.ndarray]) -> dict[str, Any]:
    """Pooled CIELAB mean and standard deviation of (H, W, 3) uint8 RGB target captures.

    Returns
    -------
    dict
        ``{"target": {"mean": (3,), "std": (3,), "pixels": n}}`` for
        :func:`~cellbatch.normalise.profile.write_profile`.
    """
    n, s, ss = 0, np.zeros(3), np.zeros(3)
    for image in target:
        lab = rgb_to_lab32(image).reshape(-1, 3).astype(np.float64)
        n += lab.shape[0]
        s += lab.sum(axis=0)
        ss += (lab * lab).sum(axis=0)
    if n == 0:
        raise ValueError("fit_reinhard needs at least one target image")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return {"target": {"mean": mean, "std": std, "pixels": n}}


def reinhard(image: np.ndarray, *, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Move the CIELAB mean and std of one (H, W, 3) uint8 image to ``mean`` and ``std`` (3,)."""
    lab = rgb_to_lab32(image)
    flat = lab.reshape(-1, 3)
    m, sd = flat.mean(axis=0), flat.std(axis=0)
    gain = (std / np.maximum(sd, MIN_STD)).astype(np.float32)
    lab = (lab - m.astype(np.float32)) * gain + mean.astype(np.float32)
    return lab32_to_rgb(lab)


def reinhard_tensors(images: torch.Tensor, *, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """:func:`reinhard` for a batch of (N, H, W, 3) uint8 tensors, each crop with its own statistics."""
    import torch

    from cellbatch.normalise.torch_ops import lab_to_rgb, planar, rgb_to_lab, to_images

    _, h, w, _ = images.shape
    lab = rgb_to_lab(planar(images))
    m = lab.mean(dim=2, keepdim=True)
    sd = lab.std(dim=2, correction=0, keepdim=True)
    target_mean = torch.from_numpy(mean).to(lab.device, torch.float32).view(1, 3, 1)
    target_std = torch.from_numpy(std).to(lab.device, torch.float32).view(1, 3, 1)
    lab = (lab - m) * (target_std / sd.clamp(min=MIN_STD)) + target_mean
    return to_images(lab_to_rgb(lab) * 255 + 0.5, h, w)


class ReinhardNormaliser:
    """``--normalise reinhard:PROFILE.json``, profile from ``cellbatch normalise fit --method reinhard``."""

    name = "reinhard"

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg
        self.profile = read_profile(arg, method="reinhard")
        self.mean = self.profile.array("target", "mean", shape=(3,))
        self.std = self.profile.array("target", "std", shape=(3,))

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        out = np.empty_like(crops)
        for i in range(crops.shape[0]):
            out[i] = reinhard(crops[i], mean=self.mean, std=self.std)
        return out

    def apply_tensors(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """The same on a batch of (N, H, W, 3) uint8 tensors on any device."""
        return reinhard_tensors(images, mean=self.mean, std=self.std)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "arg": self.arg, "profile": self.profile.provenance()}
