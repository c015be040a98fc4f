"""``cellbatch export-images OUT`` (cellbatch.report.images): one lossless PNG per cell."""

from __future__ import annotations

import csv

import imageio.v3 as iio
import numpy as np
import pytest
import zarr

from cellbatch.cli import main


def export(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["export-images", *map(str, args)])
    return int(exit_info.value.code)


def cells_of(out, slide):
    with open(out / slide / "cells.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_cell_becomes_slide_cell_id_class_png_with_the_stored_pixels(report_run, tmp_path):
    dest = tmp_path / "png"
    code = export(report_run.out, "--array", "generated", "--out", dest)
    assert code == 0
    expected = set()
    for slide in ("day1/slideA", "day1/slideB"):
        generated = zarr.open_group(str(report_run.out / slide / "cells.zarr"), mode="r")["generated"]
        for row in cells_of(report_run.out, slide):
            path = dest / slide / f"{row['cell_id']}_{row['class_reference']}.png"
            expected.add(path)
            assert np.array_equal(iio.imread(path), generated[int(row["cell_id"])])
    assert set(dest.rglob("*.png")) == expected


def test_slides_and_class_filters_choose_what_is_written(report_run, tmp_path, capsys):
    dest = tmp_path / "png"
    rows = cells_of(report_run.out, "day1/slideB")
    wanted = rows[0]["class_reference"]
    code = export(report_run.out, "--array", "crop", "--out", dest, "--slides", "day1/*B", "--class", wanted)
    assert code == 0
    names = {p.relative_to(dest).as_posix() for p in dest.rglob("*.png")}
    assert names == {f"day1/slideB/{r['cell_id']}_{wanted}.png" for r in rows if r["class_reference"] == wanted}
    assert f"{len(names)} crop image(s) of 1 slide(s)" in capsys.readouterr().err


def test_an_array_no_slide_has_or_an_unknown_slide_is_one_line_and_exit_3(report_run, tmp_path, capsys):
    from tests.test_report import write_cells

    out = tmp_path / "out"
    write_cells(out, "s", ["a"] * 3)
    code = export(out, "--array", "normalised", "--out", tmp_path / "png")
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and "no chosen slide has a 'normalised' array" in err
    code = export(report_run.out, "--out", tmp_path / "png", "--slides", "nope*")
    err = capsys.readouterr().err
    assert code == 3 and "no slide of" in err and "day1/slideA" in err
