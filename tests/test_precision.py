"""``--precision``: resolution of ``auto``, casting frozen model files, parity with fp32."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from cellbatch import precision
from cellbatch.errors import ConfigError
from cellbatch.generate import Generator

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo-model" / "demo-l1net.pt"


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_on_cpus_that_run_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("fp32", "cpu") == "fp32"


def test_fp16_on_cpu_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="fp16 runs only on CUDA"):
        precision.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="use one of"):
        precision.resolve_precision("fp8", "cpu")


def test_prepare_module_casts_the_constants_of_a_frozen_graph():
    bf16 = Generator.load(DEMO, precision="bf16")
    constants = [n.t("value") for n in bf16.model.module.graph.nodes()
                 if n.kind() == "prim::Constant" and n.hasAttribute("value") and n.kindOf("value") == "t"]
    weights = [t for t in constants if t.dim() == 4]
    assert weights and all(t.dtype == torch.bfloat16 for t in weights)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in weights)


def test_the_bf16_copy_from_the_files_bytes_runs_as_one_copied_through_torch_jit_save():
    from cellbatch.modelfile import load_model

    model = load_model(DEMO, kind="generator")
    assert model.fresh_module is not None and model.fresh_module() is not model.module
    from_bytes, _ = precision.prepare_module(model.module, precision="bf16", device="cpu", fresh=model.fresh_module)
    from_save, _ = precision.prepare_module(model.module, precision="bf16", device="cpu")
    x = precision.network_input(torch.rand(2, 3, 256, 256) * 2 - 1, "bf16")
    with torch.no_grad():
        assert torch.equal(from_bytes(x), from_save(x))
    kept = [n.t("value") for n in model.module.graph.nodes()
            if n.kind() == "prim::Constant" and n.hasAttribute("value") and n.kindOf("value") == "t"]
    assert all(t.dtype == torch.float32 for t in kept if t.is_floating_point())  # the self-tested module: as read
    assert Generator(model, precision="bf16").model.fresh_module is None  # the file's bytes are let go


class _ConvNet(torch.nn.Module):
    """Convolutions that may be fused with their activation, and three that may not."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.shared = torch.nn.Conv2d(8, 8, 1)  # its output is used twice: not fusible
        self.up = torch.nn.ConvTranspose2d(8, 8, 2, stride=2)  # transposed: not fusible
        self.out = torch.nn.Conv2d(8, 3, 1)  # no activation after it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.leaky_relu(self.b(torch.relu(self.a(x))), 0.2)
        s = self.shared(y)
        return self.out(torch.relu(self.up(torch.relu(s) + s)))


def _frozen(net: torch.nn.Module) -> torch.jit.ScriptModule:
    with torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(net.eval(), torch.rand(1, 3, 16, 16)))


def test_convolutions_and_their_activations_become_one_onednn_call_with_the_same_values():
    torch.manual_seed(0)
    net = _ConvNet()
    plain, fused = _frozen(net), _frozen(net)
    assert precision.fuse_conv_activations(fused.graph) == 2  # a + ReLU, b + LeakyReLU
    kinds = [n.kind() for n in fused.graph.nodes()]
    assert kinds.count("mkldnn::_convolution_pointwise") == 2 and kinds.count("aten::_convolution") == 3
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))  # in fp32 a fused activation is the same arithmetic


def test_fp32_models_on_the_cpu_run_fused_in_a_copy_with_the_same_values():
    torch.manual_seed(0)
    net = _ConvNet()
    loaded = _frozen(net)
    fp32, resolved = precision.prepare_module(loaded, precision="fp32", device="cpu")
    assert resolved == "fp32" and fp32 is not loaded
    assert len(fp32.graph.findAllNodes("mkldnn::_convolution_pointwise")) == 2
    assert not loaded.graph.findAllNodes("mkldnn::_convolution_pointwise")  # the self-tested module is left alone
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        x = precision.network_input(x, "fp32")
        assert torch.equal(fp32(x), loaded(x))


def test_bf16_models_on_the_cpu_run_fused_within_bf16_rounding_of_fp32():
    torch.manual_seed(0)
    net = _ConvNet()
    bf16, _ = precision.prepare_module(_frozen(net), precision="bf16", device="cpu")
    assert len(bf16.graph.findAllNodes("mkldnn::_convolution_pointwise")) == 2
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = net(x)
        got = bf16(precision.network_input(x, "bf16")).float()
    assert torch.allclose(got, expected, atol=0.03, rtol=0.02), (got - expected).abs().max()


