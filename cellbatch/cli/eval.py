"""``cellbatch eval``: measure stages against ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cellbatch.cli.options import cell_diameter_option, detector_option, json_option


@click.group("eval")
def eval_() -> None:
    """Measure detection against ground-truth boxes."""


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
    from cellbatch.detect.base import DetectSettings
    from cellbatch.errors import InputNotFoundError
    from cellbatch.evaluate import evaluate_detector, load_boxes
    from cellbatch.read import is_image_file, iter_image_files
    from cellbatch.registry import detectors

    if not src.exists():
        raise InputNotFoundError(f"input {src} does not exist: pass a folder of captures or one capture file")
    images = [src] if src.is_file() and is_image_file(src) else list(iter_image_files(src))
    if not images:
        raise InputNotFoundError(f"no capture files (.png, .jpg, .tif, .bmp) under {src}")
    truth = load_boxes(boxes)
    find = detectors.get(detector)(DetectSettings(cell_diameter=cell_diameter))
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
