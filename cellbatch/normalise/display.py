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
from typing import Any

import cv2
import numpy as np

from cellbatch.detect.base import BACKGROUND, NUCLEUS
from cellbatch.errors import ConfigError

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
    image: np.ndarray, labels: np.ndarray | None, *, softness: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background colour and soft background and nucleus probabilities of one crop.

    Parameters
    ----------
    image : np.ndarray
        (H, W, 3) uint8 RGB.
    labels : np.ndarray or None
        (H, W) uint8 class labels, or ``None`` to estimate the regions from colour.
    softness : float
        Gaussian blur (px) of the masks.

    Returns
    -------
    background : np.ndarray
        (3,) float32 mean background colour.
    p_bg, p_nuc : np.ndarray
        (H, W) float32 probabilities.
    """
    h, w = image.shape[:2]
    # planar (3, P) colours: reductions over the channel axis then run over long contiguous rows
    x = image.reshape(-1, 3).T.astype(np.float32, order="C")
    lum = x.sum(axis=0) / 3
    if labels is not None and (labels == BACKGROUND).sum() >= MIN_BACKGROUND_PIXELS:
        bg_mask = labels == BACKGROUND
        background = x[:, bg_mask.reshape(-1)].mean(axis=1)
        p_bg = bg_mask.astype(np.float32)
    else:
        # a crop filled by its cell has (almost) no labelled background: estimate it from colour
        score = lum - (x.max(axis=0) - x.min(axis=0))
        brightest = x[:, score >= np.partition(score, (3 * score.size) // 4)[(3 * score.size) // 4]]
        background = np.median(brightest, axis=1)
        spread = 3.0 * float(np.median(_distance(brightest, background)))
        dist = _distance(x, background)
        p_bg = np.exp(-0.5 * (dist / max(spread, MIN_BACKGROUND_SPREAD)) ** 2).reshape(h, w)
    if labels is not None:
        p_nuc = (labels == NUCLEUS).astype(np.float32)
    else:
        p_nuc = _dark_part(lum, p_bg.reshape(-1)).reshape(h, w)
    if softness > 0:
        p_bg = cv2.GaussianBlur(p_bg, (0, 0), softness, borderType=cv2.BORDER_REFLECT)
        p_nuc = cv2.GaussianBlur(p_nuc, (0, 0), softness, borderType=cv2.BORDER_REFLECT)
    return background.astype(np.float32), p_bg.astype(np.float32), p_nuc.astype(np.float32)


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
    bg_est, p_bg, p_nuc = soft_regions(image, labels, softness=settings.softness)
    target = np.asarray(settings.background, np.float32)[:, None]
    p_bg, p_nuc = p_bg.reshape(-1), p_nuc.reshape(-1)
    x = image.reshape(-1, 3).T.astype(np.float32, order="C")
    x *= target / np.maximum(bg_est[:, None], 1.0)
    x = target - settings.contrast * (target - x)
    weight = p_nuc.sum()
    if weight > 1 and settings.nucleus_gain != 1:
        nuc_mean = (x @ p_nuc) / weight
        x += (settings.nucleus_gain - 1) * p_nuc * (x - nuc_mean[:, None])
    x += p_bg * (target - x)
    x += 0.5
    np.clip(x, 0, 255, out=x)
    return np.ascontiguousarray(x.astype(np.uint8).T).reshape(image.shape)


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

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "arg": self.arg, "settings": asdict(self.settings)}
