"""OUT/run.log (cellbatch.runlog): the terminal's lines, warnings and per-slide timings, via logging."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cellbatch.api import convert
from cellbatch.synth import write_synth

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (INFO|WARNING|ERROR) (.*)$")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good-a and good-b (two synthetic captures each) and bad (one file that is no image)."""
    folder = tmp_path_factory.mktemp("runlog")
    synth = write_synth(folder / "synth", count=4, seed=8, looks=("dm1200",))
    captures = sorted((synth / "dm1200").glob("*.png"))
    for name, picked in (("good-a", captures[:2]), ("good-b", captures[2:])):
        (folder / "in" / name).mkdir(parents=True)
        for path in picked:
            shutil.copy(path, folder / "in" / name / path.name)
    (folder / "in" / "bad").mkdir()
    (folder / "in" / "bad" / "x.png").write_text("not an image")
    return folder / "in"


def _messages(out: Path) -> list[tuple[str, str]]:
    lines = (out / "run.log").read_text(encoding="utf-8").splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed, strict=True) if not m]
    return [(m.group(1), m.group(2)) for m in parsed]


def test_cli_run_log_holds_the_terminal_summary_slide_timings_and_failures(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "cellbatch", "run", str(src), "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 4, done.stderr
    messages = [text for _, text in _messages(out)]
    assert messages[0].startswith("cellbatch ") and "run" in messages[0]
    terminal = [line.removeprefix("cellbatch: ").strip() for line in done.stderr.splitlines()]
    assert terminal and all(line in messages for line in terminal), (terminal, messages)
    slides = {m.split(":")[0]: m for m in messages if m.startswith("slide ")}
    assert set(slides) == {"slide bad", "slide good-a", "slide good-b"}
    assert re.search(r"good-a: done, 2 captures \(0 failed\), \d+ cells, \d+\.\d\d s$", slides["slide good-a"])
    assert "failed" in slides["slide bad"] and "not a PNG" in done.stderr
    assert messages[-1] == "exit code 4"
    levels = dict((text, level) for level, text in _messages(out))
    assert levels[slides["slide bad"]] == "WARNING" and levels[slides["slide good-a"]] == "INFO"


def test_rerun_appends_and_library_users_route_the_same_records(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert([src], out, device="cpu", workers=1)
    first = len(_messages(out))

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.INFO)
    cellbatch_logger = logging.getLogger("cellbatch")
    cellbatch_logger.addHandler(handler)
    try:
        convert([src], out, device="cpu", workers=1)
    finally:
        cellbatch_logger.removeHandler(handler)
    messages = _messages(out)
    assert len(messages) > first and messages[first][1].startswith("cellbatch ")  # appended: two runs' blocks
    routed = [r.getMessage() for r in records]
    assert routed == [text for _, text in messages[first:]]
    assert any(m.startswith("slide good-a: skipped") for m in routed)
    assert cellbatch_logger.level == logging.NOTSET and all(
        not isinstance(h, logging.FileHandler) for h in cellbatch_logger.handlers)
