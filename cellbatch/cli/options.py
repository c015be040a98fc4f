"""Click options shared by several commands, so each is spelled and documented once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

F = Callable[..., Any]


# A cell narrower than this cannot be told from noise; one wider than this fills no capture at any
# magnification a DM analyser uses (110 px at 0.1 µm/px).
MIN_CELL_DIAMETER = 8.0
MAX_CELL_DIAMETER = 2000.0


class FiniteFloatRange(click.FloatRange):
    """A ``FloatRange`` that also refuses ``nan`` (every comparison with it is false, so it passes)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


def cell_diameter_option(f: F) -> F:
    return click.option(
        "--cell-diameter",
        type=FiniteFloatRange(min=MIN_CELL_DIAMETER, max=MAX_CELL_DIAMETER),
        default=110.0,
        show_default=True,
        metavar="PX",
        help="Expected white-cell diameter in pixels (DM captures at 0.1 µm/px: about 110); "
        "every size threshold scales with it.",
    )(f)


def _known_detector(ctx: click.Context, param: click.Parameter, name: str) -> str:
    # checked before any capture is read: a typo would otherwise fail every capture, one by one
    from cellbatch.registry import detectors

    if name not in detectors.names():
        raise click.UsageError(detectors.unknown(name), ctx)
    return name


def detector_option(f: F) -> F:
    return click.option(
        "--detector",
        default="threshold",
        show_default=True,
        callback=_known_detector,
        help="White-cell detector from the cellbatch.detectors registry.",
    )(f)


def device_option(f: F) -> F:
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (CUDA when present), cpu, cuda or cuda:N.",
    )(f)


def threads_option(f: F) -> F:
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Cores to use (default: those this process may run on: affinity and cgroup quota). "
        "Torch, OpenCV and the CPU-stage workers share them; OMP_NUM_THREADS caps torch and OpenCV.",
    )(f)


def use_threads(threads: int | None, *, command: str, device: str = "cpu") -> None:
    """Apply the thread budget of a command without a Dask stage (``train``, ``classifier``, ``fit``)."""
    from cellbatch.threads import apply_budget, thread_budget

    apply_budget(thread_budget(threads, command=command, device=device))


def precision_option(f: F) -> F:
    return click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
        default="auto",
        show_default=True,
        help="Number format of the generator and classifier: auto is bf16 on CUDA and on CPUs with native "
        "bf16 (AMX, AVX512-BF16), fp32 elsewhere; fp16 needs CUDA.",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the summary as JSON on stdout (one object on every exit, errors too).")(f)


def quiet_option(f: F) -> F:
    return click.option("--quiet", "-q", is_flag=True,
                        help="No progress bar (the summary and failures still go to stderr).")(f)


class Command(click.Command):
    """A command whose own option checks (a :class:`~cellbatch.errors.ConfigError`: unknown plugin, bad
    option value, options that need each other) end like click's: usage line, error, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        from cellbatch.errors import ConfigError

        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            if ctx.find_root().obj and ctx.find_root().obj.get("debug"):
                raise
            raise click.UsageError(str(exc), ctx) from exc


def agreement_options(f: F) -> F:
    """The options of the classifier-agreement check, shared by ``run`` and ``check``."""
    options = [
        click.option("--classes", default=None, metavar="A,B,C",
                     help="Class names in output order, for a classifier file without cellbatch.json."),
        click.option("--reference", type=click.Path(path_type=Path), default=None, metavar="DIR_OR_ZARR",
                     help="Paired DM96 captures laid out like the run input, matched by relative path "
                     "(default: the input crop is the reference)."),
        click.option("--min-agreement", type=click.FloatRange(0, 1), default=None, metavar="RATE",
                     help="Flag slides whose agreement is below RATE (0.85 = 85%) as qc_failed; "
                     "exit code 5 if any is."),
        click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="P",
                     help="Cells whose output class has probability below P are 'unsure': counted, "
                     "left out of the rate."),
        click.option("--max-unsure", type=click.FloatRange(0, 1), default=0.5, show_default=True, metavar="SHARE",
                     help="With --min-agreement, a slide where more than SHARE of the cells are unsure "
                     "(--min-confidence) fails QC too."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def model_formats_option(flag: str = "--format", *, default: str = "both", help: str) -> Callable[[F], F]:
    """Which model-file formats to write (``torchscript``, ``onnx`` or ``both``), as the parameter ``formats``."""
    return click.option(
        flag,
        "formats",
        type=click.Choice(["torchscript", "onnx", "both"]),
        default=default,
        show_default=True,
        help=help,
    )


class Group(click.Group):
    """A command group whose subcommands are :class:`Command` (usage line on a bad command line)."""

    command_class = Command
