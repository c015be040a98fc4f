"""Global, Reinhard and Macenko baselines: each does what its method promises on a case it can solve."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from cellbatch.colour import mean_delta_e
from cellbatch.normalise.global_affine import GlobalAffineNormaliser, fit_global
from cellbatch.normalise.macenko import (
    MacenkoNormaliser,
    background,
    fit_macenko,
    optical_density,
    stain_vectors,
)
from cellbatch.normalise.profile import write_profile
from cellbatch.normalise.reinhard import ReinhardNormaliser, fit_reinhard, rgb_to_lab32
from cellbatch.registry import normalisers
from tests.test_normalise_hm import scene, to_uint8

GAIN = np.array([[1.08, 0.03, 0.0], [0.03, 0.92, 0.02], [0.0, 0.02, 1.1]])
OFFSET = np.array([-12.0, 10.0, -15.0])


def scenes(seed: int, n: int, size: int = 128) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [scene(rng, size)[0] for _ in range(n)]


def test_global_undoes_one_affine_shift_of_the_whole_image(tmp_path: Path) -> None:
    source = [to_uint8(img @ GAIN.T + OFFSET) for img in scenes(0, 8)]
    target = [to_uint8(img) for img in scenes(1, 8)]
    path = write_profile(tmp_path / "g.json", method="global", fields=fit_global(source, target), fit={})
    test = scenes(2, 2, 256)
    crops = np.stack([to_uint8(img @ GAIN.T + OFFSET) for img in test])
    out = GlobalAffineNormaliser(str(path))(crops, None)
    truth = np.stack([to_uint8(img) for img in test])
    assert mean_delta_e(crops, truth) > 5
    assert mean_delta_e(out, truth) < 1.5


def test_reinhard_moves_each_crop_to_the_target_lab_statistics(tmp_path: Path) -> None:
    target = [to_uint8(img) for img in scenes(3, 4)]
    fields = fit_reinhard(target)
    path = write_profile(tmp_path / "r.json", method="reinhard", fields=fields, fit={})
    crop = to_uint8(scenes(4, 1)[0] * 0.8 + 20)
    out = ReinhardNormaliser(str(path))(crop[None], None)[0]
    lab = rgb_to_lab32(out).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(axis=0), fields["target"]["mean"], atol=1.5)
    np.testing.assert_allclose(lab.std(axis=0), fields["target"]["std"], rtol=0.1)


def test_macenko_finds_two_unit_stain_vectors_and_keeps_the_target_look(tmp_path: Path) -> None:
    target = [to_uint8(img) for img in scenes(5, 4, 256)]
    fields = fit_macenko(target)
    stains = fields["target"]["stains"]
    np.testing.assert_allclose(np.linalg.norm(stains, axis=0), 1)
    assert (stains > -1e-9).all() and stains[0, 0] > stains[0, 1]  # first: the red-absorbing (nuclear) stain
    path = write_profile(tmp_path / "m.json", method="macenko", fields=fields, fit={})
    crop = target[0]
    out = MacenkoNormaliser(str(path))(crop[None], None)[0]
    assert out.shape == crop.shape and out.dtype == np.uint8
    assert mean_delta_e(out, crop) < 4  # a target-look crop stays close to the target look


def test_macenko_leaves_a_blank_crop_unchanged() -> None:
    blank = np.full((64, 64, 3), 230, np.uint8)
    assert stain_vectors(optical_density(blank, background(blank))) is None


@pytest.mark.parametrize("name", ["none", "display", "hm", "reinhard", "macenko", "global"])
def test_registry_names_load_and_construct_picklable_objects(name: str) -> None:
    cls = normalisers.get(name)
    assert cls.name == name
    if name in ("none", "display"):
        obj = cls(None)
        assert pickle.loads(pickle.dumps(obj)).provenance()["name"] == name
