"""Write one slide's results: cells.csv, cells.zarr, provenance.json (contract: README "Output layout").

Everything goes to a hidden staging folder inside OUT and is renamed into place when the slide is
complete, so a slide folder appears whole or not at all, even when the process is killed. Crops are
appended in fixed chunks so memory stays bounded however many cells a slide has.
"""

from __future__ import annotations

import csv
import os
import queue
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cellbatch.atomic import signals_deferred, write_json_atomic
from cellbatch.errors import OutputError

STAGING_DIR = ".cellbatch-staging"
CELL_COLUMNS = (
    "cell_id", "source", "frame", "x0", "y0", "x1", "y1", "cx", "cy",
    "area_px", "nucleus_area_px", "edge",
)
CHECK_COLUMNS = ("class_input", "class_output", "class_reference", "p_output", "agree")
_STAGING_LABEL_BYTES = 64
# Chunks written per call: zarr compresses the chunks of one write concurrently (zstd releases the
# GIL), so the writer keeps up with a fast generator instead of compressing one chunk at a time.
WRITE_CHUNKS = 4
# What a slide folder holds of its own; anything else in it belongs to a nested slide.
SLIDE_FILES = frozenset({"cells.csv", "cells.zarr", "provenance.json", "confusion.csv", "confusion.png"})


def format_value(value: Any) -> Any:
    """CSV cell text: fixed 2-decimal floats so reruns are byte-identical, empty for missing values."""
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, float | np.floating):
        return f"{float(value):.2f}" if np.isfinite(value) else ""
    return value


