"""``cellbatch classifier train``: train the small reference classifier used by the agreement check."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from cellbatch.cli.options import (
    Group,
    device_option,
    json_option,
    model_formats_option,
    quiet_option,
    threads_option,
    use_threads,
)


@click.group(cls=Group)
def classifier() -> None:
    """Train a reference white-cell classifier (for --classifier of run and check)."""


@classifier.command()
@click.argument("data_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the TorchScript classifier (.pt; .onnx beside it) with its cellbatch.json.",
)
@model_formats_option(help="Which files to write; each carries cellbatch.json and the self-test, with MODEL.md beside.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.2,
    show_default=True,
    help="Fraction of each class held out to measure accuracy (stored in the file's metadata).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@threads_option
@json_option
@quiet_option
def train(
    data_dir: Path,
    out_path: Path,
    epochs: int,
    batch_size: int,
    lr: float,
    val_fraction: float,
    seed: int,
    formats: str,
    device: str,
    threads: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Train a small CNN on DIR, one sub-folder of images per class (such as the PBC set).

    Images are centre-cropped to 256x256 at their native scale (as the run crops a centred cell); the
    exported model takes (N, 3, 256, 256) RGB in [0, 1] and names its classes, so `cellbatch run
    --classifier` and `cellbatch check --classifier` need no --classes.
    """
    from dataclasses import asdict

    from cellbatch.cli.model import card_beside, format_list

    use_threads(threads, command="classifier", device=device)
    from cellbatch.generate import resolve_device
    from cellbatch.models.classifier import TrainSettings, export_classifier, image_folder, train_classifier

    device = resolve_device(device)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction, seed=seed)
    files, labels, classes = image_folder(data_dir)
    log = None if quiet or as_json else (lambda line: click.echo(line, err=True))
    started = time.perf_counter()
    result = train_classifier(files, labels, classes=classes, settings=settings, device=device, log=log)
    seconds = time.perf_counter() - started
    report = {
        "classes": result.classes,
        "heldout_accuracy": result.heldout_accuracy,
        "heldout_per_class_accuracy": result.per_class_accuracy,
        "heldout_images": result.n_heldout,
        "train_images": result.n_train,
        "training": {
            **asdict(settings),
            "data": str(data_dir),
            "device": device,
            "seconds": round(seconds, 1),
        },
    }
    files = export_classifier(
        result.net,
        out_path,
        classes=result.classes,
        extra={k: v for k, v in report.items() if k != "classes"},
        formats=format_list(formats),
    )
    card_beside(files)
    if as_json:
        written = {k: str(v) for k, v in files.items()}
        click.echo(json.dumps({"out": str(out_path), "files": written, **report}, indent=2))
    else:
        accuracy = "n/a (nothing held out)" if result.heldout_accuracy is None else f"{result.heldout_accuracy:.1%}"
        click.echo(
            f"{out_path}: {len(classes)} classes, trained on {result.n_train} images in {seconds:.0f} s, "
            f"held-out accuracy {accuracy} on {result.n_heldout} images"
        )
