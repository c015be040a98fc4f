"""Synthetic captures: scene, ground truth, the two optics, and the files ``cellbatch synth`` writes."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cellbatch.cli import cli
from cellbatch.detect.base import BACKGROUND, CYTOPLASM, NUCLEUS, RED_CELL
from cellbatch.errors import ConfigError, InputFormatError, OutputError
from cellbatch.read import read_image
from cellbatch.synth import (
    CSV_COLUMNS,
    WBC_TYPES,
    SynthCapture,
    apply_optics,
    synth_capture,
    write_synth,
)


def capture(seed: int, **kwargs) -> SynthCapture:
    return synth_capture(np.random.default_rng(seed), **kwargs)


@pytest.fixture(scope="module")
def eosinophils() -> list[SynthCapture]:
    return [capture(s, n_white=1, cell_types=("eosinophil",)) for s in range(3)]


def test_same_seed_gives_identical_capture_and_another_seed_does_not():
    a, b, c = capture(7), capture(7), capture(8)
    for field in ("dm96", "dm1200", "labels", "granules"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.cells == b.cells
    assert not np.array_equal(a.dm96, c.dm96)


def test_capture_has_documented_shapes_dtypes_and_classes():
    cap = capture(0)
    assert cap.dm96.shape == cap.dm1200.shape == (480, 640, 3)
    assert cap.dm96.dtype == cap.dm1200.dtype == np.uint8
    assert cap.labels.shape == (480, 640) and cap.labels.dtype == np.uint8
    assert set(np.unique(cap.labels)) <= {BACKGROUND, RED_CELL, CYTOPLASM, NUCLEUS}
    # Many red cells, as in a monolayer: a fifth to two thirds of the field.
    assert 0.2 < np.mean(cap.labels == RED_CELL) < 0.66


def test_custom_shape_and_cell_diameter_scale_the_scene():
    small = capture(1, shape=(240, 320), cell_diameter=55.0, n_white=1, cell_types=("neutrophil",))
    assert small.dm96.shape == (240, 320, 3)
    assert 45 < small.cells[0].diameter < 65
    assert abs(small.cells[0].cx - 160) < 15 and abs(small.cells[0].cy - 120) < 15


@pytest.mark.parametrize("cell_type", WBC_TYPES)
def test_white_cell_centre_has_nucleus_nearby_and_cell_around_it(cell_type):
    cap = capture(3, n_white=1, cell_types=(cell_type,))
    (cell,) = cap.cells
    assert cell.cell_type == cell_type
    yy, xx = np.mgrid[0:480, 0:640]
    r = np.hypot(xx - cell.cx, yy - cell.cy)
    assert np.sum((cap.labels == NUCLEUS) & (r < 0.3 * cell.diameter)) > 100
    assert cap.labels[int(round(cell.cy)), int(round(cell.cx))] in (CYTOPLASM, NUCLEUS)
    # The labelled cell matches the reported diameter (area of a disc, within irregularity).
    area = np.sum(np.isin(cap.labels, (CYTOPLASM, NUCLEUS)) & (r < cell.diameter))
    assert 0.8 < area / (np.pi * cell.diameter**2 / 4) < 1.2


def test_cell_sizes_follow_type():
    d = {t: capture(5, n_white=1, cell_types=(t,)).cells[0].diameter for t in ("lymphocyte", "monocyte")}
    assert d["lymphocyte"] < 95 < 120 < d["monocyte"]


def test_n_white_and_cell_types_are_honoured():
    cap = capture(2, n_white=2, cell_types=("basophil",))
    assert [c.cell_type for c in cap.cells] == ["basophil", "basophil"]
    first, second = cap.cells
    assert np.hypot(first.cx - 320, first.cy - 240) < 25
    assert np.hypot(first.cx - second.cx, first.cy - second.cy) > (first.diameter + second.diameter) / 2
    assert capture(2, n_white=0).cells == ()


def test_default_scene_usually_has_one_white_cell_near_the_centre():
    counts = [len(capture(s, shape=(120, 160), cell_diameter=27.5, platelets=False).cells) for s in range(60)]
    assert counts.count(1) > 40 and set(counts) <= {0, 1, 2}


def test_bad_scene_options_raise_config_error():
    with pytest.raises(ConfigError, match="unknown white-cell types"):
        capture(0, cell_types=("erythroblast",))
    with pytest.raises(ConfigError, match="do not fit"):
        capture(0, shape=(120, 160), n_white=9)
    with pytest.raises(ConfigError, match="cell_diameter"):
        capture(0, cell_diameter=0.0)
    with pytest.raises(ConfigError, match="n_white"):
        capture(0, n_white=-1)


def class_shift(cap: SynthCapture, mask: np.ndarray) -> np.ndarray:
    return cap.dm1200[mask].astype(float).mean(0) - cap.dm96[mask].astype(float).mean(0)


def test_optics_shift_each_stained_class_its_own_way(eosinophils):
    cap = eosinophils[0]
    bg, nuc = class_shift(cap, cap.labels == BACKGROUND), class_shift(cap, cap.labels == NUCLEUS)
    eos = class_shift(cap, cap.granules > 0.9)
    # The LED look: background bluer, nucleus bluer and less red, eosin granules toward pink.
    assert bg[2] > 25 and nuc[0] < -10 < 10 < nuc[2] and eos[2] > 30 and eos[0] > 0
    for a, b in ((bg, nuc), (bg, eos), (nuc, eos)):
        assert np.linalg.norm(a - b) > 20


def affine_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residuals (N, 3) of the best affine RGB map x -> y by least squares."""
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return design @ coef - y


