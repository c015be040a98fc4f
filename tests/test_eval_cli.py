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
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("cellbatch: error: unknown detector 'nope'") and "\n" not in err


def test_missing_source_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "detect", str(tmp_path / "none"), "--boxes", str(tmp_path / "b.csv")])
    assert "does not exist" in capsys.readouterr().err
