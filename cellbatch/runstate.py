"""``OUT/run.json``: the state of an output folder, not of the last invocation (contract: docs/run-state.md).

Each slide is reported as it stands in OUT. A slide a rerun skips keeps what its committed
``provenance.json`` says (cells, failed captures, agreement and QC outcome), so a failure or a QC
failure shows every night until its cause is fixed or ``--force`` redoes the slide. The run's
``state`` moves ``running`` -> ``finished`` or ``interrupted``; while running or after an interrupt,
``pending`` lists the slides still to do. The exit code follows one rule, :func:`exit_code_for`, used by
``cellbatch run`` and ``cellbatch check`` alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellbatch import __version__
from cellbatch.atomic import write_json_atomic
from cellbatch.errors import ExitCode
from cellbatch.safepath import output_errors

RUNNING, INTERRUPTED, FINISHED = "running", "interrupted", "finished"
SKIP_REASON = "output complete and inputs, model and settings unchanged (use --force to redo)"


def exit_code_for(slides: Iterable[Mapping[str, Any]]) -> int:
    """The exit code of an output folder from its slide entries (``run.json`` ``slides``).

    4 when a slide failed or has failed captures, else 5 when a slide is below the QC gate (its
    status ``qc_failed``, or a skipped slide whose committed check failed QC), else 0.
    """
    slides = list(slides)
    if any(s.get("status") == "failed" or s.get("failed_captures") for s in slides):
        return ExitCode.INPUTS_FAILED
    if any(s.get("status") == "qc_failed" or (s.get("check") or {}).get("qc_failed") for s in slides):
        return ExitCode.QC_FAILED
    return ExitCode.OK


@dataclass
class SlideReport:
    """One slide's entry in ``run.json``."""

    name: str
    status: str  # done | failed | skipped | qc_failed
    captures: int = 0
    failed_captures: int = 0
    cells: int = 0
    reason: str = ""
    output: str = ""
    check: dict[str, Any] | None = None

    @classmethod
    def skipped(cls, name: str, output: Path, provenance: Mapping[str, Any]) -> tuple[SlideReport, list[dict]]:
        """A skipped slide as its committed ``provenance`` describes it, with its capture failures."""
        failures = [dict(f) for f in provenance.get("failures") or []]
        report = cls(
            name=name, status="skipped", captures=len(provenance.get("inputs") or []),
            failed_captures=len(failures), cells=int(provenance.get("cells") or 0),
            reason=SKIP_REASON, output=str(output), check=provenance.get("check"),
        )
        return report, failures


@dataclass
class RunReport:
    """What ``run.json`` and ``--json`` say about OUT."""

    out: Path
    command: list[str]
    started: str
    slides: list[SlideReport] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    generation: str = "skipped (no --model)"
    finished: str | None = None
    min_agreement: float | None = None
    state: str = RUNNING
    listed: list[str] = field(default_factory=list)  # every slide name of the run, in order
    _saved_at: float = field(default=0.0, repr=False)

    @property
    def exit_code(self) -> int:
        return exit_code_for(asdict(s) for s in self.slides)

    @property
    def pending(self) -> list[str]:
        """The listed slides not yet done, skipped or failed."""
        reported = {s.name for s in self.slides}
        return [name for name in self.listed if name not in reported]

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for s in self.slides:
            counts[s.status] = counts.get(s.status, 0) + 1
        return {
            "cellbatch_version": __version__,
            "command": self.command,
            "out": str(self.out),
            "state": self.state,
            "started": self.started,
            "finished": self.finished,
            "exit_code": int(self.exit_code),
            "generation": self.generation,
            "slides_by_status": counts,
            "pending": self.pending,
            "captures": sum(s.captures for s in self.slides),
            "failed_captures": sum(s.failed_captures for s in self.slides),
            "cells": sum(s.cells for s in self.slides),
            "notes": self.notes,
            "slides": [asdict(s) for s in self.slides],
            "failures": self.failures,
            "check": self.check_summary(),
        }

    def check_summary(self) -> dict[str, Any] | None:
        """Run-level agreement over the checked slides (``None`` when no slide was checked)."""
        checked = {s.name: s.check for s in self.slides if s.check}
        if not checked:
            return None
        from cellbatch.check.agreement import summarise_run

        return summarise_run(checked, min_agreement=self.min_agreement)

    def save(self, *, every: float = 0.0) -> None:
        """Write ``run.json``; with ``every``, only if the last write is that many seconds old.

        Rewriting it after each of thousands of slides would cost quadratic time, yet a killed run
        should leave a recent one behind.
        """
        now = time.monotonic()
        if every and now - self._saved_at < every:
            return
        with output_errors(self.out / "run.json", doing="write"):
            write_json_atomic(self.out / "run.json", self.to_dict())
        self._saved_at = now

    def finish(self, state: str, finished: str) -> None:
        """Mark the run ``finished`` or ``interrupted`` and write ``run.json`` now."""
        self.state, self.finished = state, finished
        self.save()

    def interrupt_message(self) -> str:
        """What an interrupted run tells the person who stopped it."""
        committed = sum(1 for s in self.slides if s.status in ("done", "qc_failed"))
        return (
            f"interrupted: {committed} slide(s) committed this run, {len(self.slides)} of {len(self.listed)} "
            f"reported, {len(self.pending)} still to do (listed in {self.out / 'run.json'}); "
            "rerun the same command to resume"
        )


def read_provenance(slide_dir: Path) -> dict[str, Any] | None:
    """A slide folder's committed ``provenance.json``, or ``None`` when it is missing or unreadable."""
    try:
        data = json.loads((slide_dir / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
