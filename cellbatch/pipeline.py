"""The whole run: slides in, converted cells and provenance out.

    discover slides -> plan each (skip if unchanged) -> extract chunks as Dask tasks (read, hash, detect, crop)
      -> generate in batches -> normalise -> agreement check -> write (atomic per slide)

Extraction futures are kept a fixed number ahead of the consumer across slide boundaries, so the
CPU stages overlap inference and memory stays bounded however many captures there are. A model is
loaded once, in this process, which also owns the GPU.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellbatch import __version__
from cellbatch.cluster import gather_or_lost, result_or_lost
from cellbatch.errors import CellbatchError, ClusterLostError, ExitCode, InputFormatError, ModelError
from cellbatch.extract import CaptureRef, CaptureResult, ExtractSettings, capture_refs, extract_chunk, hash_captures
from cellbatch.provenance import content_key, environment, utc_now
from cellbatch.read import (
    Slide,
    absent_frames,
    discover_slides,
    display_path,
    slide_fingerprint,
    slide_frame_count,
    validate_slide,
)
from cellbatch.runstate import RunReport, SlideReport, read_provenance
from cellbatch.safepath import output_clashes, output_dir_for, output_errors
from cellbatch.stages import Download, Stage, Transfer, is_out_of_memory, run_stages
from cellbatch.write import CELL_COLUMNS, CHECK_COLUMNS, SlideWriter

if TYPE_CHECKING:
    from cellbatch.check.agreement import AgreementCheck


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs besides its inputs and output folder."""

    extract: ExtractSettings = field(default_factory=ExtractSettings)
    batch_size: int = 16
    # captures per extraction task: 8 against 4 cut the Dask round trips in half; whole 400-capture runs
    # with the generator took 12.2-14.7 s against 14.1-15.9 (alternated, 2-core machine; 16: 12.9-15.5)
    chunk_captures: int = 8
    device: str = "cpu"
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16 (cellbatch.precision)
    normalise: tuple[str, ...] = ()
    force: bool = False
    scheduler: str | None = None
    workers: int | None = None
    processes: int = 0
    threads: int | None = None  # cores the run's thread budget shared out (cellbatch.threads)
    stage_threads: int = 1  # threads applying the device stages to batches on a CPU (cellbatch.threads)
    torch_threads: int | None = None  # torch threads in each of them

    def key_parameters(self) -> dict[str, Any]:
        """The settings that change a slide's bytes (device and scheduling do not, on CPU)."""
        return {"extract": asdict(self.extract), "normalise": list(self.normalise), "precision": self.precision}


@dataclass
class SlidePlan:
    """One slide and what the run will do with it; its inputs' hashes arrive with its extraction results."""

    slide: Slide
    name: str  # the output name: relative path below OUT
    out_dir: Path | None = None  # None when the name maps to no safe folder inside OUT
    refs: list[CaptureRef] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    key: str = ""
    key_settings: dict[str, Any] = field(default_factory=dict)  # content_key's arguments besides the inputs
    fingerprint: str | None = None  # stat digest of the slide's files, taken before any is decoded
    action: str = "run"  # run | skip | fail
    reason: str = ""
    committed: dict[str, Any] | None = None  # the provenance of the output a skip keeps

    def chunks(self, size: int) -> list[list[CaptureRef]]:
        todo = [r for r, i in zip(self.refs, self.inputs, strict=True) if "error" not in i]
        return [todo[i : i + size] for i in range(0, len(todo), size)]


def slide_names(sources: list[Path], *, exclude: tuple[Path, ...] = ()) -> Iterator[tuple[Slide, str]]:
    """Every slide of every SRC with its output name.

    One SRC: names are paths relative to it (a SRC that is itself a slide is named after its folder
    or store). Several SRC: each name is prefixed by its SRC's name, numbered when two SRC share one.
    """
    prefixes = source_prefixes(sources) if len(sources) > 1 else [""] * len(sources)
    for src, prefix in zip(sources, prefixes, strict=True):
        for slide in discover_slides(src, exclude=exclude):
            name = slide.name if slide.name != "." else (src.resolve().name or "input")
            if prefix and slide.name != ".":
                name = f"{prefix}/{name}"
            elif prefix:
                name = prefix
            yield slide, name


