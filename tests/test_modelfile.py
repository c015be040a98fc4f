"""Model files from outside: metadata validated against the schema, with size limits (issue 12 item 7)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from cellbatch.errors import ExitCode, ModelError
from cellbatch.modelfile import METADATA_NAME, load_model, read_metadata
from tests.models import Negate, save_generator


def with_metadata(path: Path, raw: bytes) -> Path:
    """A scripted generator whose cellbatch.json holds exactly ``raw`` (bypassing the exporter's checks)."""
    torch.jit.save(torch.jit.script(Negate()), str(path), _extra_files={METADATA_NAME: raw})
    return path


GOOD = {"kind": "generator", "input_range": [-1, 1], "output_range": [-1, 1], "tile_multiple": 128}

BAD_METADATA = {
    "tile_multiple 0": json.dumps({**GOOD, "tile_multiple": 0}).encode(),
    "tile_multiple 1000": json.dumps({**GOOD, "tile_multiple": 1000}).encode(),
    "output_range [1, 1]": json.dumps({**GOOD, "output_range": [1, 1]}).encode(),
    "input_range [0, 0]": json.dumps({**GOOD, "input_range": [0, 0]}).encode(),
    "non-numeric range": json.dumps({**GOOD, "input_range": ["a", "b"]}).encode(),
    "range of three": json.dumps({**GOOD, "input_range": [0, 1, 2]}).encode(),
    "NaN in a range": b'{"kind": "generator", "input_range": [NaN, 1]}',
    "not an object": b"[1, 2, 3]",
    "invalid JSON": b'{"kind": "generator",',
    "not UTF-8": b'{"kind": "\xff"}',
    "nested too deeply": b"[" * 100_000 + b"]" * 100_000,
    "unknown kind": json.dumps({**GOOD, "kind": "segmenter"}).encode(),
    "classes not strings": json.dumps({"kind": "classifier", "classes": [1, 2]}).encode(),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_is_refused_with_one_line(tmp_path: Path, case: str) -> None:
    path = with_metadata(tmp_path / "m.pt", BAD_METADATA[case])
    with pytest.raises(ModelError) as info:
        load_model(path, kind="generator")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_metadata_ends_a_run_with_exit_3_and_one_line(tmp_path: Path, cellbatch) -> None:
    path = with_metadata(tmp_path / "m.pt", json.dumps({**GOOD, "tile_multiple": 0}).encode())
    (tmp_path / "in").mkdir()
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", path, "--quiet")
    assert code == ExitCode.COULD_NOT_RUN
    assert len(err.strip().splitlines()) == 1 and "tile_multiple" in err and "Traceback" not in err


def test_metadata_that_inflates_past_the_limit_is_refused_unread(tmp_path: Path, cellbatch) -> None:
    # A small archive whose cellbatch.json deflates from 500 MB: refused from the zip directory, never
    # decompressed, so it can never reach a provenance.json.
    good = save_generator(Negate(), tmp_path / "good.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w") as dst:
        for item in src.infolist():
            if item.filename.endswith("extra/" + METADATA_NAME):
                member = zipfile.ZipInfo(item.filename)
                member.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(member, "w", force_zip64=True) as fh:
                    fh.write(b'{"kind": "generator", "pad": "')
                    block = b" " * (1 << 20)
                    for _ in range(500):
                        fh.write(block)
                    fh.write(b'"}')
            else:
                dst.writestr(item, src.read(item))
    assert bomb.stat().st_size < 2_000_000
    with pytest.raises(ModelError, match="over the"):
        read_metadata(bomb)
    code, _, err = cellbatch("model", "info", bomb)
    assert code == ExitCode.COULD_NOT_RUN and len(err.strip().splitlines()) == 1 and "limit" in err


def test_good_metadata_still_loads_and_a_file_without_it_gets_the_defaults(tmp_path: Path) -> None:
    assert load_model(with_metadata(tmp_path / "m.pt", json.dumps(GOOD).encode()), kind="generator").has_metadata
    torch.jit.save(torch.jit.script(Negate()), str(tmp_path / "bare.pt"))
    bare = load_model(tmp_path / "bare.pt", kind="generator")
    assert not bare.has_metadata and bare.metadata["tile_multiple"] == 128


def test_the_exporter_refuses_to_write_metadata_that_would_be_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="tile_multiple"):
        save_generator(Negate(), tmp_path / "m.pt", tile_multiple=0)
    assert not (tmp_path / "m.pt").exists()
