"""Validation figures: l1, PSNR, SSIM, CIEDE2000 colour difference and classifier agreement.

All figures compare uint8 RGB images (N, Y, X, 3), the generated ones rounded as the pipeline writes
them. ``l1`` is the mean absolute difference on the [0, 1] scale; ``delta_e`` the mean CIEDE2000
difference per pixel (CIELAB, D65) over the whole crop; ``delta_e_cell`` the same over the white-cell
pixels (a mask per image, from the detector), averaged per cell, then over cells; ``agreement`` the
share of cells the classifier puts in the same class for the image and for its target.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cellbatch.colour import delta_e_map
from cellbatch.train.data import to_tensor, to_uint8

Classify = Callable[[np.ndarray], np.ndarray]


def image_metrics(images: np.ndarray, targets: np.ndarray, masks: np.ndarray | None = None) -> dict[str, float]:
    """Mean l1, PSNR (dB), SSIM and CIEDE2000 ΔE of uint8 (N, Y, X, 3) ``images`` against ``targets``.

    With ``masks`` (N, Y, X) bool (the white-cell pixels of each target), also ``delta_e_cell``; images
    whose mask is empty do not count towards it.
    """
    a = images.astype(np.float64) / 255.0
    b = targets.astype(np.float64) / 255.0
    psnr, ssim, delta_e, delta_e_cell = [], [], [], []
    for i, (img, tgt) in enumerate(zip(a, b, strict=True)):
        with np.errstate(divide="ignore"):  # identical images: PSNR is +inf, not a warning
            psnr.append(peak_signal_noise_ratio(tgt, img, data_range=1.0))
        ssim.append(structural_similarity(tgt, img, data_range=1.0, channel_axis=-1))
        de = delta_e_map(images[i], targets[i])
        delta_e.append(float(de.mean()))
        if masks is not None and masks[i].any():
            delta_e_cell.append(float(de[masks[i]].mean()))
    result = {
        "l1": float(np.abs(a - b).mean()),
        "psnr": float(np.mean(psnr)),
        "ssim": float(np.mean(ssim)),
        "delta_e": float(np.mean(delta_e)),
    }
    if delta_e_cell:
        result["delta_e_cell"] = float(np.mean(delta_e_cell))
    return result


def classifier_labels(path: str, *, device: torch.device) -> Classify:
    """A function giving the class index of each uint8 (N, 256, 256, 3) image, from a classifier file."""
    from cellbatch.modelfile import load_model

    model = load_model(path, kind="classifier", device=str(device)).module

    def classify(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
        with torch.no_grad():
            return model(x.to(device)).argmax(dim=1).cpu().numpy()

    return classify


def figures(
    images: np.ndarray, targets: np.ndarray, classify: Classify | None, masks: np.ndarray | None = None
) -> dict[str, float]:
    """:func:`image_metrics`, plus ``agreement`` when a classifier is given."""
    result = image_metrics(images, targets, masks)
    if classify is not None:
        result["agreement"] = float((classify(images) == classify(targets)).mean())
    return result


def generate(
    generator: torch.nn.Module, source: np.ndarray, *, device: torch.device, batch_size: int
) -> np.ndarray:
    """Run ``generator`` (eval mode, no gradients, float32 as exported) over uint8 images; uint8 results."""
    was_training = generator.training
    generator.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(source), batch_size):
            x = to_tensor(source[start : start + batch_size]).to(device)
            out.append(to_uint8(generator(x)))
    generator.train(was_training)
    return np.concatenate(out)
