"""A run over good captures mixed with the bad-input corpus: every good one converted, every bad one
named with its reason in run.json, no traceback, the documented exit code."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.badinput import EXPECTED_TEXT, make_bad_corpus, synthetic_capture


def test_run_over_the_bad_input_corpus(tmp_path):
    src = tmp_path / "in"
    good = [synthetic_capture(height=240, width=320, seed=s) for s in range(3)]
    outcome = make_bad_corpus(src, good=good)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "cellbatch", "run", str(src), "-o", str(out), "--json",
         "--detector", "threshold", "--cell-diameter", "60"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "run.json").read_text())
    failure_text = "\n".join(f"{f.get('slide')}|{f.get('path')}|{f.get('reason')}" for f in summary["failures"])
    slides = {s["name"]: s for s in summary["slides"]}

    captures = json.loads((out / "captures" / "provenance.json").read_text())
    inputs = {i["path"]: i for i in captures["inputs"]}
    failed_paths = {f["path"] for f in captures["failures"]}
    for key, expected in outcome.items():
        if expected == "ignored":
            assert key not in inputs and not any(key in name for name in slides), key
            continue
        if key.startswith("captures/"):
            if expected == "failed":
                assert key in failed_paths, key
                reason = next(f["reason"] for f in captures["failures"] if f["path"] == key)
                assert "\n" not in reason and "Traceback" not in reason
                if key in EXPECTED_TEXT:
                    assert EXPECTED_TEXT[key] in reason, (key, reason)
            else:
                assert key not in failed_paths and inputs[key]["cells"] is not None, key
                if expected == "converted" and key in EXPECTED_TEXT:
                    assert any(EXPECTED_TEXT[key] in n for n in inputs[key].get("notes", [])), key
        elif expected == "failed" and "[" not in key:  # a whole Zarr slide
            assert slides[key]["status"] == "failed" and slides[key]["reason"], key
            assert EXPECTED_TEXT.get(key, "") in slides[key]["reason"]
        elif "[" in key:  # one frame of a Zarr slide
            store, frame = key[:-1].split("[")
            if expected == "failed":
                assert store in failure_text and EXPECTED_TEXT[key] in failure_text, key
            else:
                prov = json.loads((out / store / "provenance.json").read_text())
                assert prov["inputs"][int(frame)]["cells"] is not None, key
        else:
            assert slides[key]["status"] == "done", (key, slides[key])
