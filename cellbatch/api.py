"""Use cellbatch from Python: :func:`convert` is what ``cellbatch run`` does, without the CLI.

Examples
--------
>>> from cellbatch.api import convert                                   # doctest: +SKIP
>>> report = convert(["slides/"], "out/", model="examples/demo-model/demo-l1net.pt")  # doctest: +SKIP
>>> report.exit_code, [s.status for s in report.slides]                 # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellbatch import __version__
from cellbatch.crop import CROP_SIZE
from cellbatch.errors import (
    CellbatchError,
    ClusterLostError,
    ConfigError,
    InputNotFoundError,
    Interrupted,
    UnavailableError,
)
from cellbatch.extract import ExtractSettings
from cellbatch.pipeline import RunSettings, Stages, base_provenance, count_captures, run_slides
from cellbatch.provenance import utc_now
from cellbatch.registry import detectors
from cellbatch.runstate import FINISHED, INTERRUPTED, RunReport
from cellbatch.shard import SharedRunReport, SlideClaims

if TYPE_CHECKING:
    from cellbatch.check.agreement import AgreementCheck

MIN_CROP_SIZE = 32  # smaller than this no white cell at any sensible --cell-diameter fits


def convert(
    sources: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    model: str | Path | None = None,
    model_sha256: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | str = 16,
    cell_diameter: float = 110.0,
    detector: str = "threshold",
    crop_size: int = CROP_SIZE,
    drop_edge: bool = False,
    normalise: Sequence[str] = (),
    classifier: str | Path | None = None,
    classes: Sequence[str] | None = None,
    reference: str | Path | None = None,
    min_agreement: float | None = None,
    min_confidence: float = 0.0,
    max_unsure: float = 0.5,
    scheduler: str | None = None,
    workers: int | None = None,
    processes: int | str = "auto",
    threads: int | None = None,
    force: bool = False,
    shard: tuple[int, int] | None = None,
    command: list[str] | None = None,
    run_options: dict[str, Any] | None = None,
    on_progress: Callable[[int, int, int], None] = lambda captures, cells, slides: None,
    on_plan: Callable[[int, int], None] = lambda captures, slides: None,
    on_warning: Callable[[str], None] = lambda message: None,
) -> RunReport:
    """Convert every slide in ``sources`` into ``out``; see ``cellbatch run --help`` for the options.

    Problems with the run as a whole (missing input, unusable model, locked or unwritable ``out``)
    raise a :class:`~cellbatch.errors.CellbatchError`; problems with single captures or slides are
    recorded in the returned report (and ``out/run.json``) and the run goes on. ``run_options`` is
    recorded as the ``options`` of each slide's provenance (the CLI passes the resolved command line
    and config file).

    With ``shard=(I, N)`` the run does its share of the slides beside other runs into the same
    ``out`` (see :mod:`cellbatch.shard`): the report lists its own slides, ``out/run.json`` all of them.

    Like the CLI, it sets up this process's native runtimes for a run first
    (:func:`cellbatch.threads.prepare_native_runtimes`): thread pools not yet loaded, and on glibc a
    malloc that keeps freed memory for reuse for the rest of the process's life. A BLAS the program
    loaded already (numpy imported first) runs single-threaded for the length of the run only
    (:func:`cellbatch.threads.blas_threads_limited`).
    """
    from cellbatch.threads import (
        apply_budget,
        available_cores,
        blas_threads_limited,
        prepare_native_runtimes,
        thread_budget,
        worker_processes,
    )

    prepare_native_runtimes("run")  # before torch loads, when convert is the first to import it
    from cellbatch.cluster import check_scheduler_address
    from cellbatch.generate import resolve_device
    from cellbatch.lock import RunLock
    from cellbatch.precision import resolve_precision
    from cellbatch.runlog import SlideTimes, run_log
    from cellbatch.safepath import check_out_apart, check_writable, output_errors
    from cellbatch.write import clear_staging

    # One folder given as a string is one source, not a sequence of one-letter paths.
    source_paths = [Path(sources)] if isinstance(sources, str | os.PathLike) else [Path(s) for s in sources]
    check_options(detector=detector, cell_diameter=cell_diameter, crop_size=crop_size, model=model,
                  model_sha256=model_sha256, classifier=classifier, classes=classes, reference=reference,
                  min_agreement=min_agreement)
    for src in source_paths:
        if not src.exists():
            raise InputNotFoundError(f"input {src} does not exist: pass a folder of captures or a Zarr store")
    out = Path(out)
    check_out_apart(source_paths, out)
    if scheduler:
        check_scheduler_address(scheduler)
    resolved = resolve_device(device)
    # worker processes first: they take cores the device stages would otherwise have
    processes, processes_why = worker_processes(
        processes, cores=available_cores(threads)[0], remote=bool(scheduler),
        generator_on_cpu=model is not None and not resolved.startswith("cuda"),
        detector_importable=detectors.importable_everywhere(detector),
        captures=lambda: _captures_or_none(source_paths, out))
    budget = thread_budget(threads, device=resolved, remote=bool(scheduler), workers=workers, processes=processes)
    apply_budget(budget)
    settings = RunSettings(
        extract=ExtractSettings(detector=detector, cell_diameter=cell_diameter, crop_size=crop_size,
                                drop_edge=drop_edge),
        batch_size=1 if batch_size == "auto" else int(batch_size), device=resolved,
        precision=resolve_precision(precision, resolved), normalise=tuple(s for s in normalise if s != "none"),
        force=force, scheduler=scheduler, workers=budget.dask_workers, processes=processes, threads=budget.cores,
        stage_threads=budget.stage_threads, torch_threads=budget.torch,
    )
    stages = load_stages(settings, model=model, model_sha256=model_sha256, classifier=classifier, classes=classes,
                         reference=reference, min_agreement=min_agreement, min_confidence=min_confidence,
                         max_unsure=max_unsure)
    if batch_size == "auto":
        chosen = resolve_batch_size("auto", stages, crop_size=settings.extract.crop_size)
        settings = replace(settings, batch_size=chosen)
    check_writable(out)
    report_type = RunReport if shard is None else SharedRunReport
    report = report_type(out=out, command=list(command or []), started=utc_now(), min_agreement=min_agreement)
    if batch_size == "auto":
        report.notes.append(f"--batch-size auto: {settings.batch_size} crops per batch on {resolved}")
    if stages.check is not None and stages.generator is None and not stages.normalisers and reference is None:
        report.notes.append("--classifier without --model, --normalise or --reference compares each input crop "
                            "with itself: agreement is 100% by construction")
        on_warning(report.notes[-1])
    if stages.generator is not None:
        report.generation = f"{model} on {resolved} at {stages.generator.provenance()['precision']}"
        if stages.generator.provenance()["metadata"].get("trained") is False:
            report.notes.append(f"model {model} is UNTRAINED (exported with --untrained): "
                                "its output is not a conversion")
            on_warning(report.notes[-1])
    with closing(stages), blas_threads_limited(), RunLock(out, shared=shard is not None), run_log(out) as log, \
            dask_client(scheduler, budget.dask_workers, processes=processes) as client, \
            shard_claims(out, shard) as claims:
        log.info("cellbatch %s: %s", __version__, " ".join(report.command))
        log.info("CPU stage: %s", processes_why)
        for note in report.notes:
            log.warning(note)
        if scheduler and stages.generator is not None:
            use_gpu_workers(stages, client, device=device, precision=precision, report=report)
        if shard is None:  # a shard leaves it alone: other shards' slides are being written there
            with output_errors(out, doing="prepare the staging folder in"):
                clear_staging(out)
        provenance = base_provenance(settings, stages, source_paths, out, resolved, command=report.command)
        provenance["options"] = run_options
        key_extra = {
            "model_sha256": stages.generator.provenance()["sha256"] if stages.generator is not None else None,
            "classifier_sha256": stages.check.provenance()["sha256"] if stages.check is not None else None,
            "normalisers": provenance["normalisation"],
            "check": None if stages.check is None else {
                "reference": str(Path(reference).resolve()) if reference is not None else None,
                "min_agreement": min_agreement,
                "min_confidence": min_confidence,
                "max_unsure": max_unsure,
            },
        }
        times = SlideTimes(report.slides)
        try:
            run_slides(source_paths, out, settings=settings, stages=stages, client=client,
                       provenance_base=provenance, key_extra=key_extra, report=report,
                       on_progress=times.wrap(on_progress), on_plan=on_plan, on_warning=on_warning, claims=claims)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM turned into one by the CLI: say where OUT stands
            times.flush()
            report.finish(INTERRUPTED, utc_now())
            raise Interrupted(report.interrupt_message(), signum=getattr(exc, "signum", signal.SIGINT),
                              summary=report.to_dict()) from None
        except ClusterLostError:  # the run cannot go on, but what it did stands: run.json says so
            times.flush()
            report.finish(INTERRUPTED, utc_now())
            raise
        times.flush()
        report.notes.extend(stages.notes)
        report.finish(FINISHED, utc_now())
        write_crate(out, report, source_paths)
        log_summary(log, report.to_dict())
    return report


def log_summary(log: logging.Logger, summary: dict[str, Any]) -> None:
    """The terminal's closing summary, and every failure, into the log."""
    from cellbatch.runlog import failure_lines, summary_lines

    for line in summary_lines(summary):
        log.info(line)
    for line in failure_lines(summary):
        log.warning(line)
    log.info("exit code %d", summary["exit_code"])


