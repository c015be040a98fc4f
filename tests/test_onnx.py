"""ONNX model files: export, convert, run through the same stages as TorchScript, and agree with it (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cellbatch.check.agreement import classify, load_classifier
from cellbatch.convert import convert_model
from cellbatch.errors import ConfigError
from cellbatch.generate import Generator
from cellbatch.modelfile import load_model, read_metadata, sha256_file
from cellbatch.models.classifier import ClassifierNet, export_classifier
from cellbatch.onnxfile import OPSET
from cellbatch.selftest import selftest_inputs
from tests.models import Negate, save_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEMO = Path(__file__).parents[1] / "examples" / "demo-model" / "demo-l1net.pt"
CLASSES = ["lymphocyte", "monocyte", "neutrophil"]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained demo generator in both formats (converted from its TorchScript file)."""
    return convert_model(DEMO, out=tmp_path_factory.mktemp("demo") / "demo.pt", formats=("torchscript", "onnx"))


@pytest.fixture(scope="module")
def classifier_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    net = ClassifierNet(len(CLASSES), width=4).eval()
    out = tmp_path_factory.mktemp("clf") / "clf.pt"
    return export_classifier(net, out, classes=CLASSES, extra={}, formats=("torchscript", "onnx"))


@pytest.fixture(scope="module")
def cell_crops() -> np.ndarray:
    """Synthetic 256x256 white-cell crops (the self-test's scenes at run size), six of them."""
    crops = selftest_inputs({"kind": "classifier"})
    return np.concatenate([crops, crops[:, ::-1], crops[:, :, ::-1]])


def test_onnx_and_torchscript_generators_agree_within_one_grey_level(demo_files, cell_crops) -> None:
    torch_out = Generator.load(demo_files["torchscript"]).generate(cell_crops)
    onnx_gen = Generator.load(demo_files["onnx"])
    onnx_out = onnx_gen.generate(cell_crops)
    diff = np.abs(torch_out.astype(int) - onnx_out.astype(int))
    assert (diff <= 1).mean() >= 0.999 and diff.max() <= 2
    assert onnx_gen.provenance()["format"] == "onnx"
    assert onnx_gen.provenance()["runtime"]["providers"] == ["CPUExecutionProvider"]


def test_onnx_file_holds_the_metadata_opset_and_dynamic_axes(demo_files) -> None:
    import onnx

    meta = read_metadata(demo_files["onnx"])
    assert meta["onnx_opset"] == OPSET and meta["kind"] == "generator"
    assert {k: v for k, v in meta.items() if k != "onnx_opset"} == read_metadata(demo_files["torchscript"])
    model = onnx.load(str(demo_files["onnx"]))
    assert model.opset_import[0].version == OPSET
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]
    loaded = load_model(demo_files["onnx"], kind="generator")
    y = loaded.module(torch.zeros(3, 3, 128, 384))
    assert y.shape == (3, 3, 128, 384)


def test_convert_keeps_the_source_self_test_and_names_the_source(demo_files) -> None:
    meta = read_metadata(demo_files["onnx"])
    assert meta["converted_from"] == {"file": DEMO.name, "sha256": sha256_file(DEMO),
                                      "torch_version": read_metadata(DEMO)["torch_version"]}
    assert meta["self_test"] == read_metadata(DEMO)["self_test"]


def test_convert_adds_a_self_test_to_an_old_file_and_never_replaces_its_source(tmp_path: Path) -> None:
    path = save_generator(Negate(), tmp_path / "neg.pt")
    with pytest.raises(ConfigError, match="would replace it"):
        convert_model(path, formats=("torchscript",))
    files = convert_model(path, formats=("onnx",))
    assert files["onnx"] == tmp_path / "neg.onnx"
    assert "at conversion of neg.pt (which had no self-test)" in read_metadata(files["onnx"])["self_test"]["made_with"]
    assert load_model(files["onnx"], kind="generator").self_test["status"] == "passed"


def test_onnx_and_torchscript_classifiers_agree(classifier_files, cell_crops) -> None:
    results = {}
    for fmt, path in classifier_files.items():
        model = load_classifier(path)
        assert model.metadata["classes"] == CLASSES and model.self_test["status"] == "passed"
        results[fmt] = classify(cell_crops, classifier=model)
    assert np.array_equal(results["torchscript"][0], results["onnx"][0])
    assert np.abs(results["torchscript"][1] - results["onnx"][1]).max() < 1e-4


def test_run_takes_onnx_generator_and_classifier(demo_files, classifier_files, tmp_path: Path) -> None:
    from cellbatch.cli import main
    from cellbatch.synth import write_synth

    write_synth(tmp_path / "synth", count=2, seed=4, looks=("dm1200",))
    outs = {}
    for fmt in ("torchscript", "onnx"):
        with pytest.raises(SystemExit) as exit_info:
            # fp32 on both sides: --precision auto would run the TorchScript files in bf16 on a bf16 CPU
            main(["run", str(tmp_path / "synth" / "dm1200"), "-o", str(tmp_path / fmt), "--quiet", "--device", "cpu",
                  "--precision", "fp32", "--model", str(demo_files[fmt]), "--classifier", str(classifier_files[fmt])])
        assert exit_info.value.code == 0
        outs[fmt] = tmp_path / fmt / "dm1200"
    prov = json.loads((outs["onnx"] / "provenance.json").read_text())
    assert prov["model"]["format"] == "onnx" and prov["model"]["self_test"]["status"] == "passed"
    assert prov["classifier"]["format"] == "onnx"
    import zarr

    generated = [zarr.open_group(str(o / "cells.zarr"), mode="r")["generated"][:] for o in outs.values()]
    diff = np.abs(generated[0].astype(int) - generated[1].astype(int))
    assert len(generated[0]) >= 2 and (diff <= 1).mean() >= 0.999
    assert (outs["onnx"] / "cells.csv").read_text() == (outs["torchscript"] / "cells.csv").read_text()


def test_classifier_train_writes_both_formats_and_a_model_card(tmp_path: Path) -> None:
    import imageio.v3 as iio

    from cellbatch.cli import main

    crops = selftest_inputs({"kind": "classifier"})
    for name, crop in zip(("a", "b"), crops, strict=True):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            iio.imwrite(tmp_path / "data" / name / f"{i}.png", np.rot90(crop, i).copy())
    with pytest.raises(SystemExit) as exit_info:
        main(["classifier", "train", str(tmp_path / "data"), "--out", str(tmp_path / "m" / "clf.pt"), "--epochs", "1",
              "--device", "cpu", "--quiet", "--val-fraction", "0"])
    assert exit_info.value.code == 0
    card = (tmp_path / "m" / "MODEL.md").read_text()
    for name in ("clf.pt", "clf.onnx"):
        assert f"`{name}`" in card and f"`{sha256_file(tmp_path / 'm' / name)}`" in card
        assert load_model(tmp_path / "m" / name, kind="classifier").self_test["status"] == "passed"
    assert "ONNX opset 17" in card and "ms per crop, batch 1" in card


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_onnx_generator_on_cuda_gives_the_cpu_result(demo_files, cell_crops) -> None:
    on_gpu = Generator.load(demo_files["onnx"], device="cuda")
    assert on_gpu.model.self_test["status"] == "passed" and on_gpu.model.self_test["device"] == "cuda"
    on_cpu = Generator.load(demo_files["onnx"]).generate(cell_crops)
    diff = np.abs(on_gpu.generate(cell_crops).astype(int) - on_cpu.astype(int))
    assert (diff <= 1).mean() >= 0.999
