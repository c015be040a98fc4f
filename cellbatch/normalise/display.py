"""``--normalise display[:OPTIONS]``: the display normalisation that analysers apply before showing a cell.

Thesis section 1.1: "segments the background and sets it to a constant predefined color ... enhancing
the contrast in the image, especially in the nucleus". Per crop, with soft background and nucleus
probabilities ``p_bg`` and ``p_nuc`` (blurred label masks, or estimated from colour without masks):

1. white balance: every channel is scaled so the crop's background colour becomes ``background``
   (transmitted light is illumination times transmittance, so a gain is the physical correction);
2. contrast: every pixel's distance from the background colour is multiplied by ``contrast``;
3. nucleus contrast: inside the nucleus, the distance from the nucleus's mean colour is multiplied
   by ``nucleus_gain`` (blended by ``p_nuc``, so the nuclear border has no seam);
4. background: pixels are pulled to the constant ``background`` colour in proportion to ``p_bg``.

OPTIONS is ``key=value`` pairs separated by ``;`` (quote the whole option in a shell)::

    --normalise 'display:background=240,230,230;nucleus_gain=1.3;contrast=1.1;softness=2'

========== ============== =====================================================================
key        default        meaning
========== ============== =====================================================================
background 238,234,230    constant background colour, R,G,B in 0-255
nucleus_gain 1.3          contrast gain inside the nucleus (1 leaves it as it is)
contrast   1.1            contrast gain of everything against the background (1 leaves it)
softness   2.0            blur (px) of the label masks into probabilities (0: hard masks)
========== ============== =====================================================================

Without masks the background is the colour of the brightest, least saturated quarter of the
pixels, ``p_bg`` falls off as a Gaussian of the colour distance from it, and the nucleus is the
part darker than an Otsu threshold of the non-background brightness.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from cellbatch.detect.base import BACKGROUND, NUCLEUS
from cellbatch.errors import ConfigError
from cellbatch.normalise.base import planar, to_image

if TYPE_CHECKING:
    import torch

SYNTAX = "write display:background=R,G,B;nucleus_gain=G;contrast=C;softness=PX (all optional)"
# Accepted ranges. A gain of 10 already saturates every nucleus; a blur wider than a crop (256 px)
# only flattens the masks, and a huge one makes OpenCV allocate a kernel of that size.
MAX_GAIN = 10.0
MAX_SOFTNESS = 64.0
# Scale (8-bit levels) of the colour distance at which a pixel stops counting as background when
# there are no masks: a few times the sensor noise of a flat background.
MIN_BACKGROUND_SPREAD = 8.0
MIN_BACKGROUND_PIXELS = 16


@dataclass(frozen=True)
class DisplaySettings:
    """Options of the display normalisation (see the module docstring)."""

    background: tuple[int, int, int] = (238, 234, 230)
    nucleus_gain: float = 1.3
    contrast: float = 1.1
    softness: float = 2.0


def parse_display_options(arg: str | None) -> DisplaySettings:
    """Parse ``"background=240,230,230;nucleus_gain=1.3"`` into :class:`DisplaySettings`.

    Raises
    ------
    ConfigError
        An unknown key, a malformed pair or an out-of-range value (the message gives the syntax).
    """
    values: dict[str, Any] = {}
    for item in (arg or "").split(";"):
        if not item.strip():
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise ConfigError(f"--normalise display option {item!r} has no '=': {SYNTAX}")
        if key not in DisplaySettings.__dataclass_fields__:
            raise ConfigError(f"--normalise display has no option {key!r}: {SYNTAX}")
        try:
            if key == "background":
                rgb = tuple(int(v) for v in value.split(","))
                if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                    raise ValueError(value)
                values[key] = rgb
            else:
                number = float(value)
                top = MAX_SOFTNESS if key == "softness" else MAX_GAIN
                if not (np.isfinite(number) and number <= top and (number >= 0 if key == "softness" else number > 0)):
                    raise ValueError(value)
                values[key] = number
        except ValueError as exc:
            raise ConfigError(
                f"--normalise display option {key}={value!r} is not valid: background takes three "
                f"integers 0-255, nucleus_gain and contrast a number above 0 and at most {MAX_GAIN:g}, "
                f"softness 0 to {MAX_SOFTNESS:g} px; {SYNTAX}"
            ) from exc
    return DisplaySettings(**values)


def soft_regions(
    x: np.ndarray, labels: np.ndarray | None, shape: tuple[int, int], *, softness: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background colour and soft background and nucleus probabilities of one crop.

    Parameters
    ----------
    x : np.ndarray
        (3, P) float32 planar colours (:func:`~cellbatch.normalise.base.planar`) of an (H, W) crop.
    labels : np.ndarray or None
        (H, W) uint8 class labels, or ``None`` to estimate the regions from colour.
    shape : tuple of int
        (H, W).
    softness : float
        Gaussian blur (px) of the masks.

    Returns
    -------
    background : np.ndarray
        (3,) float32 mean background colour.
    p_bg, p_nuc : np.ndarray
        (P,) float32 probabilities.
    """
    if labels is not None and (labels == BACKGROUND).sum() >= MIN_BACKGROUND_PIXELS:
        p_bg = (labels == BACKGROUND).astype(np.float32).reshape(-1)
        # the labelled background's mean colour as a matrix-vector product: a boolean gather of
        # the background pixels costs ten times as much
        background = (x @ p_bg) / p_bg.sum()
    else:
        # a crop filled by its cell has (almost) no labelled background: estimate it from colour
        lum = x.sum(axis=0) / 3
        score = lum - (x.max(axis=0) - x.min(axis=0))
        brightest = x[:, score >= np.partition(score, (3 * score.size) // 4)[(3 * score.size) // 4]]
        background = np.median(brightest, axis=1)
        spread = 3.0 * float(np.median(_distance(brightest, background)))
        dist = _distance(x, background)
        p_bg = np.exp(-0.5 * (dist / max(spread, MIN_BACKGROUND_SPREAD)) ** 2).astype(np.float32)
    if labels is not None:
        p_nuc = (labels == NUCLEUS).astype(np.float32).reshape(-1)
    else:
        p_nuc = _dark_part(x.sum(axis=0) / 3, p_bg)
    if softness > 0:
        p_bg, p_nuc = (
            cv2.GaussianBlur(p.reshape(shape), (0, 0), softness, borderType=cv2.BORDER_REFLECT).reshape(-1)
            for p in (p_bg, p_nuc)
        )
    return background.astype(np.float32), p_bg, p_nuc


def _distance(planes: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Euclidean distance of every column of (3, P) ``planes`` from ``colour`` (3,)."""
    d = planes - colour[:, None].astype(planes.dtype)
    d *= d
    return np.sqrt(d.sum(axis=0))


def _dark_part(lum: np.ndarray, p_bg: np.ndarray) -> np.ndarray:
    """Soft mask of pixels darker than an Otsu threshold of the foreground's brightness."""
    from skimage.filters import threshold_otsu

    fg = lum[p_bg < 0.5]
    if fg.size < 64 or np.ptp(fg) < 1:
        return np.zeros_like(lum)
    t = threshold_otsu(fg)
    # a logistic ramp about 4 levels wide instead of a step: a hard threshold draws noise edges
    return (1 / (1 + np.exp((lum - t) / 2.0))).astype(np.float32)


def display(image: np.ndarray, labels: np.ndarray | None = None, *, settings: DisplaySettings) -> np.ndarray:
    """Display-normalise one (H, W, 3) uint8 RGB crop (labels (H, W) uint8 or ``None``)."""
    x = planar(image)
    bg_est, p_bg, p_nuc = soft_regions(x, labels, image.shape[:2], softness=settings.softness)
    target = np.asarray(settings.background, np.float32)
    # white balance then contrast, t - c (t - g x), as one gain and one offset per channel
    x *= (settings.contrast * target / np.maximum(bg_est, 1.0))[:, None]
    x += (target * (1.0 - settings.contrast))[:, None]
    weight = p_nuc.sum()
    step = np.empty_like(x)
    if weight > 1 and settings.nucleus_gain != 1:
        nuc_mean = (x @ p_nuc) / weight
        np.subtract(x, nuc_mean[:, None], out=step)
        step *= (settings.nucleus_gain - 1) * p_nuc
        x += step
    np.subtract(target[:, None], x, out=step)
    step *= p_bg
    x += step
    return to_image(x, image.shape)


def display_tensors(images: torch.Tensor, masks: torch.Tensor | None, *, settings: DisplaySettings) -> torch.Tensor:
    """:func:`display` for a batch of (N, H, W, 3) uint8 tensors (masks (N, H, W) uint8 or ``None``).

    Both ways of finding the background (labelled, estimated from colour) are computed for the
    whole batch and each crop takes the one :func:`soft_regions` would pick for it.
    """
    import torch

    from cellbatch.normalise.torch_ops import gaussian_blur, masked_mean, masked_quantile, planar, to_images

    n, h, w, _ = images.shape
    x = planar(images)  # (N, 3, P)
    lum = x.sum(dim=1) / 3
    # estimated from colour: the brightest, least saturated quarter
    score = lum - (x.amax(dim=1) - x.amin(dim=1))
    kth = (3 * score.shape[1]) // 4
    brightest = score >= score.kthvalue(kth + 1, dim=1).values.unsqueeze(1)
    background = masked_quantile(x, brightest.unsqueeze(1), 0.5)  # (N, 3)
    dist = torch.linalg.vector_norm(x - background.unsqueeze(2), dim=1)  # (N, P)
    spread = (3.0 * masked_quantile(dist, brightest, 0.5)).clamp(min=MIN_BACKGROUND_SPREAD)
    p_bg = torch.exp(-0.5 * (dist / spread.unsqueeze(1)) ** 2)
    if masks is not None:
        flat = masks.reshape(n, -1)
        bg_mask = flat == BACKGROUND
        labelled = bg_mask.sum(dim=1) >= MIN_BACKGROUND_PIXELS
        background = torch.where(labelled.unsqueeze(1), masked_mean(x, bg_mask), background)
        p_bg = torch.where(labelled.unsqueeze(1), bg_mask.to(torch.float32), p_bg)
        p_nuc = (flat == NUCLEUS).to(torch.float32)
    else:
        p_nuc = _dark_part_tensors(lum, p_bg)
    p_bg = gaussian_blur(p_bg.reshape(n, h, w), settings.softness).reshape(n, 1, -1)
    p_nuc = gaussian_blur(p_nuc.reshape(n, h, w), settings.softness).reshape(n, 1, -1)
    target = torch.tensor(settings.background, dtype=torch.float32, device=x.device).view(1, 3, 1)
    x = x * (target / background.clamp(min=1.0).unsqueeze(2))
    x = target - settings.contrast * (target - x)
    weight = p_nuc.sum(dim=2, keepdim=True)
    if settings.nucleus_gain != 1:
        nuc_mean = (x * p_nuc).sum(dim=2, keepdim=True) / weight.clamp(min=1e-12)
        x = torch.where(weight > 1, x + (settings.nucleus_gain - 1) * p_nuc * (x - nuc_mean), x)
    x = x + p_bg * (target - x)
    return to_images(x + 0.5, h, w)


def _dark_part_tensors(lum: torch.Tensor, p_bg: torch.Tensor) -> torch.Tensor:
    """:func:`_dark_part` for (N, P) brightness and background weight: Otsu's threshold of each crop's
    foreground brightness (a 256-bin histogram over its range, as ``skimage.filters.threshold_otsu``)."""
    import torch

    fg = p_bg < 0.5
    big = torch.finfo(lum.dtype).max
    lo = lum.masked_fill(~fg, big).amin(dim=1, keepdim=True)
    hi = lum.masked_fill(~fg, -big).amax(dim=1, keepdim=True)
    span = hi - lo
    bins = ((lum - lo) / span.clamp(min=1e-12) * 256).floor().clamp(0, 255).long()
    counts = torch.zeros(lum.shape[0], 256, dtype=torch.float64, device=lum.device)
    counts.scatter_add_(1, bins, fg.to(torch.float64))
    edges = torch.linspace(0, 1, 257, dtype=torch.float64, device=lum.device)
    centres = lo.double() + span.double() * (edges[:-1] + edges[1:]) / 2
    weight1 = counts.cumsum(dim=1)
    weight2 = counts.flip(1).cumsum(dim=1).flip(1)
    mean1 = (counts * centres).cumsum(dim=1) / weight1
    mean2 = (counts * centres).flip(1).cumsum(dim=1).flip(1) / weight2
    variance12 = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    threshold = centres.gather(1, variance12.nan_to_num(-1.0).argmax(dim=1, keepdim=True)).to(lum.dtype)
    dark = 1 / (1 + torch.exp((lum - threshold) / 2.0))
    usable = (fg.sum(dim=1, keepdim=True) >= 64) & (span >= 1)
    return torch.where(usable, dark, torch.zeros_like(lum))


class DisplayNormaliser:
    """``--normalise display[:OPTIONS]``: constant background, contrast, nucleus contrast.

    Examples
    --------
    >>> norm = DisplayNormaliser("background=240,230,230;nucleus_gain=1.3")
    >>> crops = np.full((1, 32, 32, 3), 200, np.uint8)
    >>> norm(crops, None)[0, 0, 0].tolist()
    [240, 230, 230]
    """

    name = "display"

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg
        self.settings = parse_display_options(arg)

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        out = np.empty_like(crops)
        for i in range(crops.shape[0]):
            out[i] = display(crops[i], None if masks is None else masks[i], settings=self.settings)
        return out

    def apply_tensors(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """The same on a batch of (N, H, W, 3) uint8 tensors on any device."""
        return display_tensors(images, masks, settings=self.settings)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "arg": self.arg, "settings": asdict(self.settings)}
