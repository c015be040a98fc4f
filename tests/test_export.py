"""Exporting generators: trace + freeze, shape-generic graphs, metadata, and the CLI sources."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cellbatch.cli.model import model as model_cli
from cellbatch.errors import ModelError
from cellbatch.export import (
    check_traced,
    export_generator,
    generator_from_state_dict,
    generator_metadata,
    trace_generator,
    untrained_generator,
)
from cellbatch.modelfile import load_model, read_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_traced_generator_is_shape_generic(tmp_path: Path) -> None:
    g = untrained_generator(base_filters=4, seed=3)
    path = export_generator(
        g, tmp_path / "g.pt", metadata=generator_metadata(g, trained=False), trace_size=256
    )["torchscript"]
    loaded = load_model(path, kind="generator").module
    for h, w in [(128, 128), (384, 384), (128, 256)]:
        x = torch.rand(1, 3, h, w) * 2 - 1
        with torch.no_grad():
            assert torch.allclose(loaded(x), g(x), atol=1e-4), (h, w)


def test_traced_graph_holds_only_plain_operators() -> None:
    traced = trace_generator(untrained_generator(base_filters=4, seed=0), size=128)
    kinds = {node.kind() for node in traced.graph.nodes()}
    # the inference form: decoders as phase convolutions and phase-major shuffles (reshapes of the
    # channels-last view, not pixel_shuffle), batch norms folded away
    assert {"aten::permute", "aten::unflatten"} <= kinds
    assert "aten::pixel_shuffle" not in kinds
    assert not kinds & {"aten::upsample_nearest2d", "aten::batch_norm", "aten::einsum"}, kinds
    assert all(k.startswith(("aten::", "prim::Constant", "prim::ListConstruct")) for k in kinds), kinds


def test_check_traced_catches_a_graph_that_differs() -> None:
    g = untrained_generator(base_filters=4, seed=0)
    other = trace_generator(untrained_generator(base_filters=4, seed=1), size=128)
    with pytest.raises(ModelError, match="differs"):
        check_traced(other, g, sizes=(128,))


def test_untrained_export_records_trained_false_and_seed(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        model_cli,
        ["export", "--untrained", "--base-filters", "4", "--seed", "7", "--out", str(tmp_path / "u.pt")],
    )
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "u.pt")
    assert meta is not None
    assert meta["trained"] is False and meta["seed"] == 7 and meta["base_filters"] == 4
    assert meta["kind"] == "generator" and meta["input_range"] == [-1, 1] and meta["tile_multiple"] == 128
    assert meta["torch_version"] == torch.__version__
    assert meta["trace"]["checked_sizes"] == [128, 384]


def test_untrained_export_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    a = untrained_generator(base_filters=4, seed=5).state_dict()
    b = untrained_generator(base_filters=4, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_needs_exactly_one_source(tmp_path: Path) -> None:
    runner = CliRunner()
    none = runner.invoke(model_cli, ["export", "--out", str(tmp_path / "x.pt")])
    assert none.exit_code == 2 and "Usage:" in none.output
    unseeded = runner.invoke(
        model_cli, ["export", "--untrained", "--base-filters", "4", "--out", str(tmp_path / "x.pt")]
    )
    assert unseeded.exit_code == 2 and "--seed" in unseeded.output
    assert not (tmp_path / "x.pt").exists()


def test_state_dict_export_reads_width_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    path = tmp_path / "g.pth"
    torch.save(untrained_generator(base_filters=4, seed=0).state_dict(), path)
    assert generator_from_state_dict(path).base_filters == 4
    with pytest.raises(ModelError, match="base_filters 4, not 8"):
        generator_from_state_dict(path, base_filters=8)
    result = CliRunner().invoke(
        model_cli, ["export", "--state-dict", str(path), "--out", str(tmp_path / "s.pt")]
    )
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "s.pt")["trained"] is True


def test_model_info_prints_metadata_and_hash(tmp_path: Path) -> None:
    g = untrained_generator(base_filters=4, seed=0)
    export_generator(g, tmp_path / "g.pt", metadata=generator_metadata(g, trained=False), check_sizes=(128,))
    result = CliRunner().invoke(model_cli, ["info", str(tmp_path / "g.pt")])
    info = json.loads(result.output)
    assert info["metadata"]["architecture"] == "unet7-k5-nearest" and len(info["sha256"]) == 64


def test_a_graph_this_torch_cannot_run_names_both_versions(tmp_path: Path) -> None:
    g = untrained_generator(base_filters=4, seed=0)
    good = export_generator(
        g, tmp_path / "g.pt", metadata=generator_metadata(g, trained=False), check_sizes=(128,)
    )["torchscript"]
    # Imitate a file from a newer torch: an operator this torch lacks, and a newer version on record.
    crafted = tmp_path / "future.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(crafted, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".py") and b"torch.leaky_relu(" in data:
                data = data.replace(b"torch.leaky_relu(", b"torch.leaky_relu_from_the_future(", 1)
            elif item.filename.endswith("extra/cellbatch.json"):
                data = json.dumps({**json.loads(data), "torch_version": "99.0.0"}).encode()
            dst.writestr(item, data)
    with pytest.raises(ModelError) as info:
        load_model(crafted, kind="generator")
    message = str(info.value)
    assert torch.__version__ in message and "99.0.0" in message and "\n" not in message