def test_no_single_global_affine_map_explains_the_optics():
    caps = [capture(s, n_white=1, cell_types=(t,)) for s, t in enumerate(("eosinophil", "monocyte"))]
    xs, ys, classes = [], [], []
    for cap in caps:
        cls = np.where(cap.granules > 0.9, 4, np.where(cap.granules > 0.05, 255, cap.labels)).astype(np.uint8)
        # Pixels away from class borders (granules are too small to have an inside: take them whole).
        kernel = np.ones((7, 7), np.uint8)
        pure = (cv2.dilate(cls, kernel) == cv2.erode(cls, kernel)) | (cls == 4)
        xs.append(cap.dm96[pure])
        ys.append(cap.dm1200[pure])
        classes.append(cls[pure])
    x, y, cls = (np.concatenate(a) for a in (xs, ys, classes))
    # The same number of pixels of each class, so that background does not swamp the fit.
    pick = np.random.default_rng(0)
    idx = np.concatenate([pick.choice(np.flatnonzero(cls == k), 1000) for k in range(5)])
    x, y, cls = x[idx].astype(float), y[idx].astype(float), cls[idx]
    rms = lambda r: float(np.sqrt(np.mean(r**2)))  # noqa: E731
    per_class = [rms(affine_fit(x[cls == k], y[cls == k])) for k in range(5)]
    residual = affine_fit(x, y)
    worst_bias = max(np.abs(residual[cls == k].mean(0)).max() for k in range(5))
    # Noise and sharpening leave a little residual inside a class; one global map leaves far more,
    # and systematically: whole classes end up the wrong colour.
    assert max(per_class) < 3.5
    assert rms(residual) > 2 * max(per_class)
    assert worst_bias > 8


def test_optics_blend_softly_across_a_class_border():
    image = np.full((16, 32, 3), (180, 120, 160), dtype=np.uint8)
    labels = np.zeros((16, 32), dtype=np.uint8)
    labels[:, 16:] = NUCLEUS
    row = apply_optics(image, labels)[8].astype(float)
    left, right = row[2], row[29]
    assert np.linalg.norm(left - right) > 20
    # Pixels next to the border lie strictly between the two class colours.
    for x in (15, 16):
        t = np.dot(row[x] - left, right - left) / np.dot(right - left, right - left)
        assert 0.1 < t < 0.9


