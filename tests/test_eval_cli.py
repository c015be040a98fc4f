"""``cellbatch eval detect`` on a small folder of hand-drawn captures."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import imageio.v3 as iio
import numpy as np
import pytest
from click.testing import CliRunner

from cellbatch.cli import cli, main


def capture_with_cell(x: int, y: int) -> np.ndarray:
    image = np.full((240, 320, 3), (250, 235, 212), np.uint8)
    cv2.circle(image, (x, y), 28, (214, 186, 210), -1)
    cv2.circle(image, (x, y), 20, (70, 40, 130), -1)
    return image


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "captures"
    src.mkdir()
    iio.imwrite(src / "one.png", capture_with_cell(100, 120))
    iio.imwrite(src / "empty.png", np.full((240, 320, 3), (250, 235, 212), np.uint8))
    (tmp_path / "boxes.csv").write_text(
        "filename,xmin,ymin,xmax,ymax\none.png,70,90,130,150\nempty.png,200,100,260,160\n"
    )
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(cli, ["eval", "detect", *args], catch_exceptions=False)


def test_prints_recall_and_precision(folder: Path) -> None:
    result = invoke(str(folder / "captures"), "--boxes", str(folder / "boxes.csv"), "--cell-diameter", "56")
    assert result.exit_code == 0, result.output
    assert "recall 0.5000  precision 1.0000" in result.output


def test_verbose_lists_misses_per_image(folder: Path) -> None:
    result = invoke(str(folder / "captures"), "--boxes", str(folder / "boxes.csv"), "--cell-diameter", "56", "-v")
    assert "empty.png: missed box (200, 100, 260, 160)" in result.output
    assert "one.png" not in result.output.split("images")[0]


def test_json_summary_for_machines(folder: Path) -> None:
    result = invoke(
        str(folder / "captures"), "--boxes", str(folder / "boxes.csv"), "--cell-diameter", "56", "--json", "-v"
    )
    summary = json.loads(result.output)
    assert summary["boxes"] == 2 and summary["hits"] == 1 and summary["recall"] == 0.5
    assert summary["detector"] == "threshold" and summary["cell_diameter"] == 56.0
    per_image = {row["image"]: row for row in summary["per_image"]}
    assert per_image["empty.png"]["missed"] == [[200.0, 100.0, 260.0, 160.0]]


def test_wrong_cell_diameter_changes_the_outcome(folder: Path) -> None:
    """--cell-diameter reaches the detector: at 4x the size the small cell is too small to count."""
    result = invoke(str(folder / "captures"), "--boxes", str(folder / "boxes.csv"), "--cell-diameter", "224", "--json")
    assert json.loads(result.output)["hits"] == 0


def test_unknown_detector_is_one_line_error(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "detect", str(folder / "captures"), "--boxes", str(folder / "boxes.csv"), "--detector", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Usage: cellbatch eval detect") and "Error: unknown detector 'nope'" in err


def test_missing_source_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "detect", str(tmp_path / "none"), "--boxes", str(tmp_path / "b.csv")])
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture
def centred_folder(tmp_path: Path) -> Path:
    """Single-cell captures by class: centred, 40 px and 90 px off centre; a platelet folder with no cell."""
    src = tmp_path / "export"
    for name in ("lymphocyte", "platelet"):
        (src / name).mkdir(parents=True)
    iio.imwrite(src / "lymphocyte" / "centred.png", capture_with_cell(160, 120))
    iio.imwrite(src / "lymphocyte" / "low.png", capture_with_cell(160, 160))  # its body (r 28) covers the centre
    iio.imwrite(src / "lymphocyte" / "far.png", capture_with_cell(250, 120))
    iio.imwrite(src / "platelet" / "empty.png", np.full((240, 320, 3), (250, 235, 212), np.uint8))
    return src


def test_centred_prints_both_readings_per_class(centred_folder: Path) -> None:
    result = CliRunner().invoke(
        cli, ["eval", "centred", str(centred_folder), "--empty", "platelet", "--cell-diameter", "56", "-v"]
    )
    assert result.exit_code == 0, result.output
    assert "lymphocyte/low.png: fails centroid;" in result.output
    assert "lymphocyte/far.png: fails centroid and body;" in result.output
    assert "centroid 0.3333  body 0.6667" in result.output
    assert "platelet" in result.output and "no cell within 25 px (body) 1.0000" in result.output
    assert "all cell groups     3 captures" in result.output


def test_centred_empty_folder_allows_a_white_cell_at_the_border(centred_folder: Path) -> None:
    """A platelet capture with a real white cell far from the centre is no error; one at the centre is."""
    iio.imwrite(centred_folder / "platelet" / "cell_at_border.png", capture_with_cell(250, 120))
    iio.imwrite(centred_folder / "platelet" / "cell_at_centre.png", capture_with_cell(160, 120))
    result = CliRunner().invoke(
        cli, ["eval", "centred", str(centred_folder), "--empty", "platelet", "--cell-diameter", "56", "--json", "-v"]
    )
    out = json.loads(result.output)
    assert out["groups"]["platelet"]["no_central_cell"] == pytest.approx(2 / 3)
    assert [f["image"] for f in out["failures"] if f["group"] == "platelet"] == ["cell_at_centre.png"]


def test_centred_half_takes_every_other_capture_of_each_folder(centred_folder: Path) -> None:
    counts = {}
    for half in ("even", "odd"):
        result = CliRunner().invoke(
            cli, ["eval", "centred", str(centred_folder), "--cell-diameter", "56", "--half", half, "--json"]
        )
        counts[half] = {k: v["captures"] for k, v in json.loads(result.output)["groups"].items()}
    # lymphocyte: centred, far, low in name order -> even: centred, low; odd: far. platelet: one capture.
    assert counts == {"even": {"lymphocyte": 2, "platelet": 1}, "odd": {"lymphocyte": 1}}


def test_centred_radius_decides_what_counts_as_central(centred_folder: Path) -> None:
    result = CliRunner().invoke(
        cli, ["eval", "centred", str(centred_folder), "--cell-diameter", "56", "--radius", "45", "--json"]
    )
    groups = json.loads(result.output)["groups"]
    assert groups["lymphocyte"]["one_central_centroid"] == pytest.approx(2 / 3)
    assert groups["platelet"]["one_central_centroid"] == 0.0  # not named --empty: scored as a cell class


def test_centred_missing_folder_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "centred", str(tmp_path / "nowhere")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err and "Traceback" not in err