def write_crate(out: Path, report: RunReport, sources: list[Path]) -> None:
    """OUT/ro-crate-metadata.json beside run.json (see :mod:`cellbatch.crate`); every shard's slides."""
    from cellbatch.crate import write_run_crate
    from cellbatch.pipeline import slide_names
    from cellbatch.safepath import output_errors

    with output_errors(out, doing="write the RO-Crate metadata into"):
        if isinstance(report, SharedRunReport):
            with report.current() as summary:
                write_run_crate(out, summary, slide_names(sources, exclude=(out,)))
        else:
            write_run_crate(out, report.to_dict(), slide_names(sources, exclude=(out,)))


@contextmanager
def shard_claims(out: Path, shard: tuple[int, int] | None) -> Iterator[SlideClaims | None]:
    """The per-slide claims of a sharded run (released however the run ends); ``None`` without a shard."""
    if shard is None:
        yield None
        return
    with SlideClaims(out, shard) as claims:
        yield claims


def check_options(
    *,
    detector: str,
    cell_diameter: float,
    crop_size: int,
    model: str | Path | None,
    model_sha256: str | None,
    classifier: str | Path | None,
    classes: Sequence[str] | None,
    reference: str | Path | None,
    min_agreement: float | None,
) -> None:
    """Check what the command line alone decides, before anything is loaded or read.

    Raises :class:`~cellbatch.errors.ConfigError` (exit 2) for options that need each other, a crop the
    classifier cannot take, or an unknown detector; the normalisers are checked as they are built, before
    the model loads.
    """
    from cellbatch.extract import get_detector

    if (reference is not None or min_agreement is not None or classes) and classifier is None:
        raise ConfigError("--reference, --min-agreement and --classes need --classifier CLF.pt")
    if model_sha256 and model is None:
        raise ConfigError("--model-sha256 needs --model")
    if crop_size < MIN_CROP_SIZE:
        raise ConfigError(f"--crop-size {crop_size}: use at least {MIN_CROP_SIZE} px")
    if classifier is not None and crop_size < CROP_SIZE:
        raise ConfigError(
            f"--crop-size {crop_size} with --classifier: the classifier takes {CROP_SIZE}x{CROP_SIZE} crops "
            f"(larger crops are checked on their centre); use --crop-size {CROP_SIZE} or more"
        )
    get_detector(detector, cell_diameter)  # an unknown detector is a bad command line, not N failed captures


