"""``cellbatch normalise fit``: folders and Zarr in, a usable versioned profile out, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import zarr

from cellbatch.detect.base import Detection, DetectSettings
from cellbatch.errors import ExitCode
from cellbatch.registry import detectors, normalisers
from tests.test_normalise_hm import MEANS, scene, shifted, to_uint8


class NearestColourDetector:
    """Labels each pixel with the class whose DM96 mean colour is nearest (the scenes' classes)."""

    def __init__(self, settings: DetectSettings) -> None:
        self.settings = settings

    def __call__(self, image: np.ndarray) -> Detection:
        d = ((image[..., None, :].astype(np.float32) - MEANS.astype(np.float32)) ** 2).sum(axis=-1)
        return Detection(cells=(), labels=d.argmin(axis=-1).astype(np.uint8))


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Unpaired folders: shifted 'dm1200' scenes and plain 'dm96' scenes, 4 each."""
    detectors.register("nearest-colour", NearestColourDetector)
    root = tmp_path_factory.mktemp("captures")
    rng = np.random.default_rng(0)
    for look in ("dm1200", "dm96"):
        (root / look).mkdir()
        for i in range(4):
            img, lab = scene(rng)
            iio.imwrite(root / look / f"c{i}.png", shifted(img, lab) if look == "dm1200" else to_uint8(img))
    return root / "dm1200", root / "dm96"


def cli(*args: str) -> int:
    from cellbatch.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    return int(info.value.code)


def test_fit_hm_writes_a_versioned_profile_that_hm_can_apply(captures, tmp_path: Path, capsys) -> None:
    src, tgt = captures
    out = tmp_path / "hm.json"
    code = cli(
        "normalise",
        "fit",
        "--source",
        str(src),
        "--target",
        str(tgt),
        "--out",
        str(out),
        "--detector",
        "nearest-colour",
        "--limit",
        "3",
        "--cell-diameter",
        "60",
    )
    assert code == ExitCode.OK
    assert f"use --normalise hm:{out}" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["format"] == "cellbatch-hm-profile" and data["version"] == 1
    assert data["fit"]["source_images"] == 3 and data["fit"]["target_images"] == 3
    assert data["fit"]["detector"] == "nearest-colour" and data["fit"]["cell_diameter"] == 60
    assert np.asarray(data["transform"]["A"]).shape == (4, 3, 3)
    img, lab = scene(np.random.default_rng(9))
    out_img = normalisers.get("hm")(str(out))(shifted(img, lab)[None], lab[None])[0]
    assert np.abs(out_img.astype(float) - to_uint8(img)).mean() < 3


def test_fit_reads_zarr_stores_and_reports_json(captures, tmp_path: Path, capsys) -> None:
    src, tgt = captures
    store = tmp_path / "dm96.zarr"
    stack = np.stack([iio.imread(p) for p in sorted(tgt.glob("*.png"))])
    zarr.create_array(store=str(store), data=stack)
    out = tmp_path / "g.json"
    code = cli(
        "normalise",
        "fit",
        "--method",
        "global",
        "--source",
        str(src),
        "--target",
        str(store),
        "--out",
        str(out),
        "--json",
    )
    assert code == ExitCode.OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["target_images"] == 4 and len(summary["sha256"]) == 64
    assert json.loads(out.read_text())["format"] == "cellbatch-global-profile"


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_target_only_methods_need_no_source(captures, tmp_path: Path, method: str) -> None:
    out = tmp_path / f"{method}.json"
    assert cli("normalise", "fit", "--method", method, "--target", str(captures[1]), "--out", str(out)) == 0
    assert (
        normalisers.get(method)(str(out)).provenance()["profile"]["format"] == f"cellbatch-{method}-profile"
    )


def test_user_mistakes_are_one_line_errors(captures, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "p.json")
    assert cli("normalise", "fit", "--method", "global", "--target", str(captures[1]), "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: cellbatch normalise fit") and "--method global needs --source" in err
    assert (
        cli(
            "normalise",
            "fit",
            "--method",
            "global",
            "--source",
            str(empty),
            "--target",
            str(captures[1]),
            "--out",
            out,
        )
        == 3
    )
    err = capsys.readouterr().err
    assert "cannot fit a global profile" in err and "hold captures" in err and err.count("\n") == 1
    assert (
        cli(
            "normalise",
            "fit",
            "--source",
            str(captures[0]),
            "--target",
            str(captures[1]),
            "--out",
            out,
            "--detector",
            "no-such",
        )
        == 2
    )
    assert "unknown detector 'no-such'" in capsys.readouterr().err
    assert not Path(out).exists()
