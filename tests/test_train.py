"""Training: every setup trains and exports, resume is exact, options are checked, data is augmented alike."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellbatch.errors import ConfigError, InputFormatError
from cellbatch.export import export_generator, generator_from_run, generator_metadata
from cellbatch.modelfile import load_model
from cellbatch.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from cellbatch.train.data import AugmentSettings, augment, read_pairs, split_indices
from cellbatch.train.loop import TrainSettings, train
from cellbatch.train.metrics import image_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_pairs(root: Path, *, count: int = 6, size: int = 128, seed: int = 0) -> Path:
    """Random blobs; the target look is a fixed colour map of the source look."""
    rng = np.random.default_rng(seed)
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        cy, cx = rng.uniform(30, size - 30, 2)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(15, 30) ** 2)[..., None]
        src = np.where(blob, [90, 60, 160], [225, 225, 235]) + rng.integers(-8, 9, (size, size, 3))
        tgt = src * [1.0, 0.9, 0.75] + [10, 5, -5]
        iio.imwrite(root / "source" / f"p{i}.png", np.clip(src, 0, 255).astype(np.uint8))
        iio.imwrite(root / "target" / f"p{i}.png", np.clip(tgt, 0, 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_pairs(tmp_path_factory.mktemp("pairs") / "pairs")


def _settings(pairs: Path, setup: str, **kw: object) -> TrainSettings:
    base = {"steps": 2, "base_filters": 4, "batch_size": 2, "checkpoint_every": 2, "val_fraction": 0.34}
    return TrainSettings(setup=setup, pairs=str(pairs), **{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("setup", ["l1net", "l1gan", "ccgan", "pcnet"])
def test_each_setup_trains_and_exports_a_loadable_generator(pairs: Path, tmp_path: Path, setup: str) -> None:
    run = tmp_path / "run"
    result = train(_settings(pairs, setup, vgg_random=setup == "pcnet"), run, device="cpu", progress=False)
    assert result.step == 2
    generator, meta = generator_from_run(run)
    assert meta["setup"] == setup and meta["steps"] == 2 and meta["trained"] is True
    assert set(meta["validation"]["input"]) == {"l1", "psnr", "ssim", "delta_e"}
    path = export_generator(generator, tmp_path / "g.pt", metadata=meta, check_sizes=(128,))["torchscript"]
    model = load_model(path, kind="generator")
    out = model.module(torch.zeros(1, 3, 128, 128))
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()
    assert model.metadata["data_sha256"] == read_pairs(pairs).sha256


def test_resume_continues_the_same_run_exactly(pairs: Path, tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(_settings(pairs, "l1gan", steps=4), whole, device="cpu", progress=False)
    train(_settings(pairs, "l1gan", steps=2), parts, device="cpu", progress=False)
    result = train(_settings(pairs, "l1gan", steps=4), parts, device="cpu", progress=False, resume=True)
    assert result.step == 4
    a, b = load_checkpoint(latest_checkpoint(whole)), load_checkpoint(latest_checkpoint(parts))
    for net in ("G", "D"):
        assert all(torch.equal(a["models"][net][k], b["models"][net][k]) for k in a["models"][net])
    assert a["optimizers"]["G"]["state"][0]["step"] == b["optimizers"]["G"]["state"][0]["step"] == 4
    with open(parts / "metrics.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [2, 4]


def test_an_existing_run_is_not_overwritten_without_resume(pairs: Path, tmp_path: Path) -> None:
    train(_settings(pairs, "l1net"), tmp_path / "run", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(_settings(pairs, "l1net"), tmp_path / "run", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="base_filters"):
        train(_settings(pairs, "l1net", base_filters=8, steps=3), tmp_path / "run", device="cpu", resume=True)


def test_checkpoints_are_pruned_to_the_newest(pairs: Path, tmp_path: Path) -> None:
    train(
        _settings(pairs, "l1net", steps=3, checkpoint_every=1, keep_checkpoints=2),
        tmp_path / "r",
        device="cpu",
    )
    assert [step for step, _ in list_checkpoints(tmp_path / "r")] == [2, 3]


def test_pcnet_refuses_to_train_without_vgg_weights(pairs: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--vgg-weights"):
        train(_settings(pairs, "pcnet"), tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


def test_cli_refuses_pcnet_without_vgg_weights_in_one_line(pairs: Path, tmp_path: Path) -> None:
    from cellbatch.cli.train import train as train_cli

    result = CliRunner().invoke(
        train_cli, ["--setup", "pcnet", "--pairs", str(pairs), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2, "a bad command line: usage line and one error line"
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "--vgg-weights" in error[0]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"setup": "l1net", "weights": {"cycle": 1.0}}, "does not apply to l1net"),
        ({"setup": "l1gan", "vgg_random": True}, "pcnet only"),
        ({"setup": "l1net", "crop": 200}, "multiple of 128"),
        ({"setup": "ccgan", "unpaired_source": "x"}, "go together"),
        ({"setup": "l1net", "batch_size": 1}, "at least 2"),
    ],
)
def test_contradicting_options_are_config_errors(pairs: Path, tmp_path: Path, kw: dict, match: str) -> None:
    setup = kw.pop("setup")
    with pytest.raises(ConfigError, match=match):
        train(_settings(pairs, setup, **kw), tmp_path / "run", device="cpu")


def test_cli_trains_with_weights_and_reports_json(pairs: Path, tmp_path: Path) -> None:
    from cellbatch.cli.train import train as train_cli

    args = ["--setup", "l1net", "--pairs", str(pairs), "--out", str(tmp_path / "r"), "--steps", "2"]
    args += [
        "--base-filters",
        "4",
        "--batch-size",
        "2",
        "--weight",
        "l1=3",
        "--device",
        "cpu",
        "--json",
        "-q",
    ]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["step"] == 2 and "delta_e" in summary["input"]
    stored = json.loads((tmp_path / "r" / "settings.json").read_text())
    assert stored["weights"] == {"l1": 3.0} and stored["batch_size"] == 2


def test_augmentation_treats_source_and_target_alike() -> None:
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    tgt = 255 - src
    x, y = augment([src, tgt], rng=rng, settings=AugmentSettings(rotate=True, intensity=True, crop=64))
    assert x.shape == (4, 3, 64, 64)
    # Same crop, rotation, gain and offset on both: x + y is one constant per image (before clipping).
    total = (x + y).flatten(1)
    unclipped = ((x > -1) & (x < 1) & (y > -1) & (y < 1)).flatten(1)
    for row, keep in zip(total, unclipped, strict=True):
        assert float(row[keep].max() - row[keep].min()) < 1e-5


def test_rotation_is_switchable() -> None:
    rng = np.random.default_rng(0)
    src = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    (x,) = augment([src], rng=rng, settings=AugmentSettings(rotate=False, intensity=False))
    assert np.array_equal(((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), src)


def test_split_is_seeded_and_disjoint() -> None:
    train_idx, val_idx = split_indices(20, val_fraction=0.1, seed=1)
    assert len(val_idx) == 2 and not set(train_idx) & set(val_idx)
    assert np.array_equal(val_idx, split_indices(20, val_fraction=0.1, seed=1)[1])


def test_unmatched_pairs_are_refused(tmp_path: Path) -> None:
    root = _write_pairs(tmp_path / "p", count=3)
    (root / "target" / "p1.png").unlink()
    with pytest.raises(InputFormatError, match="p1.png has no partner"):
        read_pairs(root)


def test_image_metrics_of_identical_images_are_perfect() -> None:
    img = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    m = image_metrics(img, img)
    assert m["l1"] == 0 and m["delta_e"] == 0 and m["ssim"] == pytest.approx(1.0) and m["psnr"] == np.inf
    darker = (img * 0.8).astype(np.uint8)
    assert image_metrics(darker, img)["delta_e"] > 1


def test_pairs_from_synth_writes_aligned_crops(tmp_path: Path) -> None:
    from cellbatch.train.synthpairs import pairs_from_synth

    root = pairs_from_synth(tmp_path / "pairs", count=2, seed=4)
    pairs = read_pairs(root)
    assert pairs.source.shape[1:] == (256, 256, 3) and len(pairs.names) >= 2
    with open(root / "pairs.csv") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == list(pairs.names)
    # Same scene, other look: the images differ in colour but not in where things are.
    gray_src = pairs.source.astype(float).mean(-1)
    gray_tgt = pairs.target.astype(float).mean(-1)
    assert np.corrcoef(gray_src.ravel(), gray_tgt.ravel())[0, 1] > 0.8
    assert image_metrics(pairs.source, pairs.target)["delta_e"] > 2


class _RedOrBlue(torch.nn.Module):
    """A two-class 'classifier': is the image redder or bluer on average."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0].mean((1, 2)), x[:, 2].mean((1, 2))], dim=1)


