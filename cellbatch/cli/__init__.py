"""The ``cellbatch`` command.

Subcommands live one per module in this package and are imported only when invoked, so
``cellbatch --help`` stays instant (torch and dask load inside commands). This module is the one
boundary that turns a :class:`~cellbatch.errors.CellbatchError` into one line and an exit code.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import warnings
from typing import NoReturn, TextIO

import click

from cellbatch import __version__
from cellbatch.errors import CellbatchError, Interrupted, TorchScriptDeprecated

# name -> (module, attribute, one-line help). Help text lives here so listing imports nothing.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("cellbatch.cli.run", "run", "Convert captures: detect, crop, generate, normalise, check, write."),
    "synth": ("cellbatch.cli.synth", "synth", "Write synthetic DM-scale captures (and two-optics pairs)."),
    "model": ("cellbatch.cli.model", "model", "Export, convert, verify and inspect model files (.pt, .onnx)."),
    "normalise": ("cellbatch.cli.normalise", "normalise", "Fit colour-normalisation profiles."),
    "eval": ("cellbatch.cli.eval", "eval_", "Measure detection against ground truth (boxes, centred captures)."),
    "check": ("cellbatch.cli.check", "check", "Re-check an existing output with a classifier."),
    "report": ("cellbatch.cli.report", "report", "Write an HTML report of an output folder (montages, heat maps)."),
    "export-images": ("cellbatch.cli.export_images", "export_images", "Write per-cell PNGs of an output folder."),
    "classifier": ("cellbatch.cli.classifier", "classifier", "Train a reference white-cell classifier."),
    "pair": ("cellbatch.cli.pair", "pair", "Pair and align DM1200 and DM96 captures for training."),
    "train": ("cellbatch.cli.train", "train", "Train a generator (L1Net, L1GAN, ccGAN, pcNET)."),
    "schema": ("cellbatch.cli.schema", "schema", "JSON Schemas of run.json, run --json and provenance.json."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cellbatch")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Convert DM1200 white-blood-cell captures to the DM96 look, in bulk."""
    from cellbatch.threads import prepare_native_runtimes

    prepare_native_runtimes(ctx.invoked_subcommand or "")  # before any command imports torch
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


_show_warning = warnings.showwarning


def _show_note(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    # cellbatch's own notes read as one line, not as a Python warning with a source location.
    if issubclass(category, TorchScriptDeprecated):
        click.echo(f"cellbatch: note: {message}", err=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


def command_line() -> list[str]:
    """The command line of this invocation, for provenance and ``run.json``."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    if isinstance(obj, dict) and "command" in obj:
        return list(obj["command"])
    return ["cellbatch", *sys.argv[1:]]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line per user error, a traceback only with ``--debug``.

    Every exit goes through :func:`_exit`: with ``--json``, errors and interrupts print one JSON object
    on stdout too, so a script always has something to parse. SIGTERM is handled like Ctrl-C.
    """
    args = sys.argv[1:] if argv is None else argv
    warnings.showwarning = _show_note
    debug = "--debug" in args
    as_json = "--json" in args
    signal.signal(signal.SIGTERM, _terminate)
    try:
        # Without standalone mode click returns a command's ctx.exit() code instead of exiting.
        code = cli.main(args=args, prog_name="cellbatch", standalone_mode=False,
                        obj={"command": ["cellbatch", *args]})
    except click.exceptions.Abort as exc:
        interrupt = exc.__cause__ if isinstance(exc.__cause__, Interrupted) else Interrupted()
        _exit(interrupt.exit_code, interrupt.message, as_json=as_json, state="interrupted", summary=interrupt.summary)
    except Interrupted as exc:
        _exit(exc.exit_code, exc.message, as_json=as_json, state="interrupted", summary=exc.summary)
    except KeyboardInterrupt:
        _exit(130, "interrupted", as_json=as_json, state="interrupted")
    except click.ClickException as exc:
        exc.show()  # a usage error prints the command's usage line first
        _exit(exc.exit_code, exc.format_message(), as_json=as_json, shown=True)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except CellbatchError as exc:
        if debug:
            raise
        _exit(exc.exit_code, f"error: {exc}", as_json=as_json)
    sys.exit(code if isinstance(code, int) else 0)


def _exit(
    code: int, message: str, *, as_json: bool, state: str = "not started", shown: bool = False,
    summary: dict | None = None,
) -> NoReturn:
    """Say ``message`` on stderr (unless already ``shown``) and exit with ``code``; with ``--json``, print
    the run's ``summary`` (an interrupted run's run.json) or a small object naming the error."""
    if not shown:
        click.echo(f"cellbatch: {message}", err=True)
    if as_json:
        data = {**summary, "exit_code": code} if summary else {"exit_code": code, "state": state, "error": message}
        click.echo(json.dumps(data, indent=2))
    sys.exit(code)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a job scheduler's stop) ends a run as Ctrl-C does: run.json says where it stands."""
    raise Interrupted(signum=signum)
