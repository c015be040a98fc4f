"""``cellbatch check OUT``: re-check an existing output with a classifier; the generator does not run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cellbatch.cli.options import (
    Command,
    agreement_options,
    cell_diameter_option,
    detector_option,
    device_option,
    json_option,
)


@click.command(cls=Command)
@click.argument("out_dir", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--classifier",
    "classifier_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="CLF.pt",
    help="Classifier file (.pt or .onnx), (N, 3, 256, 256) RGB in, logits out (`cellbatch classifier train`).",
)
@agreement_options
@detector_option
@cell_diameter_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Crops per classifier call.",
)
@device_option
@json_option
def check(
    out_dir: Path,
    classifier_path: Path,
    classes: str | None,
    reference: Path | None,
    detector: str,
    cell_diameter: float,
    min_agreement: float | None,
    min_confidence: float,
    max_unsure: float,
    batch_size: int,
    device: str,
    as_json: bool,
) -> None:
    """Classify the input, output and reference crop of every cell in OUT and report agreement.

    Rewrites the class_* / p_output / agree columns of each slide's cells.csv, its confusion.csv and
    confusion.png, and the check figures in provenance.json and OUT/run.json. The figures equal those
    of `cellbatch run --classifier` with the same options. Exit codes as for `run` (OUT's state after
    the check): 0, 2 bad command line, 3 could not run, 4 some captures or slides in OUT failed,
    5 some slides below --min-agreement.
    """
    from cellbatch.check.agreement import AgreementCheck, CheckSettings, load_classifier
    from cellbatch.check.recheck import recheck_output
    from cellbatch.check.reference import ReferenceSource
    from cellbatch.cli import command_line
    from cellbatch.errors import ExitCode
    from cellbatch.generate import resolve_device

    device = resolve_device(device)
    settings = CheckSettings(min_confidence=min_confidence, min_agreement=min_agreement, max_unsure=max_unsure,
                             batch_size=batch_size)
    model = load_classifier(classifier_path, classes=classes.split(",") if classes else None, device=device)
    source = None
    if reference is not None:
        source = ReferenceSource(reference, detector=detector, cell_diameter=cell_diameter)
    agreement = AgreementCheck(model, settings=settings, reference=source, device=device)
    result = recheck_output(out_dir, agreement, command=command_line())

    for warning in result["warnings"]:
        click.echo(f"cellbatch: warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for name, summary in result["slides_checked"].items():
            click.echo(_line(name, summary))
        click.echo(_line(f"all {result['slides']} slide(s)", result))
    if result["qc_failed"]:
        click.echo(
            f"cellbatch: {len(result['qc_failed_slides'])} slide(s) below --min-agreement {min_agreement}: "
            + ", ".join(result["qc_failed_slides"]),
            err=True,
        )
    if result["exit_code"] != ExitCode.OK:
        # OUT's exit code, as `run` gives it (failed inputs 4 before QC 5). sys.exit, not click's Exit:
        # the entry point runs click with standalone_mode=False, which returns an Exit's code instead.
        sys.exit(result["exit_code"])


def _line(name: str, summary: dict) -> str:
    rate = "n/a" if summary["agreement"] is None else f"{summary['agreement']:.1%}"
    flag = "  QC FAILED" if summary["qc_failed"] else ""
    return (
        f"{name}: agreement {rate} ({summary['agreeing']}/{summary['checked']} checked, "
        f"{summary['unsure']} unsure, {summary['no_reference']} without reference, "
        f"{summary['cells']} cells){flag}"
    )