def test_classifier_adds_agreement_to_validation(pairs: Path, tmp_path: Path) -> None:
    from cellbatch.modelfile import save_model

    clf = save_model(
        torch.jit.trace(_RedOrBlue(), torch.zeros(1, 3, 128, 128)),
        tmp_path / "clf.pt",
        {"kind": "classifier", "classes": ["red", "blue"], "input_range": [0, 1]},
    )
    result = train(
        _settings(pairs, "l1net", classifier=str(clf)), tmp_path / "run", device="cpu", progress=False
    )
    assert 0 <= result.validation["agreement"] <= 1
    assert 0 <= result.baseline["agreement"] <= 1
    with open(tmp_path / "run" / "metrics.csv") as fh:
        assert "val_agreement" in next(csv.DictReader(fh))


def test_ccgan_draws_cycle_images_from_unpaired_folders(pairs: Path, tmp_path: Path) -> None:
    extra = _write_pairs(tmp_path / "extra", count=2, size=160, seed=5)
    settings = _settings(
        pairs,
        "ccgan",
        unpaired_source=str(extra / "source"),
        unpaired_target=str(extra / "target"),
        bf16=True,
    )
    result = train(settings, tmp_path / "run", device="cpu", progress=False)
    assert result.step == 2
    stored = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert stored["unpaired_source"] == str(extra / "source") and stored["bf16"] is True


