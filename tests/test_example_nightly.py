"""examples/nightly.sh end to end: a good night, a failed night, a refused night, a rerun after the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "nightly.sh"
MODEL = ROOT / "examples" / "demo-model" / "demo-l1net.pt"


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory):
    """Synthetic captures in SRC/slide and a function that runs nightly.sh SRC OUT MODEL."""
    work = tmp_path_factory.mktemp("nightly")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    subprocess.run([sys.executable, "-m", "cellbatch", "synth", str(work / "synth"), "--count", "3", "--seed", "4",
                    "--look", "dm1200", "--quiet"], check=True, env=env, capture_output=True)
    shutil.copytree(work / "synth" / "dm1200", work / "src" / "slide")

    def run_night() -> tuple[int, str, Path]:
        done = subprocess.run(["bash", str(SCRIPT), str(work / "src"), str(work / "out"), str(MODEL)],
                              env=env, capture_output=True, text=True, timeout=600)
        return done.returncode, done.stdout + done.stderr, work / "out"

    return work, run_night


def test_nightly_good_failed_refused_and_fixed(night):
    work, run_night = night
    code, log, out = run_night()
    assert code == 0, log
    assert "all slides done" in log
    assert json.loads((out / "last-summary.json").read_text())["state"] == "finished"

    broken = work / "src" / "slide" / "broken.png"
    broken.write_bytes(b"not a png")
    code, log, out = run_night()
    assert code == 4 and "some inputs failed" in log, log
    code, log, out = run_night()
    assert code == 4, "a failed capture shows every night until it is fixed"
    failed_summary = (out / "last-summary.json").read_text()
    assert json.loads(failed_summary)["failed_captures"] == 1

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from cellbatch.lock import RunLock;"
         "lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, log, out = run_night()
    finally:
        holder.kill()
        holder.wait()
    assert code == 3 and "could not run" in log, log
    assert (out / "last-summary.json").read_text() == failed_summary, "a refused night keeps the last summary"
    error = json.loads((out / "last-error.json").read_text())
    assert error["exit_code"] == 3 and str(holder.pid) in error["error"]

    broken.unlink()
    code, log, out = run_night()
    assert code == 0, log
    summary = json.loads((out / "last-summary.json").read_text())
    assert summary["failed_captures"] == 0 and summary["slides"][0]["status"] == "done"
    assert not list(out.glob(".summary.*"))