def source_prefixes(sources: list[Path]) -> list[str]:
    """Distinct name prefixes for several SRC: the folder's name, and ``name-2``, ``name-3``, ... for
    later SRC of the same name, skipping numbers that another SRC is itself called (``x/a y/a z/a-2``
    gives ``a``, ``a-3``, ``a-2``)."""
    bases = [src.resolve().name or "input" for src in sources]
    taken = set(bases)
    prefixes: list[str] = []
    for base in bases:
        if base not in prefixes:
            prefixes.append(base)
            continue
        number = 2
        while f"{base}-{number}" in taken:
            number += 1
        taken.add(f"{base}-{number}")
        prefixes.append(f"{base}-{number}")
    return prefixes


HashMap = Callable[[list[list[CaptureRef]]], list[list[dict[str, Any]]] | None]


def plan_slide(
    slide: Slide,
    name: str,
    out: Path,
    settings: RunSettings,
    key_extra: dict[str, Any],
    *,
    hash_map: HashMap | None = None,
) -> SlidePlan:
    """Decide for one slide: run it, skip it (output complete and unchanged), or fail it.

    Captures are hashed where they are decoded, in the extraction tasks, so nothing is read twice
    and provenance names the bytes actually used. A skip is decided without reading a capture when
    the slide's stat fingerprint equals the one its committed output recorded; only when it differs
    (inputs copied, touched or changed) are the captures hashed here, by ``hash_map`` (parallel Dask
    tasks in a run; by default here, in order), to compare their content.
    """
    plan = SlidePlan(slide=slide, name=name, key_settings={"parameters": settings.key_parameters(), **key_extra})
    try:
        plan.out_dir = output_dir_for(out, name)
        validate_slide(slide)
        plan.fingerprint = slide_fingerprint(slide)
        plan.refs = capture_refs(slide)
        absent = absent_frames(slide) if slide.kind == "zarr" else []
    except CellbatchError as exc:
        plan.action, plan.reason = "fail", str(exc)
        return plan
    plan.inputs = [{"path": r.source, "frame": r.frame, "source": r.source} for r in plan.refs]
    _fail_absent_frames(plan, absent)
    if not settings.force:
        plan.key = _key_if_unchanged(plan, hash_map or _hash_here)
        plan.committed = _current_output(plan) if plan.key else None
        if plan.committed is not None:
            plan.action = "skip"
    return plan


HASH_CHUNK = 16


def _fail_absent_frames(plan: SlidePlan, absent: list[int]) -> None:
    """Fail the frames whose chunks are absent before any task reads them: one failure per run of frames.

    10^5 missing frames are one line in run.json, not 10^5 (which made a 21 MB run.json).
    """
    for frame in absent:
        plan.inputs[frame]["error"] = "absent from the store"
    start = 0
    while start < len(absent):
        end = start
        while end + 1 < len(absent) and absent[end + 1] == absent[end] + 1:
            end += 1
        first, last = absent[start], absent[end]
        frames = f"frame {first}" if first == last else f"frames {first}-{last} ({last - first + 1} frames)"
        plan.failures.append({
            "path": plan.refs[first].source, "frame": first, "count": last - first + 1,
            "reason": f"{plan.refs[first].source}: {frames} missing: their chunks are absent from the store "
                      "(copy incomplete?)",
        })
        start = end + 1


def failed_capture_count(failures: list[dict[str, Any]]) -> int:
    """Captures behind a slide's failures (one failure may stand for a run of missing frames)."""
    return sum(f.get("count", 1) for f in failures)


