"""run.json describes OUT (cellbatch.runstate): reruns keep failures and QC outcomes, state and pending
slides, interrupts (Ctrl-C, SIGTERM) leave a run.json that says where OUT stands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellbatch.errors import ExitCode
from cellbatch.registry import detectors
from cellbatch.runstate import exit_code_for
from tests.models import Identity, SwapRedBlue, save_generator
from tests.scenes import DarkBlobDetector, write_slides

TOY = ["--detector", "blobs", "--cell-diameter", "60", "--quiet"]


@pytest.fixture(autouse=True)
def toy_detector():
    detectors.register("blobs", DarkBlobDetector)


def test_failed_captures_persist_on_a_rerun_until_fixed(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 3, "ok": 2})
    broken = tmp_path / "in" / "s" / "broken.png"
    broken.write_bytes(b"not a png")
    args = ("run", tmp_path / "in", "-o", tmp_path / "out", "--json", *TOY)
    code, out, _ = cellbatch(*args)
    first = json.loads(out)
    assert code == ExitCode.INPUTS_FAILED

    code, out, err = cellbatch(*args)
    again = json.loads(out)
    assert code == ExitCode.INPUTS_FAILED, "a failure shows every night until fixed"
    slide = {s["name"]: s for s in again["slides"]}["s"]
    assert slide["status"] == "skipped" and slide["failed_captures"] == 1
    assert slide["cells"] == {s["name"]: s for s in first["slides"]}["s"]["cells"] > 0
    assert again["cells"] == first["cells"] and again["failed_captures"] == 1
    assert any("broken.png" in f["path"] for f in again["failures"])
    assert "1 failed captures" in err

    broken.unlink()
    code, out, _ = cellbatch(*args)
    fixed = json.loads(out)
    assert code == ExitCode.OK and {s["name"]: s["status"] for s in fixed["slides"]} == {"s": "done", "ok": "skipped"}


def test_a_qc_failure_persists_on_a_rerun_until_forced_or_fixed(tmp_path, cellbatch):
    from tests.test_check_agreement import save_classifier

    write_slides(tmp_path / "in", slides={"s": 3})
    clf = save_classifier(tmp_path / "clf.pt")
    swap = save_generator(SwapRedBlue(), tmp_path / "swap.pt")
    args = ("run", tmp_path / "in", "-o", tmp_path / "out", "--classifier", clf, "--min-agreement", "0.9",
            "--json", *TOY)
    assert cellbatch(*args, "--model", swap)[0] == ExitCode.QC_FAILED
    code, out, _ = cellbatch(*args, "--model", swap)
    summary = json.loads(out)
    assert code == ExitCode.QC_FAILED
    assert summary["slides"][0]["status"] == "skipped" and summary["slides"][0]["check"]["qc_failed"] is True
    assert summary["check"]["qc_failed_slides"] == ["s"]
    identity = save_generator(Identity(), tmp_path / "id.pt")
    assert cellbatch(*args, "--model", identity)[0] == ExitCode.OK  # the cause fixed: another model


def test_run_json_has_a_state_and_the_slides_still_to_do(tmp_path, cellbatch):
    from cellbatch.api import convert

    write_slides(tmp_path / "in", slides={"a": 1, "b": 1, "c": 1})
    seen = []

    def on_progress(captures: int, cells: int, slides: int) -> None:
        if slides:
            seen.append(json.loads((tmp_path / "out" / "run.json").read_text()))

    report = convert(tmp_path / "in", tmp_path / "out", detector="blobs", cell_diameter=60, on_progress=on_progress)
    assert seen[0]["state"] == "running" and seen[0]["pending"] == ["a", "b", "c"]
    final = json.loads((tmp_path / "out" / "run.json").read_text())
    assert final["state"] == "finished" and final["pending"] == [] and final["finished"]
    assert report.state == "finished"


def _raise_after_first_slide(exc: BaseException):
    """A progress callback that raises ``exc`` once the first slide has ended."""
    done = []

    def on_progress(captures: int, cells: int, slides: int) -> None:
        done.append(slides)
        if sum(done) == 1:
            raise exc

    return on_progress


def test_ctrl_c_marks_the_run_interrupted_and_lists_what_is_left(tmp_path):
    from cellbatch.api import convert
    from cellbatch.errors import Interrupted

    write_slides(tmp_path / "in", slides={"a": 1, "b": 1, "c": 1})
    with pytest.raises(Interrupted) as stop:
        convert([tmp_path / "in"], tmp_path / "out", detector="blobs", cell_diameter=60,
                on_progress=_raise_after_first_slide(KeyboardInterrupt()))
    state = json.loads((tmp_path / "out" / "run.json").read_text())
    assert state["state"] == "interrupted" and state["exit_code"] == 0
    assert [s["name"] for s in state["slides"]] == ["a"] and state["pending"] == ["b", "c"]
    assert "1 slide(s) committed" in stop.value.message and "rerun" in stop.value.message
    assert stop.value.exit_code == 130
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_a_lost_cluster_leaves_a_run_json_with_what_the_run_did(tmp_path):
    from cellbatch.api import convert
    from cellbatch.errors import ClusterLostError

    write_slides(tmp_path / "in", slides={"a": 1, "b": 1, "c": 1})
    lost = ClusterLostError("the Dask cluster has had no workers for 3 s")
    with pytest.raises(ClusterLostError):
        convert([tmp_path / "in"], tmp_path / "out", detector="blobs", cell_diameter=60,
                on_progress=_raise_after_first_slide(lost))
    state = json.loads((tmp_path / "out" / "run.json").read_text())  # saved now, not up to 5 s ago
    assert state["state"] == "interrupted" and [s["name"] for s in state["slides"]] == ["a"]
    assert state["pending"] == ["b", "c"]


SLOW_RUN = """
import sys, time
from cellbatch.registry import detectors
from tests.scenes import DarkBlobDetector

