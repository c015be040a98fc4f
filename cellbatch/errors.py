"""Errors a user can act on.

Every error here carries a message that names the thing and the fix, and an exit code. The CLI turns
them into one line on stderr (a traceback only with ``--debug``). Each class also subclasses the
matching built-in, so Python callers can catch ``FileNotFoundError`` or ``ValueError`` as usual.
"""

from __future__ import annotations


class ExitCode:
    """Process exit codes (contract: documented in the README)."""

    OK = 0
    USAGE = 2  # a bad command line: click's own code for a bad option, and ConfigError's
    COULD_NOT_RUN = 3  # bad model, unusable output folder, locked output, ...
    INPUTS_FAILED = 4  # the run finished, some captures or slides failed
    QC_FAILED = 5  # the run finished, some slides are below --min-agreement


class CellbatchError(Exception):
    """Base of every error cellbatch reports to a user as one line."""

    exit_code = ExitCode.COULD_NOT_RUN


class InputNotFoundError(CellbatchError, FileNotFoundError):
    """An input path (captures, model, profile, reference) does not exist."""


class InputFormatError(CellbatchError, ValueError):
    """An input exists but cannot be used as it is (corrupt image, wrong dtype, bad Zarr layout)."""


class ModelError(CellbatchError, ValueError):
    """A model file cannot be loaded or does not honour the model contract."""


class ProfileError(CellbatchError, ValueError):
    """A normalisation profile is corrupt or does not fit the normaliser."""


class OutputError(CellbatchError, OSError):
    """The output folder cannot be written (permissions, full disk, path escapes OUT)."""


class WorkerLostError(CellbatchError, RuntimeError):
    """A Dask worker died under a task (``KilledWorker``, e.g. out of memory): its slide fails, the run goes on."""

    exit_code = ExitCode.INPUTS_FAILED


class LockedError(CellbatchError, RuntimeError):
    """Another live run holds the output folder."""


class ClusterLostError(CellbatchError, ConnectionError):
    """The Dask cluster of ``--scheduler`` lost its scheduler or all its workers during a run."""


class ConfigError(CellbatchError, ValueError):
    """A bad command line found after parsing: options that contradict each other, a bad option value, an
    unknown plugin name. Checked before any capture is read; the CLI shows the command's usage line."""

    exit_code = ExitCode.USAGE


class UsageError(CellbatchError, ValueError):
    """A command line that cannot work as given (OUT is an input, a value no capture could use).

    Exit code 2, like click's own errors for a bad option, but one line without the usage text.
    """

    exit_code = ExitCode.USAGE


class TorchScriptDeprecated(UserWarning):
    """Not an error: said once per process when torch warns that TorchScript (torch.jit) is deprecated."""


class UnavailableError(CellbatchError, RuntimeError):
    """Something a valid command needs is not there: a CUDA device, a Dask scheduler, a plugin's code."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by Ctrl-C (SIGINT) or SIGTERM.

    A ``KeyboardInterrupt``, so code that cleans up on Ctrl-C cleans up on SIGTERM too. ``message`` says
    what was committed and how to resume, ``summary`` is the run's ``run.json`` when the run had begun;
    the exit code is the shell's 128 + signal number.
    """

    def __init__(self, message: str = "interrupted", *, signum: int = 2, summary: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.signum = signum
        self.summary = summary

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
