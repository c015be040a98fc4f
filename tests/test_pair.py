"""Tests for cellbatch.train.pair and ``cellbatch pair``: matching, alignment, output layout, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellbatch.detect.base import NUCLEUS, Cell, Detection, DetectSettings
from cellbatch.errors import ExitCode, OutputError
from cellbatch.train.pair import (
    PAIRS_COLUMNS,
    UNMATCHED_COLUMNS,
    PairSettings,
    align_cells,
    capture_sources,
    crop_source,
    pair_captures,
    warp_target,
    write_pairs,
)

D = 110.0  # cell diameter of the drawn scenes, as in DM captures


def draw_scene(rng: np.random.Generator, centres: tuple[tuple[float, float], ...] = ((320, 240),)) -> np.ndarray:
    """A 480x640 smear: red cells, white cells with lobed nuclei at ``centres``, and fine texture
    (real smears have it, and SIFT needs it)."""
    h, w = 480, 640
    img = np.empty((h, w, 3), np.float32)
    img[:] = (232, 214, 218)
    for _ in range(40):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if min(np.hypot(x - cx, y - cy) for cx, cy in centres) < 0.9 * D:
            continue
        r = rng.uniform(0.3, 0.38) * D
        cv2.circle(img, (int(x), int(y)), int(r), (214, 140, 146), -1, cv2.LINE_AA)
        cv2.circle(img, (int(x), int(y)), int(0.45 * r), (226, 175, 178), -1, cv2.LINE_AA)
    for cx, cy in centres:
        cv2.circle(img, (int(cx), int(cy)), int(D / 2), (205, 185, 222), -1, cv2.LINE_AA)
        for _ in range(int(rng.integers(2, 5))):
            a, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2) * D
            axes = (int(rng.uniform(0.1, 0.18) * D), int(rng.uniform(0.07, 0.12) * D))
            centre = (int(cx + rr * np.cos(a)), int(cy + rr * np.sin(a)))
            cv2.ellipse(img, centre, axes, float(np.degrees(a)), 0, 360, (112, 58, 150), -1, cv2.LINE_AA)
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 2.0)
    img += 40 * texture[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


class NucleusDetector:
    """A stand-in detector: purple pixels are nucleus; lobes closer than a third of a cell are one cell."""

    def __init__(self, settings: DetectSettings | None = None) -> None:
        self.d = (settings or DetectSettings()).cell_diameter

    def __call__(self, image: np.ndarray) -> Detection:
        r, b = image[..., 0].astype(np.int16), image[..., 2].astype(np.int16)
        nucleus = cv2.morphologyEx(((r < 160) & (b > r)).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3)))
        grouped = cv2.dilate(nucleus, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(self.d / 3),) * 2))
        n, groups = cv2.connectedComponents(grouped)
        labels = np.where(nucleus > 0, NUCLEUS, 0).astype(np.uint8)
        cells = []
        for i in range(1, n):
            ys, xs = np.nonzero((groups == i) & (nucleus > 0))
            if len(xs) >= 0.02 * self.d**2:
                cells.append(Cell(float(xs.mean()), float(ys.mean()), len(xs), len(xs), False))
        return Detection(tuple(cells), labels)


def similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """Source -> target map: rotate and scale about the capture centre, then shift."""
    m = cv2.getRotationMatrix2D((320, 240), angle_deg, scale)
    m[:, 2] += shift
    return m


def as_target(image: np.ndarray, source_to_target: np.ndarray, *, optics: bool = False) -> np.ndarray:
    """The same field seen by the other system: moved by ``source_to_target``, optionally with other
    colours, blur and noise."""
    moved = cv2.warpAffine(
        image, source_to_target, (640, 480), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101
    )
    if not optics:
        return moved
    f = cv2.GaussianBlur(moved.astype(np.float32), (0, 0), 1.2) * (0.92, 0.85, 1.05) + (10, 5, -8)
    f += np.random.default_rng(7).normal(0, 3, f.shape)
    return np.clip(f, 0, 255).astype(np.uint8)


def apply(affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ affine[:, :2].T + affine[:, 2]


def test_recovers_a_known_similarity_to_within_a_pixel_and_the_crops_match() -> None:
    source = draw_scene(np.random.default_rng(0))
    known = similarity(3.0, 1.03, (7.0, -5.0))
    result = pair_captures({"a.png": source}, {"a.png": as_target(source, known)}, detector=NucleusDetector())

    assert result.unmatched == ()
    (pair,) = result.pairs
    # Every pixel of the crop window, mapped to the target and back by the recovered fit, must land
    # within a pixel of where it started.
    x0, y0 = pair.crop_origin
    window = np.array([[x, y] for x in (x0, x0 + 255) for y in (y0, y0 + 255)] + [list(pair.source_xy)], float)
    assert np.abs(apply(pair.alignment.affine, apply(known, window)) - window).max() < 1.0
    assert pair.matched_by == "name" and pair.score > 0.9 and pair.alignment.inliers >= 20
    diff = np.abs(pair.source_crop.astype(int) - pair.target_crop.astype(int))
    assert diff.mean() < 2.0  # bicubic twice over fine texture; one pixel off gives about 10
    assert pair.overlap == 1.0 and pair.ncc > 0.99


def test_unaligned_crops_would_fail_the_match_check() -> None:
    """The crop check above can fail: a one-pixel shift of the target already breaks it."""
    source = draw_scene(np.random.default_rng(0))
    crop = crop_source(source, (192, 112))
    shifted = crop_source(source, (193, 112))
    assert np.abs(crop.astype(int) - shifted.astype(int)).mean() > 2.0


def test_full_affine_also_recovers_the_transform() -> None:
    source = draw_scene(np.random.default_rng(1))
    known = similarity(-4.0, 0.98, (-6.0, 9.0))
    result = pair_captures(
        {"a.png": source},
        {"a.png": as_target(source, known, optics=True)},
        detector=NucleusDetector(),
        settings=PairSettings(transform="affine"),
    )
    (pair,) = result.pairs
    pts = np.array([[200.0, 120.0], [440.0, 360.0], pair.source_xy])
    assert np.abs(apply(pair.alignment.affine, apply(known, pts)) - pts).max() < 1.0


def test_template_search_pairs_cells_across_unrelated_names_and_lists_the_rest() -> None:
    rng = np.random.default_rng(2)
    scenes = [draw_scene(rng, ((230, 200), (450, 290))), draw_scene(rng), draw_scene(rng, ((300, 260),))]
    moves = [similarity(2.0, 1.02, (5, 3)), similarity(-3.0, 0.99, (-8, 4)), similarity(1.0, 1.0, (10, -10))]
    source = {f"dm1200/{i}.png": s for i, s in enumerate(scenes)}
    # The DM96 captures are named differently, in another order, with an extra field nobody asked for.
    target = {f"dm96/{name}.jpg": as_target(scenes[i], moves[i], optics=True) for name, i in (("x", 2), ("y", 0))}
    target["dm96/z.jpg"] = as_target(draw_scene(rng), moves[0], optics=True)

    result = pair_captures(source, target, detector=NucleusDetector())

    expected = {"dm1200/0.png": ("dm96/y.jpg", moves[0]), "dm1200/2.png": ("dm96/x.jpg", moves[2])}
    assert sorted(p.name for p in result.pairs) == ["dm1200__0_c0", "dm1200__0_c1", "dm1200__2_c0"]
    for p in result.pairs:
        target_name, move = expected[p.source]
        assert p.target == target_name and p.matched_by == "template"
        pts = np.array([p.source_xy])
        assert np.abs(apply(p.alignment.affine, apply(move, pts)) - pts).max() < 1.0
    sides = sorted((u.side, u.capture) for u in result.unmatched)
    assert sides == [("source", "dm1200/1.png"), ("target", "dm96/z.jpg")]
    assert all(u.reason for u in result.unmatched)


def test_names_pair_captures_even_when_other_fields_look_alike() -> None:
    rng = np.random.default_rng(3)
    a, b = draw_scene(rng), draw_scene(rng)
    move = similarity(1.5, 1.01, (3, -2))
    result = pair_captures(
        {"s1/a.png": a, "s1/b.png": b},
        {"s1/a.bmp": as_target(a, move), "s1/b.bmp": as_target(b, move)},
        detector=NucleusDetector(),
    )
    assert sorted((p.source, p.target, p.matched_by) for p in result.pairs) == [
        ("s1/a.png", "s1/a.bmp", "name"),
        ("s1/b.png", "s1/b.bmp", "name"),
    ]


def test_match_by_name_only_lists_a_source_capture_without_a_namesake() -> None:
    rng = np.random.default_rng(4)
    a, b = draw_scene(rng), draw_scene(rng)
    result = pair_captures(
        {"a.png": a, "b.png": b},
        {"a.png": as_target(a, similarity(0, 1, (2, 2))), "other.png": b},
        detector=NucleusDetector(),
        settings=PairSettings(match="name"),
    )
    assert [p.source for p in result.pairs] == ["a.png"]
    by_side = {u.side: u for u in result.unmatched}
    assert by_side["source"].capture == "b.png" and "no target capture named like b.png" in by_side["source"].reason
    assert by_side["target"].capture == "other.png"
    assert by_side["target"].reason == "no source capture named like other.png"


def test_a_namesake_without_cells_is_named_in_the_reason() -> None:
    scene = draw_scene(np.random.default_rng(11))
    blank = np.full_like(scene, 230)
    result = pair_captures(
        {"a.png": scene, "b.png": blank}, {"a.png": blank, "b.png": scene}, detector=NucleusDetector()
    )
    reasons = {(u.side, u.capture): u.reason for u in result.unmatched}
    assert reasons == {
        ("source", "a.png"): "no white cell detected in target capture a.png",
        ("target", "b.png"): "no white cell detected in source capture b.png",
    }


def test_min_score_leaves_weak_matches_unpaired_with_the_score_in_the_reason() -> None:
    source = draw_scene(np.random.default_rng(5))
    target = as_target(source, similarity(8.0, 1.05, (4, 4)), optics=True)
    result = pair_captures(
        {"a.png": source},
        {"a.png": target},
        detector=NucleusDetector(),
        settings=PairSettings(min_score=0.9999),
    )
    assert result.pairs == ()
    (src,) = [u for u in result.unmatched if u.side == "source"]
    assert "< --min-score 0.9999" in src.reason and 0.5 < src.best_score < 0.9999


def test_alignment_of_unrelated_fields_is_refused_with_a_reason() -> None:
    rng = np.random.default_rng(6)
    outcome = align_cells(draw_scene(rng), draw_scene(rng), (320, 240), (320, 240))
    assert isinstance(outcome, str) and outcome


def test_crop_source_copies_pixels_and_reflects_past_the_border() -> None:
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert np.array_equal(crop_source(image, (5, 7), size=16), image[7:23, 5:21])
    padded = np.pad(image, ((8, 8), (8, 8), (0, 0)), mode="reflect")
    assert np.array_equal(crop_source(image, (-8, -8), size=16), padded[:16, :16])


def test_both_sides_pad_alike_so_an_identity_pair_matches_past_the_border() -> None:
    image = draw_scene(np.random.default_rng(8))
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    for pad in ("reflect", "background"):
        src = crop_source(image, (-100, 300), pad=pad)
        tgt = warp_target(image, identity, (-100, 300), pad=pad)
        assert np.array_equal(src, tgt), pad


def test_write_pairs_writes_same_named_crops_and_both_tables(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    a, lonely = draw_scene(rng), draw_scene(rng)
    result = pair_captures(
        {"slide/a.png": a, "slide/b.png": lonely},
        {"slide/a.png": as_target(a, similarity(2, 1.0, (3, 1)))},
        detector=NucleusDetector(),
        settings=PairSettings(match="name"),
    )
    out = tmp_path / "pairs"
    counts = write_pairs(result, out, parameters={"min_score": 0.7}, command=["cellbatch", "pair"])

    assert counts == {"pairs": 1, "unmatched_source": 1, "unmatched_target": 0}
    src = cv2.imread(str(out / "source/slide__a_c0.png"))[..., ::-1]
    tgt = cv2.imread(str(out / "target/slide__a_c0.png"))[..., ::-1]
    assert np.array_equal(src, result.pairs[0].source_crop) and np.array_equal(tgt, result.pairs[0].target_crop)
    with open(out / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == PAIRS_COLUMNS and rows[0]["name"] == "slide__a_c0"
    affine = np.array(
        [
            [float(rows[0][k]) for k in ("a11", "a12", "a13")],
            [float(rows[0][k]) for k in ("a21", "a22", "a23")],
        ]
    )
    assert np.allclose(affine, result.pairs[0].alignment.affine, atol=1e-3)
    with open(out / "unmatched.csv", newline="") as f:
        unmatched = list(csv.DictReader(f))
    assert tuple(unmatched[0]) == UNMATCHED_COLUMNS
    assert [(u["side"], u["capture"]) for u in unmatched] == [("source", "slide/b.png")]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["counts"] == counts and provenance["parameters"] == {"min_score": 0.7}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind


def test_an_unreadable_capture_is_reported_as_an_input_error_and_leaves_no_output(tmp_path: Path) -> None:
    from cellbatch.errors import InputNotFoundError
    from cellbatch.train.pair import iter_pairs

    scene = draw_scene(np.random.default_rng(12))
    missing = tmp_path / "gone.png"
    with pytest.raises(InputNotFoundError):
        write_pairs(iter_pairs({"a.png": scene}, {"a.png": missing}, detector=NucleusDetector()), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_pair_names_are_flat_file_stems() -> None:
    from cellbatch.train.pair import pair_name

    assert pair_name("slide1/img7.png", 0) == "slide1__img7_c0"
    assert pair_name("img7.jpg", 2) == "img7_c2"
    assert pair_name("/abs/x.png", 1) == "abs__x_c1"  # never a path outside the output folder


def test_write_pairs_refuses_two_pairs_with_one_name(tmp_path: Path) -> None:
    scene = draw_scene(np.random.default_rng(14))
    captures = {"a/b.png": scene, "a__b.png": scene}
    result = pair_captures(captures, captures, detector=NucleusDetector(), settings=PairSettings(match="name"))
    assert [p.name for p in result.pairs] == ["a__b_c0", "a__b_c0"]
    with pytest.raises(OutputError, match="both named a__b_c0"):
        write_pairs(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_pairing_is_deterministic() -> None:
    source = draw_scene(np.random.default_rng(13))
    target = as_target(source, similarity(2.0, 1.02, (4, -3)), optics=True)
    first, second = (pair_captures({"a": source}, {"a": target}, detector=NucleusDetector()).pairs[0] for _ in range(2))
    assert np.array_equal(first.alignment.affine, second.alignment.affine)
    assert np.array_equal(first.target_crop, second.target_crop)


def test_write_pairs_refuses_a_non_empty_output_unless_told(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        write_pairs([], tmp_path)
    write_pairs([], tmp_path, overwrite=True)
    assert not (tmp_path / "keep.txt").exists() and (tmp_path / "pairs.csv").exists()


def test_capture_sources_names_files_by_relative_path_and_zarr_frames_by_index(tmp_path: Path) -> None:
    import zarr

    image = np.zeros((48, 64, 3), np.uint8)
    (tmp_path / "files/slide1").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "files/slide1/c1.png"), image)
    assert list(capture_sources(tmp_path / "files")) == ["slide1/c1.png"]
    array = zarr.create_array(
        store=str(tmp_path / "caps.zarr"), shape=(2, 48, 64, 3), dtype="uint8", chunks=(1, 48, 64, 3)
    )
    array[:] = 7
    loaders = capture_sources(tmp_path / "caps.zarr")
    assert list(loaders) == ["000000", "000001"]
    assert loaders["000001"]().mean() == 7  # type: ignore[operator]


def test_pairs_synthetic_dm1200_and_dm96_looks_with_the_registered_detector() -> None:
    """End to end across the two optics: synthetic DM1200 captures against moved DM96 renders of the
    same fields, unnamed, found by the built-in threshold detector."""
    synth = pytest.importorskip("cellbatch.synth", reason="cellbatch.synth is not in this checkout yet")
    pytest.importorskip("cellbatch.detect.threshold", reason="the threshold detector is not in this checkout yet")
    from cellbatch.registry import detectors

    rng = np.random.default_rng(0)
    moves = [similarity(3.0, 1.03, (7, -5)), similarity(-2.0, 0.98, (-9, 6)), similarity(4.0, 1.01, (3, 11))]
    source, target = {}, {}
    for i, move in enumerate(moves):
        capture = synth.synth_capture(rng, n_white=1)
        source[f"{i}.png"] = capture.dm1200
        target[f"dm96_{2 - i}.png"] = as_target(capture.dm96, move)
    detect = detectors.get("threshold")(DetectSettings(cell_diameter=D))

    result = pair_captures(source, target, detector=detect)

    assert len(result.pairs) >= 2, result.unmatched  # the detector may miss a cell in one look
    for p in result.pairs:
        i = int(p.source[0])
        assert p.target == f"dm96_{2 - i}.png"
        x0, y0 = p.crop_origin
        pts = np.array([[x0, y0], [x0 + 255, y0 + 255], p.source_xy], float)
        assert np.abs(apply(p.alignment.affine, apply(moves[i], pts)) - pts).max() < 1.0
        assert p.ncc > 0.95


def test_recovers_a_known_similarity_on_real_dm96_captures(shared_data: Path) -> None:
    """Real texture: PBC DM96 captures against a moved, recoloured copy of themselves."""
    pytest.importorskip("cellbatch.detect.threshold", reason="the threshold detector is not in this checkout yet")
    from cellbatch.read import read_image
    from cellbatch.registry import detectors

    detect = detectors.get("threshold")(DetectSettings(cell_diameter=D))
    for cell_type in ("neutrophil", "monocyte", "eosinophil"):
        path = sorted((shared_data / "pbc" / cell_type).glob("*.jpg"))[0]
        image = read_image(path)
        h, w = image.shape[:2]
        known = cv2.getRotationMatrix2D((w / 2, h / 2), 3.0, 1.03)
        known[:, 2] += (7, -5)
        moved = cv2.warpAffine(image, known, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
        target = np.clip(moved * np.array([0.92, 0.88, 1.04]) + (8, 4, -6), 0, 255).astype(np.uint8)

        (pair,) = pair_captures({"a.jpg": image}, {"a.jpg": target}, detector=detect).pairs

        x0, y0 = pair.crop_origin
        pts = np.array([[x0, y0], [x0 + 255, y0 + 255], pair.source_xy], float)
        assert np.abs(apply(pair.alignment.affine, apply(known, pts)) - pts).max() < 1.0, path


@pytest.fixture
def capture_dirs(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(10)
    source, target = tmp_path / "dm1200", tmp_path / "dm96"
    for i in range(2):
        scene = draw_scene(rng)
        for root, image in (
            (source, scene),
            (target, as_target(scene, similarity(3.0, 1.03, (7, -5)), optics=True)),
        ):
            (root / "slide").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "slide" / f"cap{i}.png"), image[..., ::-1])
    return source, target


def test_cli_pairs_folders_and_refuses_to_overwrite(capture_dirs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from cellbatch.cli import main
    from cellbatch.registry import detectors

    detectors.register("pair-test-nucleus", NucleusDetector)
    source, target = capture_dirs
    out = tmp_path / "pairs"
    args = ["pair", "--source", str(source), "--target", str(target), "--out", str(out)]
    args += ["--detector", "pair-test-nucleus", "--quiet", "--json"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == ExitCode.OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 2 and summary["unmatched_source"] == 0
    names = sorted(p.relative_to(out / "source").as_posix() for p in (out / "source").rglob("*.png"))
    assert names == ["slide__cap0_c0.png", "slide__cap1_c0.png"]
    assert names == sorted(p.relative_to(out / "target").as_posix() for p in (out / "target").rglob("*.png"))

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == ExitCode.COULD_NOT_RUN
    assert "--overwrite" in capsys.readouterr().err


def test_cli_names_an_unknown_detector(capture_dirs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from cellbatch.cli import main

    source, target = capture_dirs
    with pytest.raises(SystemExit) as exit_info:
        main(["pair", "--source", str(source), "--target", str(target), "--out", str(tmp_path / "o"),
              "--detector", "no-such-detector"])  # fmt: skip
    assert exit_info.value.code == ExitCode.USAGE
    assert "no-such-detector" in capsys.readouterr().err
