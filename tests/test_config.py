"""``cellbatch run --config FILE.toml`` and ``CELLBATCH_CONFIG`` (cellbatch.cli.config)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cellbatch.schemas import validate
from cellbatch.synth import write_synth


def _cellbatch(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellbatch", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one two-capture slide in slides/slide-a and a config that sets five options."""
    folder = tmp_path_factory.mktemp("config")
    synth = write_synth(folder / "synth", count=2, seed=5, looks=("dm1200",))
    shutil.copytree(synth / "dm1200", folder / "slides" / "slide-a")
    (folder / "run.toml").write_text(
        'sources = ["slides"]\nout = "from-config"\ncell-diameter = 100\nnormalise = ["display"]\nquiet = true\n'
    )
    return folder


def _provenance(out: Path) -> dict:
    return json.loads((out / "slide-a" / "provenance.json").read_text())


def test_config_file_sets_options_and_provenance_says_where_each_came_from(workdir: Path) -> None:
    done = _cellbatch("run", "--config", "run.toml", cwd=workdir)
    assert done.returncode == 0, done.stderr
    provenance = _provenance(workdir / "from-config")
    validate(provenance, "provenance")
    assert provenance["parameters"]["extract"]["cell_diameter"] == 100
    assert provenance["parameters"]["normalise"] == ["display"]
    options = provenance["options"]
    assert options["config"]["path"] == "run.toml" and len(options["config"]["sha256"]) == 64
    assert options["values"]["cell-diameter"] == 100 and options["values"]["sources"] == ["slides"]
    assert options["from"]["cell-diameter"] == "config" and options["from"]["detector"] == "default"

    # the same options on the command line make the same slide (same content key)
    same = _cellbatch("run", "slides", "-o", "from-cli", "--cell-diameter", "100", "--normalise", "display", "-q",
                      cwd=workdir)
    assert same.returncode == 0, same.stderr
    assert _provenance(workdir / "from-cli")["content_key"] == provenance["content_key"]
    assert _provenance(workdir / "from-cli")["options"]["config"] is None


def test_command_line_wins_and_the_environment_variable_names_the_file(workdir: Path) -> None:
    done = _cellbatch("run", "-o", "env-out", "--cell-diameter", "120", cwd=workdir,
                      env={"CELLBATCH_CONFIG": "run.toml"})
    assert done.returncode == 0, done.stderr
    provenance = _provenance(workdir / "env-out")
    assert provenance["parameters"]["extract"]["cell_diameter"] == 120  # command line over config
    assert provenance["parameters"]["normalise"] == ["display"]  # config over default
    assert provenance["options"]["from"]["cell-diameter"] == "command line"
    assert provenance["options"]["from"]["out"] == "command line"
    assert provenance["options"]["from"]["normalise"] == "config"
    assert not (workdir / "from-config-env").exists()


@pytest.mark.parametrize(("content", "message"), [
    ("cell-diam = 100\n", "'cell-diam' is no option of cellbatch run; use long names: batch-size, cell-diameter"),
    ('cell-diameter = "big"\n', "cell-diameter = 'big': 'big' is not a valid float range"),
    ("cell-diameter = \n", "is not readable TOML"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_key(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.toml").write_text(content)
    refused = _cellbatch("run", "in", "--config", "bad.toml", cwd=tmp_path)
    assert refused.returncode == 2  # part of the command line: a usage error
    assert refused.stderr.startswith("cellbatch: error: config file bad.toml") and message in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_missing_config_file_from_the_environment_is_named(tmp_path: Path) -> None:
    refused = _cellbatch("run", "in", cwd=tmp_path, env={"CELLBATCH_CONFIG": "gone.toml"})
    assert refused.returncode == 2  # a usage error, as click gives for a missing --config path
    assert "config file gone.toml does not exist (from --config or $CELLBATCH_CONFIG)" in refused.stderr