class Slow(DarkBlobDetector):
    def __call__(self, image):
        time.sleep(0.3)
        return super().__call__(image)

detectors.register("slow", Slow)
from cellbatch.cli import main
main(sys.argv[1:])
"""


def test_sigterm_ends_the_run_like_ctrl_c(tmp_path):
    write_slides(tmp_path / "in", slides={f"s{i}": 2 for i in range(8)})
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, "run", str(tmp_path / "in"), "-o", str(out), "--detector", "slow",
         "--cell-diameter", "60", "--workers", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 120
    while not (out / "s0" / "provenance.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "interrupted" in stderr and "rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert json.loads(stdout)["state"] == "interrupted"
    state = json.loads((out / "run.json").read_text())
    assert state["state"] == "interrupted" and state["pending"] and "s0" in {s["name"] for s in state["slides"]}


def test_one_exit_code_rule():
    assert exit_code_for([{"status": "done"}, {"status": "skipped"}]) == ExitCode.OK
    assert exit_code_for([{"status": "skipped", "check": {"qc_failed": True}}]) == ExitCode.QC_FAILED
    failed_input = {"status": "skipped", "failed_captures": 2}
    assert exit_code_for([{"status": "qc_failed"}, failed_input]) == ExitCode.INPUTS_FAILED
    assert exit_code_for([{"status": "failed"}]) == ExitCode.INPUTS_FAILED


def test_changing_the_check_settings_redoes_the_slide(tmp_path, cellbatch):
    from tests.test_check_agreement import save_classifier

    write_slides(tmp_path / "in", slides={"s": 3})
    clf = save_classifier(tmp_path / "clf.pt")
    swap = save_generator(SwapRedBlue(), tmp_path / "swap.pt")
    args = ("run", tmp_path / "in", "-o", tmp_path / "out", "--classifier", clf, "--model", swap, "--json", *TOY)
    assert cellbatch(*args, "--min-agreement", "0")[0] == ExitCode.OK
    code, out, _ = cellbatch(*args, "--min-agreement", "0.9")
    assert code == ExitCode.QC_FAILED and json.loads(out)["slides"][0]["status"] == "qc_failed"
    code, out, _ = cellbatch(*args, "--min-agreement", "0.9", "--min-confidence", "0.5")
    assert json.loads(out)["slides"][0]["status"] != "skipped"
    (tmp_path / "ref").mkdir()
    code, out, _ = cellbatch(*args, "--min-agreement", "0.9", "--min-confidence", "0.5",
                             "--reference", tmp_path / "ref")
    assert json.loads(out)["slides"][0]["status"] != "skipped"
