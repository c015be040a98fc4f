"""The self-test inside model files: made at export, run at every load and by `model verify` (issue 14)."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cellbatch.errors import ExitCode, ModelError, TorchScriptDeprecated
from cellbatch.export import export_generator, generator_metadata, untrained_generator
from cellbatch.modelfile import load_model, read_metadata
from cellbatch.selftest import SELFTEST_NAME, Tolerance, compare
from tests.models import Negate, save_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIXTURES = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small generator written in both formats (each with the self-test)."""
    g = untrained_generator(base_filters=4, seed=1)
    out = tmp_path_factory.mktemp("exported") / "g.pt"
    return export_generator(g, out, metadata=generator_metadata(g, trained=False), check_sizes=(128,),
                            formats=("torchscript", "onnx"))


def tamper_torchscript(path: Path, out: Path) -> Path:
    """Change one weight of the first convolution (3 -> 4 channels, 5x5: 300 floats), keep everything else."""
    first_conv_bytes = 4 * 3 * 5 * 5 * 4
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        matches = [i for i in src.infolist() if "/constants/" in i.filename and i.file_size == first_conv_bytes]
        assert len(matches) == 1
        for item in src.infolist():
            data = src.read(item)
            if item is matches[0]:
                weights = np.frombuffer(data, np.float32).copy()
                weights[0] += 0.5
                data = weights.tobytes()
            dst.writestr(item, data)
    return out


def tamper_onnx(path: Path, out: Path) -> Path:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    # The frozen graph exports its weights as Constant nodes; the first convolution's is (4, 3, 5, 5).
    tensors = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    (first,) = [t for t in tensors if tuple(t.dims) == (4, 3, 5, 5)]
    weights = numpy_helper.to_array(first).copy()
    weights.flat[0] += 0.5
    first.CopyFrom(numpy_helper.from_array(weights, first.name))
    onnx.save(model, str(out))
    return out


def test_export_stores_a_self_test_that_each_file_passes(exported: dict[str, Path]) -> None:
    for fmt, path in exported.items():
        model = load_model(path, kind="generator")
        entry = model.metadata["self_test"]
        assert entry["inputs"] == [2, 128, 128, 3] and entry["outputs"] == [2, 3, 128, 128]
        assert model.self_test["status"] == "passed" and model.self_test["device"] == "cpu", fmt
        assert model.provenance()["self_test"]["elements"] == 2 * 3 * 128 * 128
    assert read_metadata(exported["onnx"])["self_test"] == read_metadata(exported["torchscript"])["self_test"]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_one_changed_weight_is_refused_at_load_with_the_measured_difference(
    exported: dict[str, Path], tmp_path: Path, cellbatch, fmt: str
) -> None:
    tamper = tamper_torchscript if fmt == "torchscript" else tamper_onnx
    bad = tamper(exported[fmt], tmp_path / exported[fmt].name)
    assert read_metadata(bad) == read_metadata(exported[fmt])  # metadata kept
    with pytest.raises(ModelError, match=r"self-test failed on cpu at fp32: outputs moved by up to .* grey levels"):
        load_model(bad, kind="generator")
    code, _, err = cellbatch("model", "verify", bad, "--device", "cpu")
    assert code == ExitCode.COULD_NOT_RUN and "self-test failed" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "in").mkdir()
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", bad, "--quiet")
    assert code == ExitCode.COULD_NOT_RUN and "self-test failed" in err and "Traceback" not in err


def test_verify_reports_a_pass_on_this_device(exported: dict[str, Path], cellbatch) -> None:
    for path in exported.values():
        code, out, _ = cellbatch("model", "verify", path, "--device", "cpu")
        assert code == 0 and "self-test passed on cpu at fp32" in out


def test_self_test_data_that_does_not_match_its_hash_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    swapped = tmp_path / "swapped.pt"
    with zipfile.ZipFile(exported["torchscript"]) as src, zipfile.ZipFile(swapped, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("extra/" + SELFTEST_NAME):
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.writestr(item, data)
    with pytest.raises(ModelError, match="does not match its sha256"):
        load_model(swapped, kind="generator")


def test_a_file_without_a_self_test_loads_with_a_note_in_provenance(tmp_path: Path, cellbatch) -> None:
    from cellbatch.registry import detectors
    from tests.scenes import DarkBlobDetector, write_slides

    detectors.register("blobs", DarkBlobDetector)
    path = save_generator(Negate(), tmp_path / "old.pt")
    assert load_model(path, kind="generator").self_test["status"] == "absent"
    write_slides(tmp_path / "in", slides={"s": 1})
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", path, "--quiet",
                             "--detector", "blobs", "--cell-diameter", "60")
    assert code == 0, err
    model = json.loads((tmp_path / "out" / "s" / "provenance.json").read_text())["model"]
    assert model["self_test"]["status"] == "absent" and "no self-test" in model["self_test"]["note"]
    code, _, err = cellbatch("model", "verify", path)
    assert code == ExitCode.COULD_NOT_RUN and "has no self-test" in err


def test_tolerance_counts_elements_beyond_it() -> None:
    expected = np.zeros(2000, np.float32)
    actual = expected.copy()
    actual[:2] = 0.1
    loose = Tolerance(absolute=0.01, relative=0.0, mismatched_per_million=1000.0)
    assert compare(actual, expected, loose).passed  # 2 of 2000 allowed
    actual[:3] = 0.1
    assert not compare(actual, expected, loose).passed
    actual[:] = np.nan
    assert compare(actual, expected, loose).max_abs_diff == np.inf


def test_torchscript_deprecation_is_said_once_per_process(exported: dict[str, Path], monkeypatch) -> None:
    monkeypatch.setattr("cellbatch.modelfile._noted_torchscript", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            load_model(exported["torchscript"], kind="generator")
    notes = [w for w in caught if issubclass(w.category, TorchScriptDeprecated)]
    assert len(notes) == 1 and "docs/model-files.md" in str(notes[0].message)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_a_file_saved_by_torch_2_4_loads_and_passes_its_self_test() -> None:
    path = FIXTURES / "generator-torch-2.4.1.pt"
    model = load_model(path, kind="generator")
    assert model.metadata["torch_version"].startswith("2.4.1") and torch.__version__ != model.metadata["torch_version"]
    assert model.self_test["status"] == "passed"
