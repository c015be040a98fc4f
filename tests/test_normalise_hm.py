"""HM normalisation: Monge maps, soft class probabilities, recovery of a known per-class shift, no seams."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellbatch.colour import mean_delta_e
from cellbatch.detect.base import CYTOPLASM, NUCLEUS
from cellbatch.normalise.gaussian import ColourStats, monge_map
from cellbatch.normalise.hm import (
    CLASSES,
    ClassLikelihood,
    HMNormaliser,
    blend_affine,
    class_probabilities,
    fit_hm,
)
from cellbatch.normalise.profile import write_profile

# Class colours of a DM96-like crop (background, red cell, cytoplasm, nucleus) and their texture.
MEANS = np.array([[228, 220, 210], [200, 150, 160], [185, 165, 200], [110, 70, 150]], np.float64)
TEXTURE = np.array([2.5, 8.0, 10.0, 14.0])

# A stain-dependent DM96 -> "DM1200" shift: a different symmetric positive-definite gain and offset
# per class (what a change of lamp and filters does), large enough that no single map undoes it.
SHIFT_A = np.array(
    [
        np.diag([0.97, 1.02, 1.05]),
        np.diag([1.05, 0.9, 1.0]) + 0.03 * (1 - np.eye(3)),
        np.diag([0.92, 1.08, 0.97]),
        np.diag([0.85, 1.15, 1.05]) + 0.04 * (1 - np.eye(3)),
    ]
)
SHIFT_B = np.array([[2.0, 12.0, 20.0], [-8.0, 18.0, 8.0], [10.0, -12.0, -10.0], [12.0, -6.0, 14.0]])


def scene(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A DM96-look crop (float RGB) with labels: background, red-cell discs, one white cell."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    labels = np.zeros((size, size), np.uint8)
    for _ in range(5):
        cy, cx = rng.uniform(0, size, 2)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(8, 15) ** 2] = 1
    cy, cx = size / 2 + rng.uniform(-5, 5, 2)
    r = rng.uniform(0.22, 0.3) * size
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = CYTOPLASM
    labels[(yy - cy) ** 2 + ((xx - cx) * 1.3) ** 2 < (0.6 * r) ** 2] = NUCLEUS
    image = MEANS[labels] + rng.normal(0, 1, (size, size, 3)) * TEXTURE[labels][..., None]
    return cv2.GaussianBlur(image, (0, 0), 0.7), labels


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def shifted(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The known per-class affine shift, applied with the true labels."""
    return to_uint8(np.einsum("hwij,hwj->hwi", SHIFT_A[labels], image) + SHIFT_B[labels])


def make_profile(path: Path, **fields) -> str:
    """A hand-made HM profile: identity source Gaussians unless given."""
    k = len(CLASSES)
    base = {
        "classes": list(CLASSES),
        "source": {"mean": MEANS, "cov": np.stack([np.eye(3) * 100] * k), "pixels": [10_000] * k},
        "target": {"mean": MEANS, "cov": np.stack([np.eye(3) * 100] * k), "pixels": [10_000] * k},
        "transform": {"A": np.stack([np.eye(3)] * k), "b": np.zeros((k, 3)), "fallback": [False] * k},
    }
    base.update(fields)
    return str(write_profile(path, method="hm", fields=base, fit={"test": True}))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> str:
    """HM profile fitted, with true labels, on unpaired shifted (source) and plain (target) scenes."""
    rng = np.random.default_rng(1)
    source = [(shifted(*s), s[1]) for s in (scene(rng) for _ in range(6))]
    target = [(to_uint8(s[0]), s[1]) for s in (scene(rng) for _ in range(6))]
    return make_profile(tmp_path_factory.mktemp("hm") / "hm.json", **fit_hm(source, target))