class SlideWriter:
    """Stream one slide's cells into a staging folder, then :meth:`commit` it into place.

    Parameters
    ----------
    final_dir
        The slide's output folder (``OUT/<slide name>``), from :func:`cellbatch.safepath.output_dir_for`.
    out_root
        OUT; the staging folder lives inside it so the final rename stays on one file system.
    arrays
        Names of the (N, S, S, ...) uint8 arrays to write in ``cells.zarr``, with their per-cell shape.
    columns
        The ``cells.csv`` header.
    """

    def __init__(
        self,
        final_dir: Path,
        *,
        out_root: Path,
        arrays: dict[str, tuple[int, ...]],
        columns: tuple[str, ...],
        chunk: int = 16,
    ) -> None:
        import zarr

        self.final_dir = final_dir
        self.out_root = out_root
        # The slide's name only helps a person reading the staging folder: cut it, so a name near the
        # 255-byte limit still leaves room for the suffix that keeps concurrent stagings apart.
        label = final_dir.name.encode("utf-8")[:_STAGING_LABEL_BYTES].decode("utf-8", "ignore")
        self.staging = _staging_root(out_root) / f"{label}-{uuid.uuid4().hex[:12]}"
        self.staging.mkdir()
        self.columns = columns
        self.chunk = chunk
        self.count = 0  # cells added so far, whether or not the writer thread has written them yet
        self._written = 0
        self._csv_file = open(_create_new(self.staging / "cells.csv"), "w", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=list(columns), extrasaction="ignore")
        self._csv.writeheader()
        from zarr.codecs import ZstdCodec

        group = zarr.open_group(str(self.staging / "cells.zarr"), mode="w", zarr_format=3)
        # zstd level 1, not zarr's default 3: crops are noisy images that compress 1.39x instead of
        # 1.49x, at an eighth of the cost (0.5 against 3.9 ms per cell, measured by
        # benchmarks/bench_cpu_stage.py's consumer figures), which keeps the writer beside inference.
        # write_empty_chunks: zarr otherwise compares every chunk with the fill value before writing
        # it, 40 % of the writer's CPU time, to skip chunks that crops never leave all zero.
        self._arrays = {
            name: group.create_array(name, shape=(0, *shape), chunks=(chunk, *shape), dtype="uint8",
                                     compressors=ZstdCodec(level=1), config={"write_empty_chunks": True})
            for name, shape in arrays.items()
        }
        self._pending: dict[str, list[np.ndarray]] = {name: [] for name in arrays}
        self._pending_count = 0
        # Compressing and writing chunks runs in its own thread, overlapping the next batch's
        # inference; the bounded queue keeps memory flat when the disk is the slower side.
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=f"write {final_dir.name}", daemon=True)
        self._thread.start()

    @property
    def folder(self) -> Path:
        """Where files that belong beside the slide's results are written before the commit."""
        return self.staging

    def add(self, rows: list[dict[str, Any]], arrays: dict[str, np.ndarray]) -> None:
        """Append cells: ``rows`` get consecutive ``cell_id`` values; ``arrays`` hold one row per cell.

        The write happens in the background; an error it meets is raised here or by :meth:`commit`.
        """
        self._raise_pending_error()
        self.count += len(rows)
        self._queue.put((rows, arrays))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # handed to the caller's thread by _raise_pending_error
                    self._error = exc

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _finish_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _write(self, rows: list[dict[str, Any]], arrays: dict[str, np.ndarray]) -> None:
        for row in rows:
            row["cell_id"] = self._written
            self._written += 1
            self._csv.writerow({k: format_value(row.get(k)) for k in self.columns})
        for name, data in arrays.items():
            self._pending[name].append(np.asarray(data, dtype=np.uint8))
        self._pending_count += len(rows)
        if self._pending_count >= WRITE_CHUNKS * self.chunk:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        # Write whole chunks only, so each chunk file is written exactly once (byte-identical reruns).
        if not self._pending_count:
            return
        stacked = {name: np.concatenate(parts) for name, parts in self._pending.items() if parts}
        n_write = self._pending_count if final else (self._pending_count // self.chunk) * self.chunk
        for name, data in stacked.items():
            arr = self._arrays[name]
            start = arr.shape[0]
            arr.resize((start + n_write, *arr.shape[1:]))
            arr[start : start + n_write] = data[:n_write]
            self._pending[name] = [data[n_write:]] if n_write < len(data) else []
        self._pending_count -= n_write

    def commit(self, provenance: dict[str, Any]) -> Path:
        """Finish the files and move the slide folder into place (replacing an older result).

        A ``cells`` entry of ``provenance`` is written as the number of cells written.
        """
        self._finish_thread()
        self._raise_pending_error()
        self._flush(final=True)
        self._csv_file.flush()
        os.fsync(self._csv_file.fileno())
        self._csv_file.close()
        if "cells" in provenance:  # the count is final only now that the background writer is done
            provenance = {**provenance, "cells": self.count}
        write_json_atomic(self.staging / "provenance.json", provenance)
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        old = None
        # Ctrl-C or SIGTERM between the renames would leave the old result in staging, where the next
        # run deletes it: the signal waits until both renames (and the nested slides' moves) are done.
        with signals_deferred():
            if self.final_dir.exists():
                old = self.out_root / STAGING_DIR / f"old-{uuid.uuid4().hex[:12]}"
                os.rename(self.final_dir, old)
            os.rename(self.staging, self.final_dir)
            if old is not None:
                keep_nested_slides(old, self.final_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final_dir

    def abort(self) -> None:
        """Drop the staging folder (the slide failed); an existing older result is left alone."""
        self._finish_thread()
        if not self._csv_file.closed:
            self._csv_file.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def keep_nested_slides(old: Path, new: Path) -> None:
    """Move what is not this slide's own (the folders of nested slides, ``a/b`` inside ``a``) from the
    replaced folder into the new one, so redoing slide ``a`` never loses slide ``a/b``'s results."""
    for entry in old.iterdir():
        if entry.name not in SLIDE_FILES and not (new / entry.name).exists():
            os.rename(entry, new / entry.name)


def _staging_root(out_root: Path) -> Path:
    """OUT's staging folder, made if missing; a symlink there is refused (see :func:`clear_staging`)."""
    root = out_root / STAGING_DIR
    if root.is_symlink():
        raise OutputError(f"{root} is a symlink; cellbatch never follows links in OUT: remove it")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _create_new(path: Path) -> int:
    """A descriptor for a new file at ``path``; an existing file or a link planted there is an error."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def clear_staging(out_root: Path) -> None:
    """Remove the staging folder with what killed runs left in it (called under the run lock).

    A symlink planted at its name is removed, never followed: slides are staged, and replaced
    results deleted, only inside a real folder of OUT (made again by the next :class:`SlideWriter`).
    """
    staging = out_root / STAGING_DIR
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        staging.unlink()
    else:
        shutil.rmtree(staging, ignore_errors=True)