def test_unpaired_images_smaller_than_the_crop_are_refused(pairs: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    iio.imwrite(small / "a.png", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(InputFormatError, match="smaller than"):
        train(
            _settings(pairs, "ccgan", unpaired_source=str(small), unpaired_target=str(small)),
            tmp_path / "run",
            device="cpu",
        )


class _WritesAFile:
    """Unpickling this runs code: it would create the file named in ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",))


def test_a_crafted_checkpoint_is_refused_without_running_its_payload(pairs: Path, tmp_path: Path) -> None:
    from cellbatch.cli import main

    run = tmp_path / "run"
    train(_settings(pairs, "l1net"), run, device="cpu", progress=False)
    path = latest_checkpoint(run)
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**state, "extra": _WritesAFile(marker)}, path)
    with pytest.raises(InputFormatError, match="does not unpickle"):
        load_checkpoint(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "export", str(run), "--out", str(tmp_path / "g.pt")])
    assert exit_info.value.code == 3
    with pytest.raises(InputFormatError):
        train(_settings(pairs, "l1net", steps=4), run, device="cpu", progress=False, resume=True)
    assert not marker.exists()


# --- time-limited training, its recipe, and what every validation reports ---------------------------


def _synth_pairs(root: Path, count: int = 6) -> Path:
    """Synthetic two-optics pairs (white cells the detector finds, so white-cell figures exist)."""
    from cellbatch.train.synthpairs import pairs_from_synth

    return pairs_from_synth(root, count=count, seed=3)


@pytest.fixture(scope="module")
def cell_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synth_pairs(tmp_path_factory.mktemp("cells") / "pairs")


def test_time_limit_ends_the_run_with_a_full_validation_against_hm(cell_pairs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = TrainSettings(
        setup="l1net", pairs=str(cell_pairs), steps=10**6, time_limit=3.0, checkpoint_seconds=1.0,
        base_filters=4, batch_size=2, val_fraction=0.5, val_quick=1,
    )  # fmt: skip
    result = train(settings, run, device="cpu", progress=False)
    assert result.step < 10**6 and 3.0 <= result.seconds < 30.0
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    record = json.loads((run / "validation.json").read_text())
    assert len(rows) >= 2 and int(rows[-1]["step"]) == result.step
    assert [int(r["val_pairs"]) for r in rows] == [1] * (len(rows) - 1) + [record["pairs"]]
    for figures in (record["input"], record["hm"], record["generated"], record["quick"]["hm"]):
        assert {"delta_e", "delta_e_cell", "l1", "psnr", "ssim"} <= set(figures)
    assert record["beats_hm"] == (record["generated"]["delta_e_cell"] < record["hm"]["delta_e_cell"])
    # HM fitted on three training pairs already improves on the untransformed input: a real baseline
    assert record["hm"]["delta_e_cell"] < record["input"]["delta_e_cell"]
    hm_fit = json.loads((run / "hm-baseline.json").read_text())["fit"]
    assert hm_fit["source_images"] == len(read_pairs(cell_pairs).names) - record["pairs"]  # training pairs only
    montages = sorted((run / "montage").glob("step-*.png"))
    assert len(montages) == len(rows)
    last = iio.imread(montages[-1])
    assert last.shape == (min(8, record["pairs"]) * 256, 3 * 256 + 8, 3)


def test_time_limit_fills_unset_options_from_the_device_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    from cellbatch.train import recipe
    from cellbatch.train.loop import resolve_settings

    thesis = resolve_settings(TrainSettings(setup="l1net", pairs="p"), "cpu")
    assert (thesis.base_filters, thesis.lr, thesis.crop, thesis.batch_size) == (32, 2e-4, None, 8)
    assert (thesis.bf16, thesis.lr_schedule, thesis.predict) == (False, "constant", "image")
    monkeypatch.setattr(recipe, "cpu_has_native_bf16", lambda: True)
    budget = resolve_settings(TrainSettings(setup="l1net", pairs="p", time_limit=600), "cpu")
    cpu = recipe.RECIPES["cpu"]
    assert (budget.base_filters, budget.lr, budget.crop, budget.bf16) == (cpu.base_filters, cpu.lr, cpu.crop, True)
    assert (budget.lr_schedule, budget.predict, budget.ema) == (cpu.lr_schedule, cpu.predict, cpu.ema)
    assert thesis.ema == 0.0 and cpu.ema > 0  # the thesis exports G itself; the recipe its moving average
    gpu = resolve_settings(TrainSettings(setup="pcnet", pairs="p", time_limit=600, vgg_random=True), "cuda")
    assert gpu.base_filters == recipe.RECIPES["cuda"].base_filters and gpu.bf16
    # what the user sets wins, including "off" and the thesis's choices
    mine = resolve_settings(
        TrainSettings(
            setup="l1net", pairs="p", time_limit=600, bf16=False, predict="image", base_filters=16, crop=0, ema=0.0
        ),
        "cpu",
    )
    assert (mine.bf16, mine.predict, mine.base_filters, mine.crop, mine.ema) == (False, "image", 16, None, 0.0)
    monkeypatch.setattr(recipe, "cpu_has_native_bf16", lambda: False)  # emulated bfloat16 is slower: off
    assert resolve_settings(TrainSettings(setup="l1net", pairs="p", time_limit=600), "cpu").bf16 is False


def test_separate_validation_pairs_are_never_trained_on(cell_pairs: Path, tmp_path: Path) -> None:
    held_out = _synth_pairs(tmp_path / "held-out", count=3)
    run = tmp_path / "run"
    train(_settings(cell_pairs, "l1net", val_pairs=str(held_out)), run, device="cpu", progress=False)
    record = json.loads((run / "validation.json").read_text())
    assert record["val_names"] == list(read_pairs(held_out).names)
    hm_fit = json.loads((run / "hm-baseline.json").read_text())["fit"]
    assert hm_fit["source_images"] == len(read_pairs(cell_pairs).names)  # HM fitted on all training pairs


def test_residual_generator_starts_as_the_identity_and_exports_as_such(tmp_path: Path) -> None:
    from cellbatch.models import UNetGenerator

    g = UNetGenerator(base_filters=4, residual=True).eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    assert torch.equal(g(x), x)
    meta = generator_metadata(g, trained=False)
    written = export_generator(g, tmp_path / "g.pt", metadata=meta, check_sizes=(128,), formats=("torchscript", "onnx"))
    model = load_model(written["torchscript"], kind="generator")
    assert model.metadata["architecture"] == "unet7-k5-nearest-residual"
    assert torch.allclose(model.module(x), x, atol=1e-6)


def test_residual_run_exports_the_residual_network(pairs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_settings(pairs, "l1net", predict="residual"), run, device="cpu", progress=False)
    generator, meta = generator_from_run(run)
    assert generator.residual and meta["architecture"] == "unet7-k5-nearest-residual"


def test_white_cell_delta_e_averages_over_the_mask_only() -> None:
    target = np.full((2, 8, 8, 3), 200, np.uint8)
    image = target.copy()
    image[:, :4] = 150  # the left half differs
    masks = np.zeros((2, 8, 8), bool)
    masks[0, :4] = True  # image 0: only differing pixels are cell; image 1: no cell
    figures = image_metrics(image, target, masks)
    whole = image_metrics(image, target)
    assert "delta_e_cell" not in whole
    assert figures["delta_e_cell"] == pytest.approx(2 * whole["delta_e"])


def test_moving_average_is_validated_exported_and_resumed(pairs: Path, tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(_settings(pairs, "l1net", steps=4, ema=0.5), whole, device="cpu", progress=False)
    train(_settings(pairs, "l1net", steps=2, ema=0.5), parts, device="cpu", progress=False)
    train(_settings(pairs, "l1net", steps=4, ema=0.5), parts, device="cpu", progress=False, resume=True)
    a, b = load_checkpoint(latest_checkpoint(whole)), load_checkpoint(latest_checkpoint(parts))
    assert int(a["average"]["n_averaged"]) == 4
    assert all(torch.equal(a["average"]["G"][k], b["average"]["G"][k]) for k in a["average"]["G"])
    # the average lags G: its weights and its batch-norm statistics differ from the last step's
    differs = [k for k in a["models"]["G"] if not torch.equal(a["models"]["G"][k], a["average"]["G"][k])]
    assert any(k.endswith("running_mean") for k in differs) and any(k.endswith("weight") for k in differs)
    generator, meta = generator_from_run(whole)
    assert all(torch.equal(v, a["average"]["G"][k]) for k, v in generator.state_dict().items())
    from cellbatch.modelcard import write_model_card
    from cellbatch.modelfile import read_metadata

    written = export_generator(generator, tmp_path / "g.pt", metadata=meta, check_sizes=(128,))
    card = write_model_card(written, read_metadata(written["torchscript"]), []).read_text()
    assert "moving average of the generator over its last steps (`--ema 0.5`)" in card


def test_a_run_from_before_the_average_resumes_with_one(pairs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_settings(pairs, "l1net", steps=2), run, device="cpu", progress=False)
    settings = json.loads((run / "settings.json").read_text())
    del settings["ema"]  # as cellbatch wrote it before --ema; its recipe now averages
    (run / "settings.json").write_text(json.dumps(settings))
    train(_settings(pairs, "l1net", steps=4, ema=0.5), run, device="cpu", progress=False, resume=True)
    assert int(load_checkpoint(latest_checkpoint(run))["average"]["n_averaged"]) == 2


def test_moving_average_decay_outside_zero_one_is_refused(pairs: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--ema 1"):
        train(_settings(pairs, "l1net", ema=1.0), tmp_path / "run", device="cpu")