def test_apply_optics_dm96_is_identity_and_bad_input_is_refused():
    cap = capture(4, shape=(64, 64), cell_diameter=20.0)
    np.testing.assert_array_equal(apply_optics(cap.dm96, cap.labels, optics="dm96"), cap.dm96)
    with pytest.raises(ConfigError, match="unknown optics"):
        apply_optics(cap.dm96, cap.labels, optics="dm9600")
    with pytest.raises(InputFormatError, match="does not match"):
        apply_optics(cap.dm96, cap.labels[:10])
    with pytest.raises(InputFormatError, match="uint8"):
        apply_optics(cap.dm96.astype(np.float32), cap.labels)


def test_apply_optics_noise_is_seeded():
    cap = capture(4, shape=(64, 64), cell_diameter=20.0)
    a = apply_optics(cap.dm96, cap.labels, rng=np.random.default_rng(1))
    b = apply_optics(cap.dm96, cap.labels, rng=np.random.default_rng(1))
    c = apply_optics(cap.dm96, cap.labels)
    np.testing.assert_array_equal(a, b)
    assert 0.5 < np.std(a.astype(float) - c) < 3


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_write_synth_writes_matching_pairs_and_cells_csv(tmp_path):
    out = write_synth(tmp_path / "s", count=3, seed=11, labels=True)
    names = [f"capture_{i:05d}.png" for i in range(3)]
    for look in ("dm1200", "dm96", "labels"):
        assert sorted(p.name for p in (out / look).iterdir()) == names
    rows = read_rows(out / "cells.csv")
    assert (out / "cells.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    expected = [(n, c) for i, n in enumerate(names) for c in capture_for(11, i).cells]
    assert [(r["filename"], r["cell_type"]) for r in rows] == [(n, c.cell_type) for n, c in expected]
    assert all(abs(float(r["cx"]) - c.cx) < 0.01 for r, (_, c) in zip(rows, expected, strict=True))
    cap0 = capture_for(11, 0)
    np.testing.assert_array_equal(read_image(out / "dm96" / names[0]), cap0.dm96)
    np.testing.assert_array_equal(read_image(out / "dm1200" / names[0]), cap0.dm1200)
    # Each CSV centre sits on its cell, with nucleus pixels near it in the written label image.
    assert rows
    yy, xx = np.mgrid[0:480, 0:640]
    for r in rows:
        labels = read_image(out / "labels" / r["filename"])[..., 0]
        near = np.hypot(xx - float(r["cx"]), yy - float(r["cy"])) < 0.3 * float(r["diameter"])
        assert np.sum(near & (labels == NUCLEUS)) > 100


def test_write_synth_shows_progress_when_asked(tmp_path, capsys):
    write_synth(tmp_path / "p", count=1, seed=0, looks=("dm96",), progress=True)
    assert "synth" in capsys.readouterr().err


def capture_for(seed: int, index: int) -> SynthCapture:
    return synth_capture(np.random.default_rng([seed, index]))


def test_write_synth_is_idempotent_and_capture_does_not_depend_on_count(tmp_path):
    a = write_synth(tmp_path / "a", count=2, seed=3, looks=("dm96",))
    first = (a / "dm96" / "capture_00001.png").read_bytes()
    write_synth(a, count=3, seed=3, looks=("dm96",))
    assert (a / "dm96" / "capture_00001.png").read_bytes() == first
    assert len(list((a / "dm96").iterdir())) == 3


def test_write_synth_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a cellbatch synth output"):
        write_synth(tmp_path, count=1, seed=0)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_cli_synth_writes_one_look_with_labels(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["synth", str(out), "--count", "2", "--seed", "5", "--look", "dm96", "--labels", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cells.csv", "dm96", "labels", "synth.json"]
    assert len(list((out / "labels").iterdir())) == 2
    labels = read_image(out / "labels" / "capture_00000.png")
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