# --batch-size auto on CPU: the generator's CPU time per crop still falls from 16 to 32 crops (by a
# fifth for the thesis-size one, docs/devices.md); past that, a batch only adds memory and latency.
CPU_AUTO_BATCH = 32
# --batch-size auto on CUDA: the largest power of two up to this that fits in device memory.
MAX_AUTO_BATCH = 1024


def resolve_batch_size(value: int | str, stages: Stages, *, crop_size: int) -> int:
    """``--batch-size``: a number, or ``auto`` (on CUDA the largest batch the stages fit, found once)."""
    if value != "auto":
        return int(value)
    if not stages.device.startswith("cuda") or (not stages.ordered() and stages.check is None):
        return CPU_AUTO_BATCH
    return stages.largest_batch(crop_size, limit=MAX_AUTO_BATCH)


def use_gpu_workers(stages: Stages, client: Any, *, device: str, precision: str, report: RunReport) -> None:
    """On a cluster with workers that declare a GPU resource, run the generator there."""
    from cellbatch.generate import ClusterGenerator, Generator, gpu_workers

    if gpu_workers(client) and isinstance(stages.generator, Generator):
        stages.generator = ClusterGenerator(stages.generator, client, device=device, precision=precision)
        report.generation += f"; generator on the cluster's GPU workers {', '.join(stages.generator.workers)}"


