"""``cellbatch check OUT`` (cellbatch.check.recheck, cellbatch.cli.check): re-checking a written output.

Slide folders are written the way ``cellbatch run`` writes them (cellbatch.write.SlideWriter), with
the agreement check run inline exactly as the pipeline streams it; re-checking must give the same
bytes and figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cellbatch.atomic import write_json_atomic
from cellbatch.check.agreement import AgreementCheck, CheckSettings, load_classifier
from cellbatch.cli import cli, main
from cellbatch.errors import ExitCode
from cellbatch.write import CELL_COLUMNS, CHECK_COLUMNS, SlideWriter
from tests.test_check_agreement import BLUE, GREEN, GREYISH_RED, RED, make_crops, save_classifier

COLOURS = [RED, GREEN, BLUE, GREYISH_RED, RED, BLUE, GREEN]


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_classifier(tmp_path_factory.mktemp("clf") / "mean_colour.pt")


def cell_rows(n: int) -> list[dict]:
    return [
        {
            "source": f"cap{i // 2}.png",
            "frame": 0,
            "x0": 10 * i,
            "y0": 5,
            "x1": 10 * i + 256,
            "y1": 261,
            "cx": 10 * i + 128.25,
            "cy": 133.0,
            "area_px": 9000 + i,
            "nucleus_area_px": 4000,
            "edge": False,
        }
        for i in range(n)
    ]


def write_slide(
    out: Path, name: str, crops: np.ndarray, generated: np.ndarray | None, *, check=None, batch: int = 3
) -> dict | None:
    """Write one slide folder as the pipeline does; with ``check``, run it inline per batch."""
    arrays = {"crop": (256, 256, 3), "mask": (256, 256)}
    if generated is not None:
        arrays["generated"] = (256, 256, 3)
    columns = CELL_COLUMNS + (CHECK_COLUMNS if check is not None else ())
    writer = SlideWriter(out / name, out_root=out, arrays=arrays, columns=columns)
    state = check.start_slide(name) if check is not None else None
    rows = cell_rows(len(crops))
    for start in range(0, len(crops), batch):
        part = rows[start : start + batch]
        data = {"crop": crops[start : start + batch], "mask": np.zeros((len(part), 256, 256), np.uint8)}
        if generated is not None:
            data["generated"] = generated[start : start + batch]
        if check is not None:
            output = data.get("generated", data["crop"])
            for row, extra in zip(part, check.check_batch(state, part, data["crop"], output), strict=True):
                row.update(extra)
        writer.add(part, data)
    summary = check.finish_slide(state, writer.folder) if check is not None else None
    provenance = {"slide": name, "check": summary, "classifier": check.provenance() if check else None}
    writer.commit(provenance)
    return summary


def write_run_json(out: Path, names: list[str]) -> None:
    slides = [{"name": n, "status": "done", "captures": 4, "failed_captures": 0, "cells": 7} for n in names]
    write_json_atomic(out / "run.json", {"exit_code": 0, "slides_by_status": {"done": len(names)}, "slides": slides})


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_check_on_an_output_equals_the_inline_result(tmp_path, classifier_file):
    crops = make_crops(COLOURS)
    generated = np.ascontiguousarray(crops[..., ::-1])
    settings = CheckSettings(min_confidence=0.9, min_agreement=0.5, batch_size=4)
    inline = AgreementCheck(load_classifier(classifier_file), settings=settings)
    out = tmp_path / "out"
    expected = write_slide(out, "day1/slideA", crops, generated, check=inline)
    write_run_json(out, ["day1/slideA"])
    slide = out / "day1" / "slideA"
    before = {name: (slide / name).read_bytes() for name in ("cells.csv", "confusion.csv", "confusion.png")}

    result = CliRunner().invoke(
        cli,
        [
            "check",
            str(out),
            "--classifier",
            str(classifier_file),
            "--device",
            "cpu",
            "--min-confidence",
            "0.9",
            "--min-agreement",
            "0.5",
            "--batch-size",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == ExitCode.QC_FAILED, result.output
    for name, data in before.items():
        assert (slide / name).read_bytes() == data, f"{name} differs from the inline run's"
    provenance = json.loads(read_text(slide / "provenance.json"))
    rechecked = provenance["check"].pop("rechecked")
    assert provenance["check"] == expected
    assert set(rechecked) == {"command", "at"}
    assert provenance["classifier"]["sha256"] == inline.provenance()["sha256"]
    assert expected["qc_failed"] is True and expected["unsure"] == 1


def test_check_adds_the_columns_to_an_output_written_without_a_classifier(tmp_path, classifier_file):
    crops = make_crops(COLOURS)
    out_plain, out_inline = tmp_path / "plain", tmp_path / "inline"
    write_slide(out_plain, "s", crops, None)
    expected = write_slide(
        out_inline, "s", crops, None, check=AgreementCheck(load_classifier(classifier_file), settings=CheckSettings())
    )
    assert "class_input" not in read_text(out_plain / "s" / "cells.csv")

    result = CliRunner().invoke(cli, ["check", str(out_plain), "--classifier", str(classifier_file), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_text(out_plain / "s" / "cells.csv") == read_text(out_inline / "s" / "cells.csv")
    summary = json.loads(read_text(out_plain / "s" / "provenance.json"))["check"]
    summary.pop("rechecked")
    assert summary == expected
    assert summary["agreement"] == 1.0, "no generated array: the crop is the output and its own reference"
    assert "s: agreement 100.0% (7/7 checked" in result.output


def test_qc_failure_sets_exit_code_5_and_updates_run_json(tmp_path, classifier_file, capsys):
    good = make_crops(COLOURS)
    out = tmp_path / "out"
    write_slide(out, "good", good, good.copy())
    write_slide(out, "bad", good, np.ascontiguousarray(good[..., ::-1]))
    write_run_json(out, ["bad", "good"])

    # Through the console entry point: the exit code must survive it, not only click's test runner.
    with pytest.raises(SystemExit) as stop:
        main(["check", str(out), "--classifier", str(classifier_file), "--device", "cpu", "--min-agreement", "0.9"])
    assert stop.value.code == ExitCode.QC_FAILED
    printed = capsys.readouterr()
    assert "bad: agreement" in printed.out and "QC FAILED" in printed.out
    assert "below --min-agreement 0.9: bad" in printed.err
    run = json.loads(read_text(out / "run.json"))
    status = {s["name"]: s["status"] for s in run["slides"]}
    assert status == {"bad": "qc_failed", "good": "done"}
    assert run["exit_code"] == ExitCode.QC_FAILED
    assert run["slides_by_status"] == {"qc_failed": 1, "done": 1}
    assert run["check"]["qc_failed_slides"] == ["bad"]
    assert run["check"]["cells"] == 14
    bad = next(s for s in run["slides"] if s["name"] == "bad")["check"]
    good_summary = next(s for s in run["slides"] if s["name"] == "good")["check"]
    assert run["check"]["agreeing"] == bad["agreeing"] + good_summary["agreeing"]

    again = CliRunner().invoke(cli, ["check", str(out), "--classifier", str(classifier_file), "--device", "cpu"])
    assert again.exit_code == 0, "without the gate the same output passes"
    assert json.loads(read_text(out / "run.json"))["exit_code"] == 0


def test_check_on_a_folder_without_slides_is_a_one_line_error(tmp_path, classifier_file, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["check", str(tmp_path / "empty"), "--classifier", str(classifier_file), "--device", "cpu"])
    assert stop.value.code == ExitCode.COULD_NOT_RUN
    err = capsys.readouterr().err
    assert "no slide folders" in err and len(err.strip().splitlines()) == 1


def test_check_refuses_a_slide_whose_rows_and_crops_disagree(tmp_path, classifier_file, capsys):
    out = tmp_path / "out"
    write_slide(out, "s", make_crops(COLOURS), None)
    csv_path = out / "s" / "cells.csv"
    csv_path.write_text("\n".join(read_text(csv_path).splitlines()[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        main(["check", str(out), "--classifier", str(classifier_file), "--device", "cpu"])
    assert stop.value.code == ExitCode.COULD_NOT_RUN
    assert "re-run the slide" in capsys.readouterr().err