def test_monge_map_is_exact_for_a_symmetric_positive_definite_shift() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (20_000, 3)) @ np.array([[20, 0, 0], [8, 15, 0], [3, 5, 10.0]]) + [150, 120, 170]
    a_true = SHIFT_A[3]
    stats_s, stats_t = ColourStats(1), ColourStats(1)
    stats_s.add(x.reshape(-1, 1, 3))
    stats_t.add((x @ a_true.T + SHIFT_B[3]).reshape(-1, 1, 3))
    gs, gt = stats_s.gaussians(), stats_t.gaussians()
    a, b = monge_map(gs.mean[0], gs.cov[0], gt.mean[0], gt.cov[0], ridge=0)
    np.testing.assert_allclose(a, a_true, atol=1e-6)
    np.testing.assert_allclose(b, SHIFT_B[3], atol=1e-4)


def test_monge_map_is_identity_between_equal_gaussians() -> None:
    cov = np.array([[40.0, 10, 0], [10, 30, 5], [0, 5, 20]])
    a, b = monge_map(np.array([100.0, 90, 80]), cov, np.array([100.0, 90, 80]), cov)
    np.testing.assert_allclose(a, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(b, 0, atol=1e-7)


def test_colour_stats_match_numpy_per_class() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (40, 50), dtype=np.uint8)
    stats = ColourStats(4)
    stats.add(image[:20], labels[:20])
    stats.add(image[20:], labels[20:])
    g = stats.gaussians()
    for k in range(4):
        px = image[labels == k].astype(np.float64)
        np.testing.assert_allclose(g.mean[k], px.mean(axis=0))
        np.testing.assert_allclose(g.cov[k], np.cov(px.T, bias=True), atol=1e-8)


def test_hm_recovers_a_known_per_class_shift_to_below_one_delta_e(fitted: str) -> None:
    rng = np.random.default_rng(7)
    scenes = [scene(rng, 256) for _ in range(3)]
    truth = np.stack([to_uint8(img) for img, _ in scenes])
    crops = np.stack([shifted(img, lab) for img, lab in scenes])
    masks = np.stack([lab for _, lab in scenes])
    out = HMNormaliser(fitted)(crops, masks)
    assert out.shape == crops.shape and out.dtype == np.uint8
    assert mean_delta_e(crops, truth) > 8  # the shift is large ...
    assert mean_delta_e(out, truth) < 1.0  # ... and HM undoes it


def test_hm_without_masks_still_recovers_the_shift_from_colour(fitted: str) -> None:
    img, lab = scene(np.random.default_rng(8), 256)
    out = HMNormaliser(fitted)(shifted(img, lab)[None], None)
    assert mean_delta_e(out[0], to_uint8(img)) < 1.5


def test_probabilities_are_a_partition_of_unity_and_follow_the_labels(fitted: str) -> None:
    norm = HMNormaliser(fitted)
    img, lab = scene(np.random.default_rng(3))
    p = class_probabilities(shifted(img, lab), lab, likelihood=norm.likelihood, settings=norm.settings)
    assert p.shape == (4,) + lab.shape and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=0), 1, atol=1e-5)
    assert (p.argmax(axis=0) == lab).mean() > 0.95


