"""The report as one self-contained HTML page: inline CSS, images as data URIs, no script.

A Content-Security-Policy meta tag forbids every load except ``data:`` images and the inline style,
so even a stray URL in a slide name cannot make the page reach the network.
"""

from __future__ import annotations

import base64
import functools
import io
import shlex
from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape
from typing import Any

import numpy as np

from cellbatch.check.agreement import qc_outcome, qc_state
from cellbatch.check.confusion import heat_colours, ink_for, row_fractions
from cellbatch.report.figures import STATUS_COLOURS
from cellbatch.report.outdir import OutView, SlideView
from cellbatch.report.sample import ALL_CELLS, DISAGREE, Sample

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
DASH = "—"
TILE = 192  # CSS pixels a 256x256 picture is shown at
EXIT_MEANINGS = {
    0: "every slide done (or skipped as unchanged)",
    3: "could not run",
    4: "finished, but some captures or slides failed",
    5: "finished, but some slides are below --min-agreement",
    130: "interrupted",
}
COLUMN_TITLES = {
    "crop": "crop (input)",
    "generated": "generated",
    "normalised": "normalised",
    "reference": "reference",
}

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 24px 48px;
       color: #212121; max-width: 1400px; }
h1 { font-size: 22px; margin: 20px 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin: 20px 0 6px; }
table { border-collapse: collapse; } td, th { padding: 3px 8px; text-align: left; vertical-align: top; }
table.grid td, table.grid th { border-bottom: 1px solid #e0e0e0; }
table.grid th { background: #f5f5f5; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; color: #fff; font-size: 12px; }
.muted { color: #757575; } .warn { color: #c62828; font-weight: 600; }
dl.header { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.header dt { color: #616161; } dl.header dd { margin: 0; overflow-wrap: anywhere; }
code { font-size: 12px; background: #f5f5f5; padding: 0 3px; }
table.heat { margin: 4px 0; } table.heat td.c { width: 48px; height: 36px; text-align: center; vertical-align: middle;
  font-variant-numeric: tabular-nums; border: 1px solid #fff; }
table.heat th { font-weight: normal; font-size: 12px; vertical-align: middle; }
table.heat th.col { writing-mode: vertical-rl;
  transform: rotate(180deg); vertical-align: bottom; text-align: left; height: 90px; padding: 2px; }
table.heat th.axis { font-weight: 600; text-align: center; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; margin: 4px 0 12px; }
.legend .bar { width: 200px; height: 12px; border: 1px solid #999; }
.heatwrap { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
table.montage td { padding: 2px; } table.montage td.label { font-size: 12px; width: 210px; }
table.montage img { width: TILEpx; height: TILEpx; display: block; }
table.montage th { font-weight: 600; font-size: 12px; text-align: center; }
.disagree { color: #c62828; font-weight: 600; }
img.plot { max-width: 100%; }
details > summary { cursor: pointer; font-weight: 600; margin: 8px 0; }
""".replace("TILE", str(TILE))


def render_page(view: OutView, sample: Sample, columns: Sequence[str], run_check: dict[str, Any] | None,
                plots: Mapping[str, bytes], *, generated_at: str, open_slides: bool) -> str:
    """The whole page as text."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>cellbatch report: {escape(str(view.root))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>cellbatch run report</h1><p class=\"muted\">{escape(str(view.root))} · report built {generated_at}</p>",
        '<nav><a href="#run">Run</a> · <a href="#slides">Slides</a> · <a href="#agreement">Agreement</a> · '
        '<a href="#montages">Before / after</a> · <a href="#slide-details">Per slide</a></nav>',
        run_header(view),
        slide_table(view.slides),
        agreement_section(view, run_check, plots),
        montage_section(sample, columns),
        slide_details(view.slides, open_slides=open_slides),
        "</body></html>",
    ]
    return "\n".join(parts)


def run_header(view: OutView) -> str:
    run, slides = view.run, view.slides
    first = next((s.provenance for s in slides if s.provenance), {})
    rows = [
        ("command", _command(run.get("command"))),
        ("cellbatch", _text(run.get("cellbatch_version") or first.get("cellbatch_version"))),
        ("state", _text(run.get("state"))),
        ("pending", _pending(run.get("pending"))),
        ("model", _identities(slides, "model")),
        ("classifier", _identities(slides, "classifier")),
        ("normalisation", _distinct(slides, _normalisation)),
        ("device", _distinct(slides, _device)),
        ("precision", _distinct(slides, _precision)),
        ("generation", _text(run.get("generation"))),
        ("started", _text(_when(run.get("started")))),
        ("finished", _text(_when(run.get("finished")))),
        ("throughput", escape(_throughput(run))),
        ("exit code", _exit(run.get("exit_code"))),
        ("slides", escape(_status_counts(slides))),
        ("cells", f"{sum(s.cells or 0 for s in slides):,} in OUT"),
    ]
    notes = run.get("notes") or []
    if notes:
        rows.append(("notes", "<br>".join(f'<span class="warn">{escape(str(n))}</span>' for n in notes)))
    items = "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in rows)
    intro = ("The report describes everything in OUT: slides skipped by the last run show the figures "
             "they were committed with.")
    return f'<section id="run"><h2>Run</h2><p class="muted">{intro}</p><dl class="header">{items}</dl></section>'


def slide_table(slides: Sequence[SlideView]) -> str:
    head = ("<tr><th>slide</th><th>status</th><th class=num>captures</th><th class=num>failed</th>"
            "<th class=num>cells</th><th class=num>agreement</th><th>QC</th><th>failures / reason</th></tr>")
    rows = []
    for s in slides:
        check = s.check or {}
        reasons = _failure_lines(s, limit=3)
        rows.append(
            f'<tr id="row-{s.anchor}"><td><a href="#{s.anchor}">{escape(s.name)}</a>'
            f'{"" if s.in_run_json else " <span class=muted>(not in run.json)</span>"}</td>'
            f"<td>{_badge(s.status)}</td><td class=num>{_num(s.captures)}</td>"
            f"<td class=num>{_num(s.failed_captures)}</td><td class=num>{_num(s.cells)}</td>"
            f"<td class=num>{_rate(check.get('agreement')) if s.check else DASH}</td>"
            f"<td>{_qc_short(check) if s.check else DASH}</td><td>{reasons}</td></tr>"
        )
    return (f'<section id="slides"><h2>Slides ({len(slides)})</h2>'
            f'<table class="grid" id="slide-table">{head}{"".join(rows)}</table></section>')


def agreement_section(view: OutView, run_check: dict[str, Any] | None, plots: Mapping[str, bytes]) -> str:
    parts = ['<section id="agreement"><h2>Cells and agreement</h2>']
    if "cells_per_slide" in plots:
        parts.append(_plot(plots["cells_per_slide"], "cells per slide", "plot-cells-per-slide"))
    if run_check is None and any(s.check for s in view.slides):
        parts.append('<p class="warn">The slides were checked with classifiers of different classes, so there is '
                     "no run-level matrix: see each slide's heat map below, or re-check them all at once with "
                     "<code>cellbatch check OUT --classifier CLF.pt</code>.</p>")
    elif run_check is None:
        parts.append('<p class="muted">No classifier checked this output (run with --classifier, or '
                     "<code>cellbatch check OUT --classifier CLF.pt</code>): no agreement figures.</p>")
    else:
        if "agreement_per_class" in plots:
            parts.append(_plot(plots["agreement_per_class"], "agreement per class", "plot-agreement-per-class"))
        parts.append(heat_map(run_check, title="All slides", element_id="heat-run"))
    parts.append("</section>")
    return "".join(parts)


def heat_map(summary: Mapping[str, Any], *, title: str, element_id: str) -> str:
    """A confusion matrix as an HTML table coloured like ``confusion.png``, counts in the cells, legend below."""
    confusion = summary.get("confusion") or {}
    classes = list(confusion.get("classes") or [])
    matrix = np.asarray(confusion.get("matrix") or np.zeros((0, 0)), dtype=np.int64)
    if not classes or matrix.shape != (len(classes), len(classes)):
        return f'<p class="muted">{escape(title)}: no confusion matrix recorded.</p>'
    fraction = row_fractions(matrix)
    colours = heat_colours(fraction)
    rate = _rate(summary.get("agreement"))
    caption = (f"{escape(title)}: agreement {rate} of {int(summary.get('checked') or 0):,} checked cells"
               f" — {escape(qc_outcome(summary))}")
    header = "".join(f'<th class="col">{escape(c)}</th>' for c in classes)
    body = []
    for i, name in enumerate(classes):
        cells = []
        for j in range(len(classes)):
            r, g, b = (int(v) for v in colours[i, j])
            ink = "#000" if ink_for(fraction[i, j]) == (0, 0, 0) else "#fff"
            cells.append(f'<td class="c" style="background:rgb({r},{g},{b});color:{ink}" '
                         f'title="{escape(name)} → {escape(classes[j])}: {fraction[i, j]:.0%} of the row">'
                         f"{int(matrix[i, j])}</td>")
        lead = f'<th class="axis" rowspan="{len(classes)}" style="writing-mode:vertical-rl;transform:rotate(180deg)">' \
               "reference class</th>" if i == 0 else ""
        body.append(f"<tr>{lead}<th>{escape(name)}</th>{''.join(cells)}</tr>")
    return (
        f'<figure class="heat" id="{element_id}"><figcaption><b>{caption}</b></figcaption>'
        f'<table class="heat"><tr><td></td><td></td><th class="axis" colspan="{len(classes)}">output class</th></tr>'
        f"<tr><td></td><td></td>{header}</tr>{''.join(body)}</table>{_legend()}</figure>"
    )


def montage_section(sample: Sample, columns: Sequence[str]) -> str:
    parts = ['<section id="montages"><h2>Before / after</h2>']
    if not sample.groups:
        parts.append('<p class="muted">No cells in OUT.</p></section>')
        return "".join(parts)
    per_group = max(len(c) for c in sample.groups.values())
    classified = any(g != ALL_CELLS for g in sample.groups)
    grouping = ("per class (the class the classifier gave the cell's reference, else its output)" if classified
                else "(no classifier: one group of all cells)")
    parts.append(
        f"<p class=\"muted\">Up to {per_group} cells {grouping}, chosen by a hash of slide and cell id: the same "
        f"cells on every build, spread over all slides. Shown at {TILE} px; pictures are JPEG quality 95 without "
        "colour subsampling (<code>cellbatch export-images</code> writes lossless PNGs).</p>"
    )
    if "reference" not in columns and classified:
        parts.append('<p class="muted">No reference column: the check ran without --reference, so each cell\'s '
                     "reference was its own input crop.</p>")
    groups = sorted(g for g in sample.groups if g not in (ALL_CELLS, DISAGREE))
    groups += [g for g in (ALL_CELLS, DISAGREE) if g in sample.groups]
    for group in groups:
        cells = sample.groups[group]
        head = "".join(f"<th>{escape(COLUMN_TITLES.get(c, c))}</th>" for c in columns)
        rows = []
        for cell in cells:
            tiles = "".join(f"<td>{_tile(cell.pictures.get(c), c)}</td>" for c in columns)
            rows.append(f"<tr><td class=label>{_cell_label(cell)}</td>{tiles}</tr>")
        total = sample.counts.get(group, 0)
        parts.append(
            f'<h3 id="montage-{escape(_slug(group))}">{escape(group)} '
            f'<span class="muted">({len(cells)} of {total:,})</span></h3>'
            f'<table class="montage"><tr><th></th>{head}</tr>{"".join(rows)}</table>'
        )
    parts.append("</section>")
    return "".join(parts)


def slide_details(slides: Sequence[SlideView], *, open_slides: bool) -> str:
    parts = ['<section id="slide-details"><h2>Per slide</h2>']
    for s in slides:
        problem = s.status in ("failed", "qc_failed") or bool(s.failed_captures)
        opened = " open" if open_slides or problem else ""
        body = [f"<p>{_badge(s.status)} {_num(s.captures)} captures, {_num(s.failed_captures)} failed, "
                f"{_num(s.cells)} cells{' — ' + escape(s.reason) if s.reason else ''}</p>"]
        if s.folder is not None:
            body.append(f'<p class="muted">folder <code>{escape(s.name)}/</code>: cells.csv, cells.zarr, '
                        "provenance.json</p>")
        if s.failures:
            items = "".join(f"<li>{line}</li>" for line in _failure_items(s.failures))
            body.append(f"<p>Failed captures:</p><ul>{items}</ul>")
        if s.check:
            body.append(heat_map(s.check, title=s.name, element_id=f"heat-{s.anchor}"))
        parts.append(f'<details id="{s.anchor}"{opened}><summary>{escape(s.name)}</summary>{"".join(body)}</details>')
    parts.append("</section>")
    return "".join(parts)


def encode_jpeg(image: np.ndarray) -> str:
    """A data URI of an RGB uint8 image, JPEG quality 95 with full-resolution colour (4:4:4)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=95, subsampling=0)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _tile(image: np.ndarray | None, column: str) -> str:
    if image is None or image.ndim != 3:
        return f'<div class="muted" style="width:{TILE}px">{escape(column)} not available</div>'
    return f'<img alt="{escape(column)}" src="{encode_jpeg(image)}">'


def _cell_label(cell: Any) -> str:
    row = cell.row
    lines = [f"<b>{escape(cell.slide)}</b>", f"cell {cell.cell_id}",
             f"{escape(row.get('source', ''))} ({escape(row.get('cx', ''))}, {escape(row.get('cy', ''))})"]
    if row.get("class_output"):
        ref = row.get("class_reference") or DASH
        cls = "disagree" if row.get("agree") == "0" else ""
        lines.append(f'<span class="{cls}">reference {escape(ref)} → output {escape(row["class_output"])}</span>')
        if row.get("p_output"):
            lines.append(f"p(output) {escape(row['p_output'])}")
    return "<br>".join(lines)


def _plot(png: bytes, alt: str, element_id: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<p><img class="plot" id="{element_id}" alt="{escape(alt)}" src="{uri}" style="width:750px"></p>'


@functools.cache
def _legend() -> str:
    stops = ", ".join(f"rgb{tuple(int(v) for v in heat_colours(np.array(f)))} {100 * f:.0f}%"
                      for f in np.linspace(0, 1, 9))
    return (f'<div class="legend"><span>0%</span><span class="bar" style="background:linear-gradient(to right, '
            f'{stops})"></span><span>100% of the reference class\'s checked cells</span></div>')


def _qc_short(check: Mapping[str, Any]) -> str:
    state = qc_state(check)
    if state == "no gate":
        return '<span class="muted">no gate</span>'
    shown = '<span class="warn">FAILED</span>' if state == "failed" else "passed"
    return f"{shown} (min {_rate(check['min_agreement'])})"


def _badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#8d6e63")
    return f'<span class="badge" style="background:{colour}">{escape(status or DASH)}</span>'


def _failure_lines(slide: SlideView, *, limit: int) -> str:
    lines = [escape(slide.reason)] if slide.reason and slide.status == "failed" else []
    lines += list(_failure_items(slide.failures[:limit]))
    if len(slide.failures) > limit:
        lines.append(f'<a href="#{slide.anchor}">… {len(slide.failures) - limit} more</a>')
    return "<br>".join(lines) or ""


def _failure_items(failures: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"<code>{escape(str(f.get('path', DASH)))}</code>: {escape(str(f.get('reason', DASH)))}" for f in failures]


def _identities(slides: Sequence[SlideView], key: str) -> str:
    def describe(provenance: Mapping[str, Any]) -> str:
        item = provenance.get(key)
        if not isinstance(item, dict):
            return "none"
        metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
        trained = item.get("trained", metadata.get("trained"))
        path = str(item.get("path") or DASH)
        sha = str(item.get("sha256") or "")[:12] or DASH
        state = {True: "trained", False: "UNTRAINED: not a conversion", None: f"trained: {DASH}"}.get(trained, DASH)
        accuracy = metadata.get("heldout_accuracy")
        if isinstance(accuracy, int | float) and trained is None:  # a classifier states how well it did instead
            state = f"held-out accuracy {100 * accuracy:.1f}% on {metadata.get('heldout_images', DASH)} images"
        return f"{path.rsplit('/', 1)[-1]} (sha256 {sha}…, {state})"

    return _distinct(slides, describe)


def _distinct(slides: Sequence[SlideView], describe: Any) -> str:
    """One value when every slide agrees, else each value with the slides it holds for."""
    counts: dict[str, int] = {}
    for s in slides:
        if s.provenance:
            value = describe(s.provenance)
            counts[value] = counts.get(value, 0) + 1
    if not counts:
        return DASH
    if len(counts) == 1:
        return escape(next(iter(counts)))
    return "<br>".join(f"{escape(v)} <span class=muted>({n} slides)</span>" for v, n in counts.items())


def _normalisation(provenance: Mapping[str, Any]) -> str:
    chain = provenance.get("normalisation")
    if not chain:
        return "none"
    names = []
    for step in chain if isinstance(chain, list) else [chain]:
        if not isinstance(step, dict):
            names.append(str(step))
            continue
        profile = step.get("profile") if isinstance(step.get("profile"), dict) else {}
        label = str(step.get("name") or DASH) + (f":{step['arg']}" if step.get("arg") and not profile else "")
        sha = str(profile.get("sha256") or "")[:12]
        names.append(f"{label} (profile {str(profile.get('path', '')).rsplit('/', 1)[-1]}, sha256 {sha}…)"
                     if sha else label)
    return " → ".join(names)


def _device(provenance: Mapping[str, Any]) -> str:
    env = provenance.get("environment") or {}
    params = provenance.get("parameters") or {}
    device = params.get("device") or env.get("device") or DASH
    name = env.get("device_name")
    return f"{device} ({name})" if name and name != device else str(device)


def _precision(provenance: Mapping[str, Any]) -> str:
    params = provenance.get("parameters") or {}
    model = provenance.get("model") or {}
    value = params.get("precision") or (model.get("precision") if isinstance(model, dict) else None)
    return str(value) if value else DASH


def _pending(pending: Any) -> str:
    """Slides an interrupted (or still running) run had not reached."""
    if not isinstance(pending, list):
        return DASH
    if not pending:
        return "none"
    names = ", ".join(escape(str(n)) for n in pending[:10])
    return f"{len(pending)} slide(s): {names}{', …' if len(pending) > 10 else ''}"


def _throughput(run: Mapping[str, Any]) -> str:
    done = [s for s in run.get("slides") or [] if isinstance(s, dict) and s.get("status") in ("done", "qc_failed")]
    cells = sum(int(s.get("cells") or 0) for s in done)
    seconds = _seconds(run.get("started"), run.get("finished"))
    if seconds is None:
        return DASH
    if not done:
        return f"nothing converted by the last invocation ({seconds:.0f} s; every slide skipped or failed)"
    return f"{cells:,} cells in {seconds:,.0f} s: {cells / max(seconds, 1e-9):.1f} cells/s (last invocation)"


def _seconds(started: Any, finished: Any) -> float | None:
    try:
        return (datetime.fromisoformat(str(finished)) - datetime.fromisoformat(str(started))).total_seconds()
    except ValueError:
        return None


def _when(value: Any) -> str | None:
    return None if value is None else str(value).replace("T", " ")


def _exit(code: Any) -> str:
    if code is None:
        return DASH
    return f"{escape(str(code))}: {escape(EXIT_MEANINGS.get(code, 'see the README'))}"


def _status_counts(slides: Sequence[SlideView]) -> str:
    counts: dict[str, int] = {}
    for s in slides:
        counts[s.status] = counts.get(s.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"


def _command(command: Any) -> str:
    if isinstance(command, list):
        return f"<code>{escape(shlex.join(str(c) for c in command))}</code>"
    return _text(command)


def _text(value: Any) -> str:
    return DASH if value in (None, "") else escape(str(value))


def _num(value: Any) -> str:
    return DASH if value is None else f"{int(value):,}"


def _rate(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()