@pytest.mark.gpu
def test_auto_is_a_half_precision_on_cuda():
    assert precision.resolve_precision("auto", "cuda") in ("bf16", "fp16")


@pytest.fixture(scope="module")
def demo_crops() -> np.ndarray:
    from cellbatch.extract import CaptureRef, ExtractSettings, extract_capture
    from cellbatch.synth import synth_capture

    rng = np.random.default_rng(11)
    crops = [extract_capture(synth_capture(rng).dm1200, CaptureRef(source=str(i), frame=0, path=""),
                             ExtractSettings()).crops for i in range(4)]
    return np.concatenate(crops)


def test_bf16_generation_stays_within_a_grey_level_of_fp32_on_the_demo_model(demo_crops):
    fp32 = Generator.load(DEMO, precision="fp32").generate(demo_crops).astype(np.int16)
    bf16 = Generator.load(DEMO, precision="bf16").generate(demo_crops).astype(np.int16)
    diff = np.abs(fp32 - bf16)
    assert diff.mean() < 0.5 and (diff.max(axis=-1) <= 1).mean() >= 0.99, (diff.mean(), diff.max())


def test_a_bf16_classifier_decides_as_the_fp32_one(tmp_path, demo_crops):
    from cellbatch.check.agreement import AgreementCheck, CheckSettings, load_classifier
    from cellbatch.models.classifier import TrainSettings, export_classifier, train_classifier

    rng = np.random.default_rng(0)
    colours = {"blue": (60, 60, 200), "pink": (220, 120, 180), "teal": (40, 170, 160)}
    yy, xx = np.mgrid[0:256, 0:256]
    files, labels = [], []
    for label, (name, colour) in enumerate(colours.items()):
        for i in range(8):
            image = np.full((256, 256, 3), 235, np.uint8)
            cx, cy = rng.integers(100, 156, size=2)
            image[(xx - cx) ** 2 + (yy - cy) ** 2 < int(rng.integers(30, 70)) ** 2] = colour
            files.append(tmp_path / f"{name}{i}.png")
            iio.imwrite(files[-1], image)
            labels.append(label)
    result = train_classifier(files, np.array(labels), classes=list(colours),
                              settings=TrainSettings(epochs=4, batch_size=4, lr=1e-2, seed=0, width=8))
    path = export_classifier(result.net, tmp_path / "clf.pt", classes=list(colours), extra={})["torchscript"]
    crops = np.concatenate([np.stack([iio.imread(f) for f in files]), demo_crops])
    decided = {p: AgreementCheck(load_classifier(path), settings=CheckSettings(), precision=p)._classify(crops)[0]
               for p in ("fp32", "bf16")}
    assert (decided["fp32"] == decided["bf16"]).mean() >= 0.995


def test_precision_is_recorded_and_changing_it_redoes_a_slide(tmp_path):
    from cellbatch.api import convert
    from cellbatch.registry import detectors
    from tests.scenes import DarkBlobDetector, write_slides

    detectors.register("blobs", DarkBlobDetector)
    write_slides(tmp_path / "in", slides={"s": 2})
    options = {"model": DEMO, "detector": "blobs", "cell_diameter": 60, "device": "cpu"}
    assert convert([tmp_path / "in"], tmp_path / "out", precision="fp32", **options).slides[0].status == "done"
    again = convert([tmp_path / "in"], tmp_path / "out", precision="bf16", **options)
    assert again.slides[0].status == "done" and "at bf16" in again.generation
    prov = json.loads((tmp_path / "out" / "s" / "provenance.json").read_text())
    assert prov["model"]["precision"] == "bf16" and prov["parameters"]["precision"] == "bf16"


def test_an_onnx_model_runs_in_fp32_whatever_precision_is_asked(demo_crops):
    pytest.importorskip("onnxruntime")
    onnx = Generator.load(DEMO.with_suffix(".onnx"), precision="bf16")
    assert onnx.precision == "fp32" and onnx.provenance()["precision"] == "fp32"
    fp32 = Generator.load(DEMO, precision="fp32").generate(demo_crops[:2]).astype(np.int16)
    assert np.abs(onnx.generate(demo_crops[:2]).astype(np.int16) - fp32).max() <= 1
