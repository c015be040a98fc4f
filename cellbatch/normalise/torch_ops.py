"""Batched torch versions of the operations the numpy normalisers take from OpenCV and numpy.

Each function reproduces its numpy/OpenCV counterpart on a whole batch at once, so a normaliser's
``apply_tensors`` can follow its numpy reference line by line: Gaussian blur with OpenCV's kernel
size and ``BORDER_REFLECT`` edges, quantiles and medians with numpy's linear interpolation over a
per-image subset of pixels (a mask), and OpenCV's float sRGB <-> CIELAB conversion. The numpy
versions stay the reference; ``tests/test_normalise_torch.py`` checks each normaliser against it.

Images are planar: (N, C, P) float with P = H * W pixels, like the numpy code's (3, P) rows.
"""

from __future__ import annotations

import functools
import math

import torch


def planar(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H*W) float."""
    n, h, w, c = images.shape
    return images.reshape(n, h * w, c).transpose(1, 2).to(dtype)


def to_images(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, 3, H*W) float, already offset by +0.5 for rounding -> (N, H, W, 3) uint8, clipped and truncated."""
    return x.clamp(0, 255).to(torch.uint8).transpose(1, 2).reshape(x.shape[0], h, w, 3)


def gaussian_kernel(sigma: float, *, device: torch.device) -> torch.Tensor:
    """OpenCV's kernel for a float32 image: size round(8 sigma + 1) made odd, weights summing to 1."""
    size = int(math.floor(sigma * 8 + 1 + 0.5)) | 1
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    return (k / k.sum()).to(torch.float32).to(device)


def gaussian_blur(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur every (H, W) plane of (..., H, W) float32 like ``cv2.GaussianBlur(p, (0, 0), sigma,
    borderType=cv2.BORDER_REFLECT)`` (edges mirrored with the edge pixel repeated: ``cba|abc``).

    Each pass is one matrix product with a banded (n, n) matrix that holds the kernel and the mirrored
    edges: BLAS and cuBLAS run that an order of magnitude faster than a one-channel convolution.
    """
    if sigma <= 0:
        return planes
    h, w = planes.shape[-2:]
    rows = _blur_matrix(h, sigma, planes.device)
    cols = rows if w == h else _blur_matrix(w, sigma, planes.device)
    return rows.T @ (planes @ cols)


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(n, n) matrix M with ``(x @ M)[j] = sum_i k[i] x[reflect(j + i - r)]``."""
    kernel = gaussian_kernel(sigma, device=torch.device("cpu"))
    r = kernel.numel() // 2
    j = torch.arange(n).repeat_interleave(2 * r + 1)
    i = torch.arange(2 * r + 1).repeat(n)
    source = _reflect_index(n, r, torch.device("cpu"))[j + i]
    band = torch.zeros(n, n).index_put_((source, j), kernel[i], accumulate=True)
    return band.to(device)


def _reflect_index(n: int, r: int, device: torch.device) -> torch.Tensor:
    # mirror with period 2n: ..., 1, 0 | 0, 1, ..., n-1 | n-1, n-2, ... (also for a radius past the edge)
    j = torch.arange(-r, n + r, device=device).remainder(2 * n)
    return torch.where(j < n, j, 2 * n - 1 - j)


def masked_quantile(values: torch.Tensor, mask: torch.Tensor | None, q: float) -> torch.Tensor:
    """Quantile ``q`` (0-1) of ``values`` (..., P) over the pixels where ``mask`` (..., P) is true.

    numpy's default (linear) interpolation between order statistics, per leading index; ``nan``
    where the mask is empty.
    """
    if mask is None:
        s = values.sort(dim=-1).values
        count = torch.full(values.shape[:-1], values.shape[-1], device=values.device)
    else:
        mask = mask.expand_as(values)
        s = values.masked_fill(~mask, math.inf).sort(dim=-1).values
        count = mask.sum(dim=-1)
    pos = q * (count - 1).clamp(min=0).to(values.dtype)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    v_lo = s.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    v_hi = s.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    out = v_lo + (v_hi - v_lo) * (pos - lo.to(values.dtype))
    return out.masked_fill(count == 0, math.nan)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (N, C, P) over the pixels of ``mask`` (N, P), per image and channel."""
    m = mask.to(values.dtype).unsqueeze(1)
    return (values * m).sum(dim=-1) / m.sum(dim=-1)


# OpenCV's float CIELAB (color_lab.cpp): sRGB primaries, D65 white, the 0.008856 / 7.787 / 903.3 knees.
_RGB2XYZ = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_XYZ2RGB = torch.tensor([[3.240479, -1.53715, -0.498535], [-0.969256, 1.875991, 0.041556],
                         [0.055648, -0.204043, 1.057311]], dtype=torch.float64)
_WHITE = torch.tensor([0.950456, 1.0, 1.088754], dtype=torch.float64)
_T = 0.008856
_A = 16.0 / 116.0


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, P) RGB in 0-255 -> (N, 3, P) CIELAB (L 0-100), as ``cv2.cvtColor(rgb / 255, COLOR_RGB2LAB)``."""
    rgb = x / 255
    rgb = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).clamp(min=0) ** 2.4)
    m = (_RGB2XYZ / _WHITE[:, None]).to(x)
    xyz = m @ rgb
    f = torch.where(xyz > _T, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + _A)
    y = xyz[:, 1]
    lum = torch.where(y > _T, 116 * f[:, 1] - 16, 903.3 * y)
    return torch.stack([lum, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab`: (N, 3, P) CIELAB -> RGB in 0-1, clipped (as OpenCV does)."""
    lum, a, b = lab[:, 0], lab[:, 1], lab[:, 2]
    low = lum <= _T * 903.3
    y = torch.where(low, lum / 903.3, ((lum + 16) / 116) ** 3)
    fy = torch.where(low, 7.787 * y + _A, (lum + 16) / 116)
    fxz = torch.stack([a / 500 + fy, fy - b / 200], dim=1)
    xz = torch.where(fxz <= 7.787 * _T + _A, (fxz - _A) / 7.787, fxz**3)
    xyz = torch.stack([xz[:, 0], y, xz[:, 1]], dim=1)
    m = (_XYZ2RGB * _WHITE[None, :]).to(lab)
    rgb = (m @ xyz).clamp(0, 1)
    return torch.where(rgb <= 0.0031308, 12.92 * rgb, 1.055 * rgb ** (1 / 2.4) - 0.055)
