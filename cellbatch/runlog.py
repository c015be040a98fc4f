"""``OUT/run.log``: what the terminal shows, plus warnings and per-slide timings, through ``logging``.

Everything is logged to the ``cellbatch`` logger, so a library user routes it like any other
(``logging.getLogger("cellbatch").addHandler(...)``). During a run, :func:`run_log` adds a handler that
appends to ``OUT/run.log`` (one block per run, so the file is the folder's history) and lowers the
logger's level to INFO if it was not set; both are undone when the run ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOG_NAME = "run.log"
logger = logging.getLogger("cellbatch")


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging API)
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", self.converter(record.created))


@contextmanager
def run_log(out: Path) -> Iterator[logging.Logger]:
    """Append the ``cellbatch`` logger's records (INFO and up) to ``out/run.log`` while the block runs."""
    handler = logging.FileHandler(Path(out) / LOG_NAME, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(_UTCFormatter("%(asctime)s %(levelname)s %(message)s"))
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger
    except BaseException as exc:
        logger.error("run stopped: %s", str(exc) or type(exc).__name__)
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The run summary the terminal shows at the end (and run.log records): counts, then failures."""
    by_status = summary["slides_by_status"]
    parts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items())) or "no slides"
    lines = [
        f"{len(summary['slides'])} slide(s): {parts}; {summary['captures']} captures, {summary['cells']} cells, "
        f"{summary['failed_captures']} failed captures",
        f"generation {summary['generation']}; results in {summary['out']} (see run.json)",
    ]
    return lines


def failure_lines(summary: dict[str, Any], *, limit: int | None = None) -> list[str]:
    """One line per failure (slide or capture), the first ``limit`` of them and how many more."""
    failures = summary["failures"]
    shown = failures if limit is None else failures[:limit]
    lines = [f"failed: {f.get('slide')}: {f.get('reason')}" for f in shown]
    if len(failures) > len(shown):
        lines.append(f"... and {len(failures) - len(shown)} more in run.json")
    return lines


class SlideTimes:
    """Logs each slide as it finishes, with its share of the run's wall time.

    Slides finish one after another in the consumer (extraction of later slides overlaps, but a slide
    is written only after the one before it), so the time between two slides finishing is the time
    the run spent on the second. The clock is read when the progress callback reports the slide done.
    """

    def __init__(self, slides: list[Any]) -> None:
        self._slides = slides  # the run report's list, filled as slides finish
        self._done_at: list[float] = []
        self._logged = 0
        self._last = time.monotonic()

    def wrap(self, on_progress: Callable[[int, int, int], None]) -> Callable[[int, int, int], None]:
        def progress(captures: int, cells: int, slides: int) -> None:
            on_progress(captures, cells, slides)
            now = time.monotonic()
            self._done_at.extend([now] * slides)
            self.flush()

        return progress

    def flush(self) -> None:
        """Log every finished slide whose report entry exists."""
        while self._logged < min(len(self._slides), len(self._done_at)):
            entry, done_at = self._slides[self._logged], self._done_at[self._logged]
            seconds, self._last = done_at - self._last, done_at
            detail = f": {entry.reason}" if entry.status == "failed" else ""
            logger.log(logging.WARNING if entry.status in ("failed", "qc_failed") else logging.INFO,
                       "slide %s: %s, %d captures (%d failed), %d cells, %.2f s%s", entry.name, entry.status,
                       entry.captures, entry.failed_captures, entry.cells, seconds, detail)
            self._logged += 1
