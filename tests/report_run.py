"""One small real run with everything a report shows, for the report, export and browser tests.

Two good slides and one whose only capture is broken, a generator that swaps red and blue in every
other crop of a batch (so about half the cells disagree), a normaliser that darkens (so every picture
column differs), the mean-colour classifier, paired references and a QC gate the slides miss: done,
qc_failed and failed slides, a failed capture, disagreeing cells and every picture column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cellbatch.registry import detectors, normalisers
from tests.models import save_generator
from tests.scenes import DarkBlobDetector, write_slides
from tests.test_check_agreement import save_classifier

SLIDES = {"day1/slideA": 4, "day1/slideB": 3}
MIN_AGREEMENT = 0.6


class SwapEveryOther(torch.nn.Module):
    """Swap red and blue in the even crops of each batch: a generator that breaks some cells."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        even = (torch.arange(x.shape[0], device=x.device) % 2 == 0).view(-1, 1, 1, 1)
        return torch.where(even, x.flip(1), x)


class Darken:
    """A normaliser that keeps each crop's dominant colour (and so its class) but changes every pixel."""

    name = "darken"

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        return (crops.astype(np.uint16) * 3 // 4).astype(np.uint8)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name}


@dataclass(frozen=True)
class ReportRun:
    out: Path
    command: list[str]
    exit_code: int


def make_report_run(root: Path) -> ReportRun:
    """Write inputs, references and models under ``root`` and run ``cellbatch run ... --report`` once."""
    from cellbatch.cli import main

    detectors.register("blobs", DarkBlobDetector)
    normalisers.register("darken", Darken)
    write_slides(root / "in", slides=SLIDES, seed=4)
    write_slides(root / "ref", slides=SLIDES, seed=4)  # the same scenes: the paired "DM96" captures
    (root / "in" / "day1" / "slideB" / "capture_009.png").write_text("not an image")
    (root / "in" / "day2" / "broken").mkdir(parents=True)
    (root / "in" / "day2" / "broken" / "capture_000.png").write_bytes(b"")
    generator = save_generator(SwapEveryOther(), root / "swap.pt")
    classifier = save_classifier(root / "clf.pt")
    command = ["run", str(root / "in"), "-o", str(root / "out"), "--model", str(generator),
               "--normalise", "darken", "--classifier", str(classifier), "--reference", str(root / "ref"),
               "--min-agreement", str(MIN_AGREEMENT), "--detector", "blobs", "--cell-diameter", "60",
               "--batch-size", "4", "--device", "cpu", "--quiet", "--report"]
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    return ReportRun(out=root / "out", command=command, exit_code=int(exit_info.value.code))
