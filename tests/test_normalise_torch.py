"""Every built-in normaliser's torch version agrees with its numpy reference on realistic crops.

Crops and masks come from the run's own extraction (threshold detector) of synthetic DM1200
captures; profiles are fitted on other synthetic captures. Agreement: at least 99.9 % of pixels
within one grey level in every channel, with masks and without.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellbatch.extract import CaptureRef, ExtractSettings, extract_capture
from cellbatch.normalise.display import DisplayNormaliser
from cellbatch.normalise.global_affine import GlobalAffineNormaliser, fit_global
from cellbatch.normalise.hm import HMNormaliser, fit_hm
from cellbatch.normalise.macenko import MacenkoNormaliser, fit_macenko
from cellbatch.normalise.profile import write_profile
from cellbatch.normalise.reinhard import ReinhardNormaliser, fit_reinhard
from cellbatch.normalise.torch_ops import gaussian_blur, masked_quantile
from cellbatch.synth import synth_capture

MIN_WITHIN_ONE_LEVEL = 0.999


@pytest.fixture(scope="module")
def captures():
    rng = np.random.default_rng(7)
    return [synth_capture(rng) for _ in range(6)]


@pytest.fixture(scope="module")
def crops_and_masks(captures):
    crops, masks = [], []
    for i, capture in enumerate(captures[:4]):
        result = extract_capture(capture.dm1200, CaptureRef(source=f"{i}.png", frame=0, path=""), ExtractSettings())
        crops.append(result.crops)
        masks.append(result.masks)
    crops, masks = np.concatenate(crops), np.concatenate(masks)
    assert len(crops) >= 3
    return crops, masks


@pytest.fixture(scope="module")
def normalisers(captures, tmp_path_factory):
    folder = tmp_path_factory.mktemp("profiles")
    fit_set = captures[4:]
    source = [c.dm1200 for c in fit_set]
    target = [c.dm96 for c in fit_set]
    profiles = {
        "hm": fit_hm([(c.dm1200, c.labels) for c in fit_set], [(c.dm96, c.labels) for c in fit_set]),
        "global": fit_global(source, target),
        "reinhard": fit_reinhard(target),
        "macenko": fit_macenko(target),
    }
    paths = {m: str(write_profile(folder / f"{m}.json", method=m, fields=f, fit={})) for m, f in profiles.items()}
    return {
        "hm": HMNormaliser(paths["hm"]),
        "global": GlobalAffineNormaliser(paths["global"]),
        "reinhard": ReinhardNormaliser(paths["reinhard"]),
        "macenko": MacenkoNormaliser(paths["macenko"]),
        "display": DisplayNormaliser(),
        "display-options": DisplayNormaliser("background=240,228,232;nucleus_gain=1.5;contrast=1.2;softness=0"),
    }


def within_one_level(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels whose every channel differs by at most one grey level."""
    return float((np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) <= 1).mean())


@pytest.mark.parametrize("name", ["hm", "global", "reinhard", "macenko", "display", "display-options"])
@pytest.mark.parametrize("with_masks", [True, False])
def test_torch_version_agrees_with_the_numpy_reference(normalisers, crops_and_masks, name, with_masks):
    crops, masks = crops_and_masks
    norm = normalisers[name]
    reference = norm(crops, masks if with_masks else None)
    on_device = norm.apply_tensors(torch.from_numpy(crops), torch.from_numpy(masks) if with_masks else None)
    assert on_device.dtype == torch.uint8 and on_device.shape == crops.shape
    agreement = within_one_level(on_device.numpy(), reference)
    assert agreement >= MIN_WITHIN_ONE_LEVEL, f"{name}: {agreement:.5f} of pixels within one grey level"
    assert not np.array_equal(reference, crops)  # the case is not trivial


@pytest.mark.parametrize("sigma", [1.0, 2.0, 0.7])
def test_gaussian_blur_matches_opencv_reflect_borders(sigma):
    import cv2

    planes = np.random.default_rng(0).random((2, 40, 33), dtype=np.float32)
    ours = gaussian_blur(torch.from_numpy(planes), sigma).numpy()
    for p, o in zip(planes, ours, strict=True):
        np.testing.assert_allclose(o, cv2.GaussianBlur(p, (0, 0), sigma, borderType=cv2.BORDER_REFLECT), atol=1e-5)


def test_masked_quantile_matches_numpy_on_each_subset():
    rng = np.random.default_rng(1)
    values = rng.random((3, 2, 50))
    mask = rng.random((3, 50)) < 0.4
    ours = masked_quantile(torch.from_numpy(values), torch.from_numpy(mask)[:, None, :], 0.99).numpy()
    for i in range(3):
        np.testing.assert_allclose(ours[i], np.quantile(values[i][:, mask[i]], 0.99, axis=1))


def test_lab_conversions_match_opencv():
    import cv2

    from cellbatch.normalise.torch_ops import lab_to_rgb, planar, rgb_to_lab

    image = np.random.default_rng(2).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    ours = rgb_to_lab(planar(torch.from_numpy(image))).numpy()[0].T.reshape(16, 16, 3)
    theirs = cv2.cvtColor(image[0].astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    # OpenCV interpolates float RGB->Lab in a lookup table; the exact formula differs by < 0.3 units
    np.testing.assert_allclose(ours, theirs, atol=0.3)
    back = lab_to_rgb(torch.from_numpy(theirs.reshape(1, -1, 3).transpose(0, 2, 1).copy())).numpy()
    np.testing.assert_allclose(back[0].T.reshape(16, 16, 3), cv2.cvtColor(theirs, cv2.COLOR_LAB2RGB), atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["hm", "global", "reinhard", "macenko", "display"])
def test_torch_version_on_cuda_agrees_with_the_numpy_reference(normalisers, crops_and_masks, name):
    crops, masks = crops_and_masks
    norm = normalisers[name]
    out = norm.apply_tensors(torch.from_numpy(crops).cuda(), torch.from_numpy(masks).cuda())
    assert out.is_cuda
    assert within_one_level(out.cpu().numpy(), norm(crops, masks)) >= MIN_WITHIN_ONE_LEVEL