def _key_if_unchanged(plan: SlidePlan, hash_map: HashMap) -> str:
    """The slide's content key when it may match its committed output's, else ``""`` (it must run)."""
    try:
        committed = json.loads((plan.out_dir / "provenance.json").read_text())
        recorded = committed["inputs"]
        listed = [(i["path"], i["frame"]) for i in recorded]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if listed != [(r.source, r.frame) for r in plan.refs]:
        return ""  # captures added or removed: no need to read any to know
    if plan.fingerprint is not None and committed.get("input_fingerprint") == plan.fingerprint:
        inputs = [{"source": i["path"], "frame": i["frame"], "sha256": i.get("sha256")} for i in recorded]
    else:
        chunks = [plan.refs[i : i + HASH_CHUNK] for i in range(0, len(plan.refs), HASH_CHUNK)]
        hashed = hash_map(chunks)
        if hashed is None:
            return ""
        inputs = [entry for chunk in hashed for entry in chunk]
    return content_key(inputs=inputs, **plan.key_settings)


def _hash_here(chunks: list[list[CaptureRef]]) -> list[list[dict[str, Any]]]:
    return [hash_captures(refs) for refs in chunks]


def dask_hash_map(client: Any) -> HashMap:
    """Hash chunks of captures as parallel Dask tasks, results in order; ``None`` if a task is lost."""

    def hash_map(chunks: list[list[CaptureRef]]) -> list[list[dict[str, Any]]] | None:
        futures = [client.submit(hash_captures, refs, pure=False) for refs in chunks]
        try:
            return gather_or_lost(client, futures)
        except ClusterLostError:
            client.cancel(futures)
            raise
        except Exception:  # a lost worker (KilledWorker): redo the slide rather than guess it unchanged
            client.cancel(futures)
            return None

    return hash_map


def _current_output(plan: SlidePlan) -> dict[str, Any] | None:
    """The provenance of the slide's committed output when it is complete, its key is this plan's, and
    it is this slide's (not another's with the same inputs)."""
    if not ((plan.out_dir / "cells.csv").is_file() and (plan.out_dir / "cells.zarr").is_dir()):
        return None
    provenance = read_provenance(plan.out_dir)
    if provenance is None or provenance.get("content_key") != plan.key or provenance.get("slide") != plan.name:
        return None
    return provenance


def schedule(
    client: Any, plans: Iterator[SlidePlan], settings: RunSettings, window: int
) -> Iterator[tuple[SlidePlan, int, int, list[CaptureResult]]]:
    """Yield ``(plan, chunk index, chunk count, results)`` in order, ``window`` extraction tasks ahead."""
    def jobs() -> Iterator[tuple[SlidePlan, int, int, list[CaptureRef] | None]]:
        for plan in plans:
            chunks = plan.chunks(settings.chunk_captures) if plan.action == "run" else []
            if not chunks:
                yield plan, 0, 1, None
            for i, refs in enumerate(chunks):
                yield plan, i, len(chunks), refs

    pending: deque = deque()
    for plan, i, n, refs in jobs():
        future = None
        if refs is not None:
            future = client.submit(extract_chunk, refs, settings.extract, pure=False)
        pending.append((plan, i, n, refs, future))
        while len(pending) > window:
            yield _collect(client, *pending.popleft())
    while pending:
        yield _collect(client, *pending.popleft())


def _collect(client: Any, plan: SlidePlan, i: int, n: int, refs: list[CaptureRef] | None, future: Any):
    if future is None:
        return plan, i, n, []
    try:
        return plan, i, n, result_or_lost(client, future)
    except ClusterLostError:
        raise
    except Exception as exc:  # a worker lost or killed: the chunk's captures fail, the run goes on
        reason = f"extraction task failed: {type(exc).__name__}: {exc}"
        return plan, i, n, [CaptureResult(ref=r, error=f"{r.source}: {reason}") for r in refs or []]


