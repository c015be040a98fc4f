"""The example plugin in plugins/: found through its entry point, and doing what it says."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cellbatch.detect.base import DetectSettings
from cellbatch.registry import Registry

tomllib = pytest.importorskip("tomllib", reason="reading the plugin's pyproject.toml needs Python 3.11")

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "cellbatch-central-cell"
D = 56.0


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    """The plugin as pip would leave it: importable, with a dist-info holding its declared entry points."""
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    dist_info = tmp_path / f"cellbatch_central_cell-{project['version']}.dist-info"
    dist_info.mkdir()
    name, version = project["name"], project["version"]
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    sections = [
        f"[{group}]\n" + "".join(f"{key} = {target}\n" for key, target in points.items())
        for group, points in project["entry-points"].items()
    ]
    (dist_info / "entry_points.txt").write_text("\n".join(sections))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN))
    yield Registry("detectors")
    sys.modules.pop("cellbatch_central_cell", None)


def capture(*cells: tuple[int, int]) -> np.ndarray:
    """Lymphocyte-like cells (D = 56 px) at the given centres on an MGG-coloured background."""
    import cv2

    image = np.full((240, 320, 3), (250, 235, 212), np.uint8)
    for x, y in cells:
        cv2.circle(image, (x, y), 28, (214, 186, 210), -1)
        cv2.circle(image, (x, y), 20, (70, 40, 130), -1)
    return image


def test_entry_point_names_the_plugin_in_the_registry(installed: Registry) -> None:
    assert "central" in installed.names() and "threshold" in installed.names()
    assert installed.get("central").__name__ == "CentralCellDetector"


def test_keeps_the_centred_cell_and_drops_the_neighbour(installed: Registry) -> None:
    detector = installed.get("central")(DetectSettings(cell_diameter=D))
    image = capture((165, 125), (290, 60))  # a neighbour cut by the corner
    assert len(installed.get("threshold")(DetectSettings(cell_diameter=D))(image).cells) == 2
    cells = detector(image).cells
    assert len(cells) == 1 and abs(cells[0].cx - 165) < 4 and abs(cells[0].cy - 125) < 4


def test_no_cell_near_the_centre_gives_none(installed: Registry) -> None:
    detector = installed.get("central")(DetectSettings(cell_diameter=D))
    detection = detector(capture((40, 40)))
    assert detection.cells == () and detection.labels.shape == (240, 320)


def test_plugin_detector_pickles_for_dask_workers(installed: Registry) -> None:
    detector = installed.get("central")(DetectSettings(cell_diameter=D))
    image = capture((160, 120))
    assert pickle.loads(pickle.dumps(detector))(image).cells == detector(image).cells