def test_soft_blending_leaves_no_seam_at_a_class_border(tmp_path: Path) -> None:
    # One textured region that the segmentation split into cytoplasm (left) and nucleus (right); the
    # colour fits both classes equally, so only the labels decide, and the two class transforms
    # differ by about 35 levels. Texture as inside real cells (mean gradient ~12 levels/px on PBC).
    k = len(CLASSES)
    b = np.zeros((k, 3))
    b[CYTOPLASM], b[NUCLEUS] = [-12, 8, -10], [12, -8, 10]
    path = make_profile(
        tmp_path / "seam.json", transform={"A": np.stack([np.eye(3)] * k), "b": b, "fallback": [False] * k}
    )
    rng = np.random.default_rng(0)
    middle = (MEANS[CYTOPLASM] + MEANS[NUCLEUS]) / 2
    image = to_uint8(middle + cv2.GaussianBlur(rng.normal(0, 20, (256, 256, 3)), (0, 0), 0.7))
    labels = np.full((256, 256), CYTOPLASM, np.uint8)
    labels[:, 128:] = NUCLEUS

    def column_gradients(out: np.ndarray) -> tuple[float, float]:
        g = np.linalg.norm(np.diff(out.astype(np.float64), axis=1), axis=2).mean(axis=0)
        return g[120:136].max(), np.r_[g[16:104], g[152:-16]].max()

    soft = HMNormaliser(path)(image[None], labels[None])[0]
    border, inside = column_gradients(soft)
    assert border <= inside
    hard = blend_affine(
        image,
        (labels[None] == np.arange(k)[:, None, None]).astype(np.float32),
        b=b,
        a=np.stack([np.eye(3)] * k),
    )
    hard_border, hard_inside = column_gradients(hard)
    assert hard_border > 2 * hard_inside  # the same check catches the seam of hard masks


def test_a_class_missing_from_the_fit_falls_back_to_the_global_map() -> None:
    rng = np.random.default_rng(2)
    scenes = [scene(rng) for _ in range(3)]
    no_red = [(to_uint8(img), np.where(lab == 1, 0, lab).astype(np.uint8)) for img, lab in scenes]
    fields = fit_hm(no_red, no_red)
    assert fields["transform"]["fallback"] == [False, True, False, False]
    assert np.isfinite(fields["source"]["mean"]).all() and np.isfinite(fields["target"]["cov"]).all()


def test_hm_normaliser_pickles_and_records_its_profile(fitted: str) -> None:
    norm = pickle.loads(pickle.dumps(HMNormaliser(fitted)))
    img, lab = scene(np.random.default_rng(4))
    crops = shifted(img, lab)[None]
    np.testing.assert_array_equal(norm(crops, lab[None]), HMNormaliser(fitted)(crops, lab[None]))
    prov = norm.provenance()
    assert prov["name"] == "hm" and prov["arg"] == fitted and len(prov["profile"]["sha256"]) == 64


def test_likelihood_prefers_the_class_whose_colour_a_pixel_has() -> None:
    like = ClassLikelihood(MEANS, np.stack([np.eye(3) * 50] * 4), colour_sigma=4.0)
    log_l = like(MEANS.T.astype(np.float32))
    assert (log_l.argmax(axis=0) == np.arange(4)).all()


def test_hm_clearly_beats_the_global_map_on_the_two_optics_shift(tmp_path: Path) -> None:
    # synth's DM1200 look shifts each stained class its own way (thesis 1.1). One cell type for all
    # sets, so that the unpaired fit sets differ only by optics, not by their mix of cell types.
    from cellbatch.normalise.global_affine import apply_affine, fit_global
    from cellbatch.synth import synth_capture

    def capture(stream: int, i: int):
        rng = np.random.default_rng([0, stream, i])
        return synth_capture(rng, shape=(256, 256), n_white=1, cell_types=("neutrophil",))

    source, target, tests = ([capture(s, i) for i in range(n)] for s, n in ((0, 4), (1, 4), (2, 2)))
    fields = fit_hm([(c.dm1200, c.labels) for c in source], [(c.dm96, c.labels) for c in target])
    glob = fit_global([c.dm1200 for c in source], [c.dm96 for c in target])["transform"]
    crops, masks = np.stack([c.dm1200 for c in tests]), np.stack([c.labels for c in tests])
    truth = np.stack([c.dm96 for c in tests])
    hm = HMNormaliser(make_profile(tmp_path / "hm.json", **fields))(crops, masks)
    affine = np.stack([apply_affine(c, glob["A"], glob["b"]) for c in crops])
    cell = masks >= CYTOPLASM
    hm_error, global_error = mean_delta_e(hm, truth, mask=cell), mean_delta_e(affine, truth, mask=cell)
    assert hm_error < 2.0 and hm_error < 0.5 * global_error
