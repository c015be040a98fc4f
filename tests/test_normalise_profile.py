"""Profiles: JSON round trip, and one clear ProfileError line for every corrupt or mismatched file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cellbatch.errors import InputNotFoundError, ProfileError
from cellbatch.normalise.global_affine import GlobalAffineNormaliser, fit_global
from cellbatch.normalise.hm import HMNormaliser, fit_hm
from cellbatch.normalise.macenko import MacenkoNormaliser
from cellbatch.normalise.profile import MAX_PROFILE_BYTES, read_profile, write_profile
from cellbatch.normalise.reinhard import ReinhardNormaliser
from cellbatch.registry import normalisers
from tests.test_normalise_hm import scene, shifted, to_uint8


@pytest.fixture(scope="module")
def hm_fields() -> dict:
    rng = np.random.default_rng(0)
    source = [(shifted(*s), s[1]) for s in (scene(rng) for _ in range(2))]
    target = [(to_uint8(s[0]), s[1]) for s in (scene(rng) for _ in range(2))]
    return fit_hm(source, target)


@pytest.fixture
def hm_profile(tmp_path: Path, hm_fields: dict) -> Path:
    return write_profile(
        tmp_path / "hm.json", method="hm", fields=hm_fields, fit={"source": "a", "target": "b"}
    )


def test_profile_survives_its_json_round_trip(hm_profile: Path, hm_fields: dict, tmp_path: Path) -> None:
    data = json.loads(hm_profile.read_text())
    assert data["format"] == "cellbatch-hm-profile" and data["version"] == 1
    profile = read_profile(hm_profile, method="hm")
    np.testing.assert_array_equal(
        profile.array("transform", "A", shape=(4, 3, 3)), hm_fields["transform"]["A"]
    )
    np.testing.assert_array_equal(profile.array("source", "cov", shape=(4, 3, 3)), hm_fields["source"]["cov"])
    # written again from what was read, the file is byte-identical: nothing is lost or rounded
    again = write_profile(
        tmp_path / "again.json",
        method="hm",
        fields={k: v for k, v in profile.data.items() if k not in ("format", "version", "fit")},
        fit=profile.data["fit"],
    )
    assert again.read_bytes() == hm_profile.read_bytes()


def test_provenance_holds_the_profile_sha256(hm_profile: Path) -> None:
    prov = HMNormaliser(str(hm_profile)).provenance()
    assert prov["profile"]["sha256"] == hashlib.sha256(hm_profile.read_bytes()).hexdigest()
    assert prov["profile"]["path"] == str(hm_profile.resolve())


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"format": "cellbatch-hm-profile", "version": 1, "classes": [', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        ('{"hello": 1}', "not a cellbatch profile"),
        ('["a", "list"]', "not a cellbatch profile"),
        ('{"format": "cellbatch-hm-profile", "version": 2}', "has version 2"),
    ],
)
def test_corrupt_profiles_give_one_line_naming_file_and_fix(tmp_path: Path, content, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ProfileError) as info:
        HMNormaliser(str(path))
    message = str(info.value)
    assert expected in message and str(path) in message
    assert "cellbatch normalise fit --method hm" in message and "\n" not in message


def test_a_truncated_field_names_the_field(hm_profile: Path) -> None:
    data = json.loads(hm_profile.read_text())
    data["transform"]["A"] = data["transform"]["A"][:3]
    hm_profile.write_text(json.dumps(data))
    with pytest.raises(
        ProfileError, match=r"field 'transform.A' has shape \(3, 3, 3\), expected \(4, 3, 3\)"
    ):
        HMNormaliser(str(hm_profile))


def test_a_missing_field_and_non_numbers_are_profile_errors(hm_profile: Path) -> None:
    data = json.loads(hm_profile.read_text())
    del data["source"]["mean"]
    hm_profile.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="has no field 'source.mean'"):
        HMNormaliser(str(hm_profile))
    data["source"]["mean"] = [["a", "b", "c"]] * 4
    hm_profile.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="not an array of numbers"):
        HMNormaliser(str(hm_profile))


def test_another_methods_profile_is_a_mismatch_that_says_which_to_use(hm_profile: Path) -> None:
    for cls in (GlobalAffineNormaliser, ReinhardNormaliser, MacenkoNormaliser):
        with pytest.raises(ProfileError) as info:
            cls(str(hm_profile))
        assert f"is a 'hm' profile, not '{cls.name}'" in str(info.value)
        assert f"--normalise hm:{hm_profile}" in str(info.value)


def test_missing_profile_and_missing_argument(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist: fit one with"):
        HMNormaliser(str(tmp_path / "nope.json"))
    with pytest.raises(ProfileError, match="needs a profile: write --normalise hm:PROFILE.json"):
        HMNormaliser(None)


def test_every_fitted_normaliser_is_reachable_through_the_registry(hm_profile: Path, tmp_path: Path) -> None:
    img = to_uint8(scene(np.random.default_rng(5))[0])
    path = write_profile(tmp_path / "g.json", method="global", fields=fit_global([img], [img]), fit={})
    crops = img[None]
    for spec in (f"hm:{hm_profile}", f"global:{path}"):
        name, _, arg = spec.partition(":")
        out = normalisers.get(name)(arg)(crops, None)
        assert out.shape == crops.shape and out.dtype == np.uint8


def _one_line_profile_error(path: Path, expected: str) -> None:
    with pytest.raises(ProfileError) as info:
        HMNormaliser(str(path))
    assert expected in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_deeply_nested_profile_is_a_profile_error(hm_profile: Path) -> None:
    text = hm_profile.read_text().rstrip().removesuffix("}")
    hm_profile.write_text(text + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _one_line_profile_error(hm_profile, "nested too deeply")


def test_a_profile_far_larger_than_any_fitted_one_is_refused_unread(hm_profile: Path) -> None:
    text = hm_profile.read_text().rstrip().removesuffix("}")
    hm_profile.write_text(text + ', "padding": "' + "x" * MAX_PROFILE_BYTES + '"}')
    _one_line_profile_error(hm_profile, "larger than 1000 kB")


@pytest.mark.parametrize(("field", "value"), [(("transform", "A"), 1e308), (("source", "cov"), -1e300),
                                              (("source", "mean"), 256.0)])
def test_absurd_numbers_that_no_fit_gives_are_profile_errors(hm_profile: Path, field, value) -> None:
    data = json.loads(hm_profile.read_text())
    node = data[field[0]][field[1]]
    while isinstance(node[0], list):
        node = node[0]
    node[0] = value
    hm_profile.write_text(json.dumps(data))
    _one_line_profile_error(hm_profile, f"field '{'.'.join(field)}' holds {value:g}, outside")