def load_stages(
    settings: RunSettings,
    *,
    model: str | Path | None,
    model_sha256: str | None,
    classifier: str | Path | None,
    classes: Sequence[str] | None,
    reference: str | Path | None,
    min_agreement: float | None,
    min_confidence: float,
    max_unsure: float,
) -> Stages:
    """Load the generator, normalisers and check eagerly, so a bad one stops the run before any work."""
    from cellbatch.generate import Generator
    from cellbatch.normalise.base import parse_spec
    from cellbatch.registry import normalisers
    from cellbatch.stages import NormaliserStage

    stages = Stages(device=settings.device, threads=settings.stage_threads, torch_threads=settings.torch_threads)
    for spec in settings.normalise:  # first: a bad name or option is a bad command line (exit 2)
        name, arg = parse_spec(spec)
        stages.normalisers.append(NormaliserStage(normalisers.get(name)(arg), device=settings.device))
    if model is not None:
        stages.generator = Generator.load(model, device=settings.device, precision=settings.precision,
                                          expected_sha256=model_sha256)
    first = stages.normalisers[0].normaliser if stages.normalisers else None
    if (profile := getattr(first, "profile", None)) is not None:
        # the first normaliser sees the generator's output (or the raw crops): is its profile fitted for it?
        sha = stages.generator.provenance()["sha256"] if stages.generator is not None else None
        profile.check_use(model_sha256=sha, model=None if model is None else str(model))
    if classifier is not None:
        stages.check = load_check(settings, classifier=classifier, classes=classes, reference=reference,
                                  min_agreement=min_agreement, min_confidence=min_confidence, max_unsure=max_unsure)
    return stages


def load_check(
    settings: RunSettings,
    *,
    classifier: str | Path,
    classes: Sequence[str] | None,
    reference: str | Path | None,
    min_agreement: float | None,
    min_confidence: float,
    max_unsure: float,
) -> AgreementCheck:
    from cellbatch.check.agreement import AgreementCheck, CheckSettings, load_classifier
    from cellbatch.check.reference import ReferenceSource

    clf = load_classifier(classifier, classes=classes, device=settings.device)
    ref = None
    if reference is not None:
        if not Path(reference).exists():
            raise InputNotFoundError(f"reference {reference} does not exist: pass the paired DM96 captures")
        ref = ReferenceSource(Path(reference), detector=settings.extract.detector,
                              cell_diameter=settings.extract.cell_diameter)
    return AgreementCheck(
        clf,
        settings=CheckSettings(min_confidence=min_confidence, min_agreement=min_agreement, max_unsure=max_unsure,
                               batch_size=settings.batch_size),
        reference=ref,
        device=settings.device,
        precision=settings.precision,
    )


def _captures_or_none(sources: list[Path], out: Path) -> int:
    """The run's capture count for ``--processes auto``; 0 (threads) when listing fails here, where the
    run itself reports what it cannot read, slide by slide."""
    try:
        return count_captures(sources, exclude=(out,))
    except (CellbatchError, OSError):
        return 0


@contextmanager
def dask_client(scheduler: str | None, workers: int | None, *, processes: int = 0) -> Iterator[Any]:
    """A Dask client: the given cluster, or a local one.

    Locally, read/detect/crop run in ``workers`` threads of this process (no services to start);
    with ``processes`` > 0 they run in that many single-threaded worker processes instead (with the
    run's own malloc settings, :func:`cellbatch.threads.worker_malloc_environ`), which
    scales past Python's GIL on many-core machines (a detector must then be importable there: a
    built-in or an entry-point plugin, not one registered at run time).
    """
    import dask
    from distributed import Client, LocalCluster

    from cellbatch.threads import available_cores, worker_malloc_environ

    if scheduler:
        from cellbatch.cluster import connect_timeout, probe_scheduler

        timeout = connect_timeout()
        probe_scheduler(scheduler, timeout)
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise UnavailableError(
                f"no Dask scheduler answers at {scheduler}: start one or drop --scheduler ({exc})"
            ) from exc
        try:
            with _quiet_when_interrupted():
                yield client
        finally:
            client.close()
        return
    spawn_environ = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    if processes:
        cluster_args = {"n_workers": processes, "threads_per_worker": 1, "processes": True}
        spawn_environ = {**spawn_environ, **worker_malloc_environ()}  # the run's own malloc, not Dask's
    else:
        cluster_args = {"n_workers": 1, "threads_per_worker": workers or available_cores()[0],
                        "processes": False}
    # Port 0: the scheduler's HTTP endpoint takes any free port, so concurrent runs never collide.
    with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_environ}), \
            LocalCluster(**cluster_args, dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client, _quiet_when_interrupted():
        yield client


@contextmanager
def _quiet_when_interrupted() -> Iterator[None]:
    """After Ctrl-C or SIGTERM, keep asyncio quiet while the client closes.

    A gather cut short leaves tasks whose "exception was never retrieved" tracebacks would otherwise
    bury the one line that says where OUT stands.
    """
    try:
        yield
    except KeyboardInterrupt:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise
