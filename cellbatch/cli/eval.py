"""``cellbatch eval``: measure stages against ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cellbatch.cli.options import Group, cell_diameter_option, detector_option, json_option


@click.group("eval", cls=Group)
def eval_() -> None:
    """Measure detection against ground truth: boxes, or captures centred on their cell."""


@eval_.command("detect")
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "--boxes",
    required=True,
    type=click.Path(path_type=Path),
    help="White-cell boxes: a CSV file (filename,xmin,ymin,xmax,ymax) or a Pascal VOC Annotations folder.",
)
@cell_diameter_option
@detector_option
@click.option("--verbose", "-v", is_flag=True, help="List the missed boxes and false detections of each image.")
@json_option
def detect(src: Path, boxes: Path, cell_diameter: float, detector: str, verbose: bool, as_json: bool) -> None:
    """Score the detector on SRC against --boxes: recall and precision.

    SRC is a folder of captures (searched recursively) or one capture file. A detection is a hit when
    its centroid falls inside a box no other detection has claimed (one to one). Recall is hits over
    boxes, precision hits over detections. Images that the boxes do not name hold no white cell:
    every detection there is false.
    """
    from cellbatch.errors import InputNotFoundError
    from cellbatch.evaluate import evaluate_detector, load_boxes
    from cellbatch.read import is_image_file, iter_image_files
    from cellbatch.registry import make_detector

    if not src.exists():
        raise InputNotFoundError(f"input {src} does not exist: pass a folder of captures or one capture file")
    images = [src] if src.is_file() and is_image_file(src) else list(iter_image_files(src))
    if not images:
        raise InputNotFoundError(f"no capture files (.png, .jpg, .tif, .bmp) under {src}")
    truth = load_boxes(boxes)
    find = make_detector(detector, cell_diameter=cell_diameter)
    score = evaluate_detector(images, truth, find)

    if as_json:
        summary = score.as_dict()
        summary["detector"] = detector
        summary["cell_diameter"] = cell_diameter
        if verbose:
            summary["per_image"] = [
                {
                    "image": m.name,
                    "boxes": m.n_boxes,
                    "detections": m.n_detections,
                    "missed": [[b.xmin, b.ymin, b.xmax, b.ymax] for b in m.missed],
                    "false": [list(c) for c in m.false],
                }
                for m in score.images
            ]
        click.echo(json.dumps(summary, indent=2))
        return
    if verbose:
        for m in score.images:
            for b in m.missed:
                click.echo(f"{m.name}: missed box ({b.xmin:g}, {b.ymin:g}, {b.xmax:g}, {b.ymax:g})")
            for x, y in m.false:
                click.echo(f"{m.name}: false detection at ({x:.0f}, {y:.0f})")
    click.echo(f"images {len(score.images)}  boxes {score.n_boxes}  detections {score.n_detections}  hits {score.hits}")
    click.echo(f"recall {score.recall:.4f}  precision {score.precision:.4f}")


@eval_.command("centred")
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "--empty",
    "empty_groups",
    multiple=True,
    metavar="FOLDER",
    help="A class folder whose captures hold no white cell (e.g. platelet); scored on finding none. Repeatable.",
)
@click.option("--radius", default=25.0, show_default=True, help="Pixels from the image centre that count as central.")
@click.option(
    "--half",
    type=click.Choice(["even", "odd"]),
    help="Only every other capture of each folder in name order (0th, 2nd, ... or 1st, 3rd, ...): tune on one half, "
    "report the other.",
)
@cell_diameter_option
@detector_option
@click.option("--verbose", "-v", is_flag=True, help="List the captures that fail, with each cell's distances.")
@json_option
def centred(
    src: Path,
    empty_groups: tuple[str, ...],
    radius: float,
    half: str | None,
    cell_diameter: float,
    detector: str,
    verbose: bool,
    as_json: bool,
) -> None:
    """Score the detector on single-cell captures centred on their cell (a CellaVision export, PBC).

    SRC is a folder of captures, usually one subfolder per cell class. Per folder, prints the share of
    captures with exactly one cell within --radius of the image centre, read two ways: the cell's
    centroid lies within it ("centroid"), or the cell's body (a disc of its area around its centroid)
    reaches it ("body"), and over all those folders together. A capture with no cell or two central
    cells is a miss. Folders named by --empty (platelet captures) are scored on holding no cell whose
    body reaches within --radius of the centre: a white cell at the border is a real cell, not an error.
    """
    from cellbatch.errors import InputNotFoundError
    from cellbatch.evaluate import evaluate_centred, half_of_each_folder
    from cellbatch.read import iter_image_files
    from cellbatch.registry import make_detector

    if not src.is_dir():
        raise InputNotFoundError(f"input folder {src} does not exist: pass a folder of single-cell captures")
    images = list(iter_image_files(src))
    if not images:
        raise InputNotFoundError(f"no capture files (.png, .jpg, .tif, .bmp) under {src}")
    if half is not None:
        images = half_of_each_folder(images, half)
    find = make_detector(detector, cell_diameter=cell_diameter)
    captures = evaluate_centred(images, find)

    groups: dict[str, list] = {}
    for capture in captures:
        groups.setdefault(capture.group, []).append(capture)
    summary = {}
    failures = []
    cell_groups = {"captures": 0, "one_central_centroid": 0, "one_central_body": 0}
    for group, members in sorted(groups.items()):
        if group in empty_groups:
            ok = [c.central(radius, "body") == 0 for c in members]
            summary[group] = {"captures": len(members), "no_central_cell": sum(ok) / len(members)}
            failures += [(c, "a central cell found") for c, good in zip(members, ok, strict=True) if not good]
            continue
        by_centroid = [c.central(radius, "centroid") == 1 for c in members]
        by_body = [c.central(radius, "body") == 1 for c in members]
        summary[group] = {
            "captures": len(members),
            "one_central_centroid": sum(by_centroid) / len(members),
            "one_central_body": sum(by_body) / len(members),
        }
        for key, hits in (("captures", members), ("one_central_centroid", by_centroid), ("one_central_body", by_body)):
            cell_groups[key] += sum(map(bool, hits))
        for c, cen, body in zip(members, by_centroid, by_body, strict=True):
            if not (cen and body):
                failures.append((c, " and ".join(r for r, ok in (("centroid", cen), ("body", body)) if not ok)))
    together = None
    if cell_groups["captures"]:
        n = cell_groups["captures"]
        together = {"captures": n, **{k: v / n for k, v in cell_groups.items() if k != "captures"}}

    if as_json:
        result: dict = {
            "radius": radius,
            "detector": detector,
            "cell_diameter": cell_diameter,
            "half": half,
            "groups": summary,
            "cell_groups_together": together,
        }
        if verbose:
            result["failures"] = [
                {"group": c.group, "image": c.name, "fails": why, "centroid_px": c.centroid_px, "body_px": c.body_px}
                for c, why in failures
            ]
        click.echo(json.dumps(result, indent=2))
        return
    if verbose:
        for c, why in failures:
            centroid = ", ".join(f"{d:.0f}" for d in c.centroid_px)
            body = ", ".join(f"{d:.0f}" for d in c.body_px)
            found = f"cells at {centroid} px (body {body} px)" if c.centroid_px else "no cell found"
            click.echo(f"{c.group}/{c.name}: fails {why}; {found}")
    rows = list(summary.items()) + ([("all cell groups", together)] if together and len(summary) > 1 else [])
    for group, figures in rows:
        if "no_central_cell" in figures:
            click.echo(
                f"{group:15s} {figures['captures']:5d} captures  no cell within {radius:g} px (body) "
                f"{figures['no_central_cell']:.4f}"
            )
        else:
            click.echo(
                f"{group:15s} {figures['captures']:5d} captures  one cell within {radius:g} px: "
                f"centroid {figures['one_central_centroid']:.4f}  body {figures['one_central_body']:.4f}"
            )