@dataclass
class Stages:
    """The loaded per-batch stages: generator, normalisers and agreement check, any of them absent.

    Generator and normalisers are :class:`~cellbatch.stages.Stage` s applied in that order on
    ``device``; the check classifies the input and the last image on the device too. On a CPU
    device with ``threads`` > 1, each batch is computed in one of that many threads, with the
    torch threads ``torch_threads`` each (:func:`cellbatch.threads.thread_budget` decides both), so
    several batches are in flight at once; their results still come back in submission order.
    """

    generator: Stage | None = None
    normalisers: list[Stage] = field(default_factory=list)
    check: AgreementCheck | None = None
    device: str = "cpu"
    max_batch: int | None = None  # set when a batch ran out of device memory
    notes: list[str] = field(default_factory=list)  # for run.json
    threads: int = 1
    torch_threads: int | None = None  # None: torch's own setting, inherited by new threads
    _transfer: Transfer | None = field(default=None, init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _halving: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def ordered(self) -> list[Stage]:
        return ([self.generator] if self.generator is not None else []) + list(self.normalisers)

    def arrays(self, size: int) -> dict[str, tuple[int, ...]]:
        shapes = {"crop": (size, size, 3), "mask": (size, size)}
        for stage in self.ordered():
            shapes[stage.output] = (size, size, 3)
        return shapes

    def columns(self) -> tuple[str, ...]:
        return CELL_COLUMNS + (CHECK_COLUMNS if self.check is not None else ())

    def submit(self, crops: np.ndarray, masks: np.ndarray) -> InFlight:
        """Upload a batch, queue every stage on the device and start the downloads; returns at once on
        CUDA, and on a CPU with stage threads (one of them computes the batch).

        Out of device memory, the batch is halved and retried, and later batches are split to the
        size that fitted (noted in ``notes``): no cell is lost.
        """
        if not self._threaded():
            return InFlight(crops=crops, masks=masks, downloads=self._queue_fitting(crops, masks))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cellbatch-stages",
                                            initializer=_set_torch_threads, initargs=(self.torch_threads,))
        return InFlight(crops=crops, masks=masks, downloads=[Pending(self._pool.submit(self._computed, crops, masks))])

    @property
    def in_flight(self) -> int:
        """Batches to keep submitted before waiting for the oldest: one per stage thread on a CPU; on
        CUDA one (queued on the device while the host writes the one before)."""
        return self.threads if self._threaded() else 1

    def _threaded(self) -> bool:
        return self.threads > 1 and not self.device.startswith("cuda")

    def _computed(self, crops: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        """The batch's arrays on the host, computed in the calling (stage) thread."""
        return joined_arrays([download.wait() for download in self._queue_fitting(crops, masks)])

    def _queue_fitting(self, crops: np.ndarray, masks: np.ndarray) -> list[Download]:
        """Queue the stages on the batch in parts of at most ``max_batch`` crops, halving it when the
        device runs out of memory."""
        if self.max_batch is not None and len(crops) > self.max_batch:
            m = self.max_batch
            return [download for i in range(0, len(crops), m)
                    for download in self._queue_fitting(crops[i : i + m], masks[i : i + m])]
        try:
            return [self._queue(crops, masks)]
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if len(crops) == 1:
                raise ModelError(f"one crop does not fit in the memory of {self.device}: use --device cpu, "
                                 "or a smaller model") from exc
        # retried outside the except block: the failed attempt's tensors go with its traceback
        self._release_memory()
        with self._halving:  # stage threads that ran out at once halve the batch once
            if self.max_batch is None or self.max_batch > len(crops) // 2:
                self.max_batch = len(crops) // 2
                self.notes.append(f"out of memory on {self.device} with a batch of {len(crops)} crops: "
                                  f"halved to {self.max_batch} and retried (no cell lost)")
        return self._queue_fitting(crops, masks)

    def _queue(self, crops: np.ndarray, masks: np.ndarray) -> Download:
        # Made on first use; stage threads (CPU only) may race to make it, harmlessly: a CPU Transfer holds nothing
        if self._transfer is None:
            self._transfer = Transfer(self.device)
        batch = run_stages(self.ordered(), self._transfer.upload(crops, masks))
        downloads = dict(batch.arrays)
        if self.check is not None:
            downloads.update(self.check.score(batch.crops, batch.image))
        return self._transfer.download(downloads)

    def process(self, crops: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        """Every image array of one batch on the host: ``crop``, ``mask`` and each stage's output."""
        return self.submit(crops, masks).arrays()

    def close(self) -> None:
        """Let the stage threads end once their batches are done (a later submit starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def largest_batch(self, crop_size: int, *, limit: int) -> int:
        """The largest power-of-two batch up to ``limit`` that the stages run without running out of memory.

        Tried once, on a synthetic batch, before the first slide (``--batch-size auto`` on CUDA).
        """
        rng = np.random.default_rng(0)
        fits, n = 0, 1
        while n <= limit:
            crops = rng.integers(0, 256, (n, crop_size, crop_size, 3), dtype=np.uint8)
            masks = rng.integers(0, 4, (n, crop_size, crop_size), dtype=np.uint8)
            try:
                self._queue(crops, masks).wait()
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                break
            fits, n = n, 2 * n
        self._release_memory()
        if fits == 0:
            raise ModelError(f"one crop does not fit in the memory of {self.device}: use --device cpu, "
                             "or a smaller model")
        return fits

    def _release_memory(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def joined_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays of one batch from those of its consecutive parts."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _set_torch_threads(threads: int | None) -> None:
    # torch's thread count belongs to the thread that sets it (OpenMP's per-thread setting)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@dataclass
class Pending:
    """A batch's arrays being computed in a stage thread; :meth:`wait` returns them (or raises its error)."""

    future: Future

    def wait(self) -> dict[str, np.ndarray]:
        return self.future.result()


@dataclass
class InFlight:
    """A batch whose device work is queued: its input on the host and its outputs on their way back."""

    crops: np.ndarray
    masks: np.ndarray
    downloads: list[Download | Pending]
    _done: dict[str, np.ndarray] | None = None

    def results(self) -> dict[str, np.ndarray]:
        if self._done is None:
            self._done = joined_arrays([d.wait() for d in self.downloads])
        return self._done

    def arrays(self) -> dict[str, np.ndarray]:
        return {"crop": self.crops, "mask": self.masks,
                **{k: v for k, v in self.results().items() if not k.startswith("p_")}}

    def probabilities(self) -> dict[str, np.ndarray] | None:
        found = {k: v for k, v in self.results().items() if k.startswith("p_")}
        return found or None


class SlideRun:
    """The cells of one slide flowing from extraction results to its writer, in batches.

    A batch is submitted to the device before the previous one is written, so on CUDA the device
    computes one batch while this process writes the last one and gathers the next; on a CPU, the
    stage threads compute their batches while this thread writes the oldest (``Stages.in_flight``).
    """

    def __init__(self, plan: SlidePlan, stages: Stages, settings: RunSettings, out: Path) -> None:
        self.plan = plan
        self.stages = stages
        self.settings = settings
        self.started = utc_now()
        size = settings.extract.crop_size
        self.writer = SlideWriter(plan.out_dir, out_root=out, arrays=stages.arrays(size), columns=stages.columns())
        self.check_state = stages.check.start_slide(plan.name) if stages.check is not None else None
        self.cells_per_input: dict[tuple[str, int], int] = {}
        self.areas: list[int] = []  # each cell's area, to compare with --cell-diameter
        self._inputs = {(entry["source"], entry["frame"]): entry for entry in plan.inputs}
        self.notes: dict[tuple[str, int], list[str]] = {}
        self._rows: list[dict[str, Any]] = []
        self._crops: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._in_flight: deque[tuple[list[dict[str, Any]], InFlight]] = deque()

    def add(self, results: list[CaptureResult]) -> int:
        cells = 0
        for r in results:
            key = (r.ref.source, r.ref.frame)
            if r.sha256 is not None:
                self._inputs[key].update(bytes=r.bytes, sha256=r.sha256)
            if r.error is not None:
                self.plan.failures.append({"path": r.ref.source, "frame": r.ref.frame, "reason": r.error})
                continue
            self.cells_per_input[key] = len(r.rows)
            if r.notes:
                self.notes[key] = r.notes
            self._rows.extend(r.rows)
            self.areas.extend(row["area_px"] for row in r.rows)
            self._crops.extend(r.crops)
            self._masks.extend(r.masks)
            cells += len(r.rows)
            while len(self._rows) >= self.settings.batch_size:
                self._flush(self.settings.batch_size)
        return cells

    def _flush(self, n: int) -> None:
        rows, self._rows = self._rows[:n], self._rows[n:]
        crops, self._crops = np.stack(self._crops[:n]), self._crops[n:]
        masks, self._masks = np.stack(self._masks[:n]), self._masks[n:]
        self._in_flight.append((rows, self.stages.submit(crops, masks)))
        while len(self._in_flight) > self.stages.in_flight:
            self._write(*self._in_flight.popleft())

    def _write(self, rows: list[dict[str, Any]], batch: InFlight) -> None:
        arrays = batch.arrays()
        if self.stages.check is not None:
            output = arrays.get("normalised", arrays.get("generated", batch.crops))
            checked = self.stages.check.check_batch(self.check_state, rows, batch.crops, output,
                                                    probabilities=batch.probabilities())
            for row, extra in zip(rows, checked, strict=True):
                row.update(extra)
        self.writer.add(rows, arrays)

    def commit(self, provenance_base: dict[str, Any]) -> SlideReport:
        if self._rows:
            self._flush(len(self._rows))
        while self._in_flight:
            self._write(*self._in_flight.popleft())
        check = None
        if self.stages.check is not None:
            check = self.stages.check.finish_slide(self.check_state, self.writer.folder)
        self.plan.key = content_key(inputs=self.plan.inputs, **self.plan.key_settings)
        inputs = []
        for entry in self.plan.inputs:
            key = (entry["source"], entry["frame"])
            item = {k: v for k, v in entry.items() if k not in ("source", "error")}
            item["cells"] = self.cells_per_input.get(key)
            if key in self.notes:
                item["notes"] = self.notes[key]
            inputs.append(item)
        provenance = {
            **provenance_base,
            "slide": self.plan.name,
            "content_key": self.plan.key,
            "input_fingerprint": self.plan.fingerprint,
            "cells": self.writer.count,
            "inputs": inputs,
            "failures": self.plan.failures,
            "check": check,
            "started": self.started,
            "finished": utc_now(),
        }
        self.writer.commit(provenance)
        status = "qc_failed" if check and check.get("qc_failed") else "done"
        return SlideReport(
            name=self.plan.name, status=status, captures=len(self.plan.refs),
            failed_captures=failed_capture_count(self.plan.failures), cells=self.writer.count,
            output=str(self.plan.out_dir), check=check,
        )

    def abort(self) -> None:
        self.writer.abort()


def run_slides(
    sources: list[Path],
    out: Path,
    *,
    settings: RunSettings,
    stages: Stages,
    client: Any,
    provenance_base: dict[str, Any],
    key_extra: dict[str, Any],
    report: RunReport,
    on_progress: Callable[[int, int, int], None] = lambda captures, cells, slides: None,
    on_plan: Callable[[int, int], None] = lambda captures, slides: None,
    on_warning: Callable[[str], None] = lambda message: None,
    claims: Any = None,
) -> RunReport:
    """Process every slide of ``sources`` into ``out``; every slide ends done, skipped or failed.

    With ``claims`` (a :class:`cellbatch.shard.SlideClaims`), only the slides of its shard are
    listed, and each is claimed before it is planned; one that another live run holds is skipped.
    """
    # OUT may sit inside a SRC folder: never read our own results back as captures.
    hash_map = dask_hash_map(client)
    # clashes are judged over every slide, whichever shard this run does
    everything = list(slide_names(sources, exclude=(out,)))
    clashes = output_clashes(out, [n for _, n in everything], [_input_label(s) for s, _ in everything])
    listed = [(i, s, n) for i, (s, n) in enumerate(everything) if claims is None or claims.selects(n)]
    report.listed = [n for _, _, n in listed]
    report.save()  # state "running", every slide pending: what a killed run leaves at the least
    on_plan(sum(_capture_count(s) for _, s, _ in listed), len(listed))
    plans = (
        SlidePlan(slide=s, name=n, action="fail", reason=clashes[i]) if i in clashes
        else _claim_and_plan(s, n, out, settings, key_extra, hash_map, claims)
        for i, s, n in listed
    )
    window = 2 * max(1, _worker_threads(client))
    current: SlideRun | None = None
    try:
        for plan, i, n, results in schedule(client, plans, settings, window):
            if plan.action != "run":
                _finish_without_run(plan, report, on_progress)
                _release(claims, plan)
                continue
            if i > 0 and (current is None or current.plan is not plan):
                continue  # the slide already failed on an earlier chunk
            try:
                with output_errors(plan.out_dir, doing="write the results of slide"):
                    if i == 0:
                        current = SlideRun(plan, stages, settings, out)
                        on_progress(failed_capture_count(plan.failures), 0, 0)  # frames failed at planning
                    cells = current.add(results)
                    on_progress(len(results), cells, 0)
                    if i == n - 1:
                        if plan.refs and failed_capture_count(plan.failures) == len(plan.refs):
                            raise InputFormatError(
                                f"every capture of slide {plan.name} failed; see failures in run.json")
                        report.slides.append(current.commit(provenance_base))
                        note = cell_size_note(plan.name, current.areas, settings.extract.cell_diameter,
                                              captures=len(plan.refs) - len(plan.failures))
                        if note is not None:
                            report.notes.append(note)
                            on_warning(note)
                        on_progress(0, 0, 1)
                        report.failures.extend({"slide": plan.name, **f} for f in plan.failures)
                        current = None
                        report.save(every=5.0)
                        _release(claims, plan)
            except CellbatchError as exc:
                if _stops_the_run(exc):
                    raise
                _fail_slide(plan, current, str(exc), report)
                on_progress(0, 0, 1)
                current = None
                _release(claims, plan)
    except CellbatchError:
        # The run stops (full disk, lost cluster, ...): drop the slide in progress, record what is done.
        if current is not None:
            current.abort()
        _save_if_possible(report)
        raise
    return report


def _save_if_possible(report: RunReport) -> None:
    try:
        report.save()
    except CellbatchError:
        pass  # a full disk, say: the error that stopped the run is the one to report


def _stops_the_run(exc: CellbatchError) -> bool:
    """A full disk or an unusable model stops the run; a bad input or a name too long fails one slide."""
    if isinstance(exc, InputFormatError) or exc.exit_code != ExitCode.COULD_NOT_RUN:
        return False
    return getattr(exc.__cause__, "errno", None) != errno.ENAMETOOLONG


def _input_label(slide: Slide) -> str:
    if slide.kind == "zarr" and slide.array_path:
        return display_path(f"{slide.store}/{slide.array_path}")
    return display_path(slide.root if slide.name == "." else slide.root / slide.name)
# A slide's median cell diameter (from its area) this many times off --cell-diameter is warned about.
# Measured at 110 px: BCCD fields (cells 150-250 px, split at 110) 153 px; synthetic captures 114; PBC
# lymphocytes 99, neutrophils and eosinophils 137, monocytes 153 (a slide of monocytes only is warned
# about; a mixed slide is not). See docs/run-state.md.
SIZE_TOLERANCE = 1.3
SIZE_MIN_CELLS = 5  # fewer cells say too little about a slide's cell size


def cell_size_note(name: str, areas: list[int], cell_diameter: float, *, captures: int) -> str | None:
    """A warning when a slide's median detected cell area is far from a disc of ``--cell-diameter``, or
    when its ``captures`` (read without failure) gave no cell at all.

    Every detector threshold scales with the diameter: set far off, cells are split into pieces,
    merged with neighbours, dropped as too small or large, or overflow the crop, all without a failure.
    """
    if not areas and captures >= SIZE_MIN_CELLS:
        return (f"slide {name}: no cell found in {captures} captures: is --cell-diameter {cell_diameter:g} "
                "near the white cells' size in pixels?")
    if len(areas) < SIZE_MIN_CELLS:
        return None
    measured = 2 * float(np.sqrt(np.median(areas) / np.pi))
    if 1 / SIZE_TOLERANCE <= measured / cell_diameter <= SIZE_TOLERANCE:
        return None
    return (
        f"slide {name}: the detected cells are {measured:.0f} px across (median) but --cell-diameter is "
        f"{cell_diameter:g}: rerun with --cell-diameter {measured:.0f} (and a --crop-size that fits) "
        "or cells are split, merged or cut off"
    )


def _claim_and_plan(slide: Slide, name: str, out: Path, settings: RunSettings, key_extra: dict[str, Any],
                    hash_map: Any, claims: Any) -> SlidePlan:
    busy = claims.claim(name) if claims is not None else None
    if busy is not None:
        return SlidePlan(slide=slide, name=name, action="skip", reason=busy)
    return plan_slide(slide, name, out, settings, key_extra, hash_map=hash_map)


def _release(claims: Any, plan: SlidePlan) -> None:
    if claims is not None:
        claims.release(plan.name)


def count_captures(sources: list[Path], *, exclude: tuple[Path, ...] = ()) -> int:
    """Captures (files or frames) in every slide of ``sources``, as a run would list them."""
    return sum(_capture_count(slide) for slide, _ in slide_names(sources, exclude=exclude))


def _capture_count(slide: Slide) -> int:
    """Captures in a slide, for the progress total; 0 for a slide that will fail validation."""
    if slide.kind != "zarr":
        return len(slide.captures)
    try:
        return slide_frame_count(slide)
    except CellbatchError:
        return 0


def _finish_without_run(
    plan: SlidePlan, report: RunReport, on_progress: Callable[[int, int, int], None]
) -> None:
    on_progress(len(plan.refs), 0, 1)
    if plan.action == "skip":
        if plan.committed is not None:  # its committed output, as it stands
            entry, failures = SlideReport.skipped(plan.name, plan.out_dir, plan.committed)
            report.slides.append(entry)
            report.failures.extend({"slide": plan.name, **f} for f in failures)
        else:  # another live run holds it
            report.slides.append(SlideReport(
                name=plan.name, status="skipped", captures=len(plan.refs), output=str(plan.out_dir or ""),
                reason=plan.reason,
            ))
    else:
        report.slides.append(SlideReport(name=plan.name, status="failed", reason=plan.reason, captures=len(plan.refs)))
        report.failures.append({"slide": plan.name, "path": plan.name, "reason": plan.reason})
    report.save(every=5.0)


def _fail_slide(plan: SlidePlan, current: SlideRun | None, reason: str, report: RunReport) -> None:
    if current is not None:
        current.abort()
    report.slides.append(SlideReport(
        name=plan.name, status="failed", reason=reason, captures=len(plan.refs),
        failed_captures=failed_capture_count(plan.failures),
    ))
    report.failures.append({"slide": plan.name, "path": plan.name, "reason": reason})
    report.failures.extend({"slide": plan.name, **f} for f in plan.failures)
    report.save(every=5.0)


def _worker_threads(client: Any) -> int:
    try:
        return sum(client.nthreads().values())
    except Exception:  # an unreachable scheduler shows up later, on submit, with its own error
        return 1


def base_provenance(
    settings: RunSettings, stages: Stages, sources: list[Path], out: Path, device: str, *, command: list[str]
) -> dict[str, Any]:
    """The part of every slide's provenance that is the same for the whole run."""
    model = stages.generator.provenance() if stages.generator is not None else None
    if model is not None:
        model["trained"] = model["metadata"].get("trained")
    return {
        "cellbatch_version": __version__,
        "command": list(command),
        "parameters": {
            **asdict(settings),
            # resolved: a relative path as typed means nothing once the working directory is gone
            "sources": [str(s.resolve()) for s in sources],
            "out": str(out.resolve()),
            "device": device,
        },
        "cwd": os.getcwd(),
        "environment": environment(device),
        "model": model,
        "classifier": stages.check.provenance() if stages.check is not None else None,
        "normalisation": [n.provenance() for n in stages.normalisers],
    }

