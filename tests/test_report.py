"""The HTML run report (cellbatch.report, ``cellbatch report``, ``cellbatch run --report``).

The page is parsed with the standard library's HTML parser; tests/test_report_browser.py renders it
in a real browser.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from cellbatch.check.confusion import heat_colours, render_confusion
from cellbatch.report import build_report
from cellbatch.report.outdir import read_out, slide_anchor
from cellbatch.report.sample import DISAGREE, sample_cells
from cellbatch.write import CELL_COLUMNS, CHECK_COLUMNS, SlideWriter, write_json_atomic
from tests.report_run import MIN_AGREEMENT


class Page(HTMLParser):
    """Every element as (tag, attrs, text directly inside it), and the elements under each id."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": list(self._open)}
        self.elements.append(element)
        if tag not in ("img", "meta", "br", "link", "input"):
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        if self._open:
            self._open[-1]["text"] += data

    def find(self, tag: str, **attrs) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag
                and all(e["attrs"].get(k) == v for k, v in attrs.items())]

    def inside(self, element_id: str, tag: str) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag
                and any(p["attrs"].get("id") == element_id for p in e["parents"])]


def page_of(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def decode(uri: str) -> np.ndarray:
    header, data = uri.split(",", 1)
    assert header.startswith("data:image/"), header
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def heat_counts(page: Page, element_id: str) -> list[int]:
    return [int(td["text"]) for td in page.inside(element_id, "td") if td["attrs"].get("class") == "c"]


def test_run_with_report_writes_one_self_contained_page(report_run):
    page = page_of(report_run.out / "report.html")
    assert report_run.exit_code == 4  # a failed capture and a failed slide
    csp = page.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert csp and "default-src 'none'" in csp[0]["attrs"]["content"]
    assert not page.find("script") and not page.find("link") and not page.find("iframe")
    for element in page.elements:
        for name in ("src", "href"):
            value = element["attrs"].get(name)
            if value is not None:
                assert value.startswith(("data:", "#")), f"<{element['tag']} {name}={value[:60]}> leaves the page"


def test_slide_table_lists_every_slide_with_status_failures_and_an_anchor(report_run):
    run = json.loads((report_run.out / "run.json").read_text())
    page = page_of(report_run.out / "report.html")
    rows = [tr for tr in page.inside("slide-table", "tr") if tr["attrs"].get("id")]
    assert [tr["attrs"]["id"] for tr in rows] == [f"row-{slide_anchor(s['name'])}" for s in run["slides"]]
    ids = {e["attrs"].get("id") for e in page.elements}
    for slide in run["slides"]:
        links = page.inside(f"row-{slide_anchor(slide['name'])}", "a")
        assert links[0]["attrs"]["href"] == f"#{slide_anchor(slide['name'])}" and slide_anchor(slide["name"]) in ids
        badges = [s["text"] for s in page.inside(f"row-{slide_anchor(slide['name'])}", "span")]
        assert slide["status"] in badges
    text = (report_run.out / "report.html").read_text(encoding="utf-8")
    for failure in run["failures"]:
        assert failure["reason"].split(":")[0].replace("'", "&#x27;") in text


def test_heat_maps_hold_the_committed_counts_and_the_qc_gate(report_run):
    page = page_of(report_run.out / "report.html")
    total = 0
    for slide in ("day1/slideA", "day1/slideB"):
        check = json.loads((report_run.out / slide / "provenance.json").read_text())["check"]
        matrix = np.asarray(check["confusion"]["matrix"])
        assert heat_counts(page, f"heat-{slide_anchor(slide)}") == matrix.ravel().tolist()
        total = total + matrix
    assert heat_counts(page, "heat-run") == np.asarray(total).ravel().tolist()
    caption = "".join(e["text"] for e in page.inside("heat-run", "b"))
    assert f"{100 * MIN_AGREEMENT:.1f}%" in caption and "QC FAILED" in caption
    # The colour of each cell is the one confusion.png uses for its row fraction.
    first = [td for td in page.inside("heat-run", "td") if td["attrs"].get("class") == "c"][0]
    row = np.asarray(total)[0]
    r, g, b = heat_colours(np.array(row[0] / row.sum()))
    assert f"background:rgb({r},{g},{b})" in first["attrs"]["style"]


def test_montages_show_the_sampled_cells_own_pictures_in_every_column(report_run):
    page = page_of(report_run.out / "report.html")
    montages = [e for e in page.find("h3") if e["attrs"].get("id", "").startswith("montage-")]
    assert {m["attrs"]["id"] for m in montages} >= {"montage-red", "montage-output-and-reference-disagree"}
    headers = [th["text"] for th in page.find("th") if th["text"] in ("crop (input)", "generated", "normalised",
                                                                       "reference")]
    assert headers[:4] == ["crop (input)", "generated", "normalised", "reference"]
    view = read_out(report_run.out)
    sample = sample_cells(view.slides, per_group=6)
    images = [img for img in page.find("img") if img["attrs"].get("alt") in ("crop", "generated", "normalised")]
    cells = [c for name in sorted(g for g in sample.groups if g != DISAGREE) for c in sample.groups[name]]
    assert len(images) >= 3 * len(cells) > 0
    def stored(cell, name):
        return zarr.open_group(str(report_run.out / cell.slide / "cells.zarr"), mode="r")[name][cell.cell_id]

    def error(a, b):
        return np.abs(a.astype(int) - b.astype(int)).mean()

    for cell, start in zip(cells, range(0, 3 * len(cells), 3), strict=True):
        for image, name in zip(images[start : start + 3], ("crop", "generated", "normalised"), strict=True):
            assert image["attrs"]["alt"] == name
            shown = decode(image["attrs"]["src"])
            own = error(shown, stored(cell, name))
            assert own < 3.0  # JPEG quality 95 of the same picture
            assert all(error(shown, stored(other, name)) > own for other in cells if other is not cell)


def test_an_all_skipped_rerun_reports_the_committed_figures_of_out(report_run, tmp_path, capsys):
    from cellbatch.cli import main

    out = tmp_path / "out"
    shutil.copytree(report_run.out, out)
    (out / "report.html").unlink()
    command = [a if a != str(report_run.out) else str(out) for a in report_run.command]
    with pytest.raises(SystemExit):
        main(command)
    assert {s["status"] for s in json.loads((out / "run.json").read_text())["slides"]} == {"skipped", "failed"}
    page = page_of(out / "report.html")
    for slide in ("day1/slideA", "day1/slideB"):
        check = json.loads((out / slide / "provenance.json").read_text())["check"]
        assert heat_counts(page, f"heat-{slide_anchor(slide)}") == np.ravel(check["confusion"]["matrix"]).tolist()
        cells = page.inside(f"row-{slide_anchor(slide)}", "td")
        assert f"{100 * check['agreement']:.1f}%" in [td["text"] for td in cells]


def write_cells(out: Path, name: str, classes: list[str], *, chunk: int = 16) -> None:
    """A checked slide folder with ``len(classes)`` cells whose crops encode their cell id (mod 256)."""
    writer = SlideWriter(out / name, out_root=out, arrays={"crop": (256, 256, 3), "generated": (256, 256, 3)},
                         columns=CELL_COLUMNS + CHECK_COLUMNS, chunk=chunk)
    for start in range(0, len(classes), chunk):
        part = classes[start : start + chunk]
        rows = [{"source": f"c{start + i}.png", "frame": 0, "cx": 128.0, "cy": 128.0, "class_input": c,
                 "class_output": c, "class_reference": c, "p_output": 0.9, "agree": True} for i, c in enumerate(part)]
        ids = (np.arange(start, start + len(part)) % 256).astype(np.uint8)
        crops = np.broadcast_to(ids[:, None, None, None], (len(part), 256, 256, 3)).copy()
        writer.add(rows, {"crop": crops, "generated": 255 - crops})
    writer.commit({"slide": name, "cells": len(classes)})


class CountingArray:
    """Wraps a Zarr array and counts the rows each read asks for."""

    def __init__(self, array, log: list[int]) -> None:
        self.array, self.log = array, log
        self.shape, self.chunks = array.shape, array.chunks

    def __getitem__(self, key):
        data = self.array[key]
        self.log.append(1 if np.ndim(data) == 3 else len(data))
        return data


def test_the_report_reads_only_the_sampled_rows_of_cells_zarr(tmp_path, monkeypatch):
    import cellbatch.report.sample as sample_module

    out = tmp_path / "out"
    write_cells(out, "big", ["a", "b", "c"] * 100)
    rows_read: list[int] = []
    real_open = sample_module.open_arrays
    monkeypatch.setattr(sample_module, "open_arrays", lambda folder: {
        name: CountingArray(array, rows_read) for name, array in real_open(folder).items()})
    result = build_report(out, cells_per_class=2)
    assert result.cells == 300 and result.sampled == 6
    assert sum(rows_read) == 6 * 2  # two arrays per sampled cell, one row each


def test_the_sample_is_deterministic_and_a_smaller_one_is_part_of_a_larger_one(tmp_path):
    out = tmp_path / "out"
    write_cells(out, "s1", ["a", "b"] * 40)
    write_cells(out, "s2", ["a", "b"] * 40)
    slides = read_out(out).slides
    first = sample_cells(slides, per_group=5)
    again = sample_cells(slides, per_group=5)
    small = sample_cells(slides, per_group=2)
    ids = {g: [(c.slide, c.cell_id) for c in cells] for g, cells in first.groups.items()}
    assert ids == {g: [(c.slide, c.cell_id) for c in cells] for g, cells in again.groups.items()}
    assert first.counts == {"a": 80, "b": 80} and all(len(v) == 5 for v in ids.values())
    for group, cells in small.groups.items():
        assert {(c.slide, c.cell_id) for c in cells} <= set(ids[group])
    assert {s for s, _ in ids["a"] + ids["b"]} == {"s1", "s2"}  # spread over slides, not the first one's cells


def test_slides_checked_with_different_classes_keep_their_heat_maps_and_say_why_no_run_matrix(tmp_path):
    from cellbatch.check.agreement import summarise

    out = tmp_path / "out"
    for name, classes in (("s1", ["a", "b"]), ("s2", ["x", "y", "z"])):
        write_cells(out, name, classes)
        matrix = np.eye(len(classes), dtype=np.int64)
        check = summarise(matrix, classes, cells=len(classes), unsure=0, no_reference=0, min_agreement=None)
        write_json_atomic(out / name / "provenance.json", {"slide": name, "cells": len(classes), "check": check})
    page = page_of(build_report(out).path)
    assert not page.inside("heat-run", "td")
    assert heat_counts(page, f"heat-{slide_anchor('s1')}") == [1, 0, 0, 1]
    assert len(heat_counts(page, f"heat-{slide_anchor('s2')}")) == 9
    assert any("classifiers of different classes" in p["text"] for p in page.find("p"))


def test_fields_a_run_did_not_write_show_as_a_dash(tmp_path):
    out = tmp_path / "out"
    write_cells(out, "s", ["a"] * 3)
    write_json_atomic(out / "s" / "provenance.json", {})
    write_json_atomic(out / "run.json", {"slides": [{"name": "s"}]})
    result = build_report(out)
    page = page_of(result.path)
    header = {dt["text"]: dd["text"] for dt, dd in zip(page.find("dt"), page.find("dd"), strict=True)}
    for field in ("command", "state", "pending", "device", "precision", "started", "exit code"):
        assert header[field] == "—", field
    assert header["model"] == "—"  # no provenance fields at all: nothing to say


def test_report_of_a_folder_that_is_no_output_is_one_line_and_exit_3(tmp_path, capsys):
    from cellbatch.cli import main

    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(SystemExit) as exit_info:
            main(["report", str(target)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 3 and err.count("\n") == 1 and "OUT of a cellbatch run" in err


def test_confusion_png_has_a_colour_legend_and_the_qc_outcome_in_its_title(tmp_path):
    from cellbatch.check.agreement import agreement_title

    summary = {"agreement": 0.5, "checked": 8, "min_agreement": 0.85, "qc_failed": True}
    title = agreement_title("slide", summary)
    assert "85.0%" in title and "QC FAILED" in title
    image = render_confusion(np.array([[3, 1], [2, 2]]), ["red", "blue"], title=title).astype(int)
    top, bottom = heat_colours(np.array([1.0, 0.0])).astype(int)
    # A colour bar: some column runs from the 100% colour down to the 0% colour through many shades.
    found = False
    for x in range(image.shape[1]):
        column = image[:, x]
        near_top = np.where(np.abs(column - top).sum(axis=1) <= 6)[0]
        near_bottom = np.where(np.abs(column - bottom).sum(axis=1) <= 6)[0]
        if len(near_top) and len(near_bottom) and near_top.min() < near_bottom.max():
            shades = {tuple(c) for c in column[near_top.min() : near_bottom.max()]}
            found = found or len(shades) > 50
    assert found, "no colour legend in the heat map"
