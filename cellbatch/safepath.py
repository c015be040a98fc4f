"""Where a slide's outputs go, and one-line errors when they cannot be written.

:func:`output_dir_for` maps a slide name (a relative folder path or a Zarr key, which may hold any
character) to a folder that is always inside OUT. :func:`check_writable` proves OUT can be written
before any work starts, and :func:`output_errors` turns the ``OSError`` of a failed write (full disk,
read-only file system, no permission, ...) into an :class:`~cellbatch.errors.OutputError` with one
line that names the path, the cause and the fix.
"""

from __future__ import annotations

import errno
import getpass
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cellbatch.errors import CellbatchError, OutputError, UsageError
from cellbatch.write import SLIDE_FILES

ROOT_SLIDE_DIR = "_root"
"""Output folder name for a slide that is its input root itself (slide name ``"."``)."""

_MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux file systems
_DIGEST_CHARS = 8
# A name that already ends like a changed one ("a_b~c14cddc0") is changed too, so a folder that happens
# to be called that way can never share an output folder with the name that was cleaned into it.
_LOOKS_CHANGED = re.compile(r"~[0-9a-f]{8}$")
# Names the output layout uses itself: run.json, run.log and ro-crate-metadata.json in OUT, the slide
# files in each slide folder. A slide called that way would write onto them (a folder "cells.zarr"
# inside slide "a"), so it gets a changed name wherever it sits. Compared case-insensitively, for
# case-insensitive file systems. A file added to OUT's layout must be added here.
RESERVED_NAMES = frozenset(n.casefold() for n in (*SLIDE_FILES, "run.json", "run.log", "ro-crate-metadata.json"))


def sanitize_component(name: str) -> str:
    """Turn any string into one safe path component, keeping distinct names distinct.

    Characters that cannot be or should not be in a file name (``/``, ``\\``, NUL and other control
    characters, and the lone surrogates Python uses for undecodable bytes) become ``_``; ``""``,
    ``"."`` and ``".."`` become underscores; over-long names are shortened. Hidden names (a leading
    ``.``, as OUT's own lock and staging folder have), the names of the output layout
    (:data:`RESERVED_NAMES`: ``cells.csv``, ``cells.zarr``, ``run.json``, ...) and names that already
    end like a changed one are changed too. Whenever the name had to change, ``~`` and the first 8
    hex digits of its SHA-256 are appended, so two names that clean up the same still get different
    folders, and no changed name equals a kept one. Spaces and non-ASCII letters are kept as they are.

    Examples
    --------
    >>> sanitize_component("slide 1 é")
    'slide 1 é'
    >>> sanitize_component("..")
    '__~5ec1f7e7'
    >>> sanitize_component("a/b")
    'a_b~c14cddc0'
    >>> sanitize_component("cells.zarr")
    'cells.zarr~bf214e16'
    """
    cleaned = "".join("_" if _unsafe(c) else c for c in name)
    if cleaned in ("", ".", ".."):
        cleaned = "_" * max(len(cleaned), 1)
    elif cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    if cleaned == name and len(name.encode("utf-8")) <= _MAX_COMPONENT_BYTES and not _reserved(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]
    budget = _MAX_COMPONENT_BYTES - 1 - _DIGEST_CHARS
    return cleaned.encode("utf-8")[:budget].decode("utf-8", "ignore") + "~" + digest


def _reserved(name: str) -> bool:
    return name.casefold() in RESERVED_NAMES or _LOOKS_CHANGED.search(name) is not None


def _unsafe(char: str) -> bool:
    code = ord(char)
    return char in "/\\" or code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF


def output_dir_for(out: Path, slide_name: str, *, root_name: str = ROOT_SLIDE_DIR) -> Path:
    """The folder inside ``out`` that holds one slide's outputs.

    Parameters
    ----------
    out : Path
        The output folder (OUT). It may itself be a symlink.
    slide_name : str
        The slide's name: its POSIX path relative to the input root, ``"."`` for the root itself.
    root_name : str
        Folder name used for slide ``"."`` (the input root's own name is a good choice: it is
        sanitised like any other component).

    Returns
    -------
    Path
        ``out`` joined with the sanitised components of ``slide_name``; the folder need not exist.

    Raises
    ------
    OutputError
        The name is absolute or has empty, ``.`` or ``..`` components (no discovered slide has
        these, so they mean a bug or a crafted name), a folder on the way is a symlink or a file, or
        the path would be too long for the file system (that slide fails; shorter ones go on).
    """
    target = out.joinpath(*output_parts(slide_name, root_name=root_name))
    _check_length(out, target)
    _check_inside(out, target)
    return target


def output_parts(slide_name: str, *, root_name: str = ROOT_SLIDE_DIR) -> list[str]:
    """The sanitised folder names below OUT for ``slide_name`` (see :func:`output_dir_for`)."""
    if slide_name in ("", "."):
        return [sanitize_component(root_name)]
    parts = slide_name.split("/")
    if slide_name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise OutputError(
            f"slide name {slide_name!r} is absolute or has an empty, '.' or '..' part, so its output "
            "folder could lie outside OUT: rename the slide"
        )
    return [sanitize_component(p) for p in parts]


def output_clashes(out: Path, names: Sequence[str], inputs: Sequence[str]) -> dict[int, str]:
    """Slides that would share one output folder, each with the reason it cannot run.

    Parameters
    ----------
    out : Path
        The output folder.
    names : sequence of str
        Every slide's output name (as for :func:`output_dir_for`).
    inputs : sequence of str
        Each slide's input, as the reason should name it.

    Returns
    -------
    dict
        Index into ``names`` -> reason, for every slide of every clash (names that are refused on
        their own are left to :func:`output_dir_for`). Sanitising keeps distinct names apart, so a
        clash needs two slides with the same name, e.g. a SRC that holds captures and a subfolder
        named like itself.
    """
    by_folder: dict[tuple[str, ...], list[int]] = {}
    for index, name in enumerate(names):
        try:
            parts = tuple(output_parts(name))
        except OutputError:
            continue
        by_folder.setdefault(parts, []).append(index)
    reasons: dict[int, str] = {}
    for parts, indices in by_folder.items():
        if len(indices) > 1:
            listing = " and ".join(inputs[i] for i in indices)
            reason = (f"slides {listing} would both be written to {out.joinpath(*parts)}: "
                      "rename one of the input folders")
            reasons.update(dict.fromkeys(indices, reason))
    return reasons


# What a slide folder's longest path adds to it: "cells.zarr/normalised/c/<frame>/0/0/0" or the temporary
# ".provenance.json.<hex>.tmp", with room to spare.
_LONGEST_INSIDE_SLIDE = 100


def _check_length(out: Path, target: Path) -> None:
    try:
        limit = os.pathconf(out if out.is_dir() else out.parent, "PC_PATH_MAX")
    except (OSError, ValueError):
        limit = 4096
    length = len(os.fsencode(target)) + _LONGEST_INSIDE_SLIDE
    if length > limit:
        name = target.relative_to(out).as_posix()
        shown = name if len(name) <= 80 else f"{name[:38]}...{name[-38:]}"
        raise OutputError(
            f"the output folder of slide {shown} would make paths of about {length} bytes, "
            f"over the file system's limit of {limit}: choose a shorter OUT or a shallower input folder"
        )


def _check_inside(out: Path, target: Path) -> None:
    base = out.resolve()
    current = base
    for part in target.relative_to(out).parts:
        current = current / part
        if current.is_symlink():
            raise OutputError(
                f"{current} is a symlink; cellbatch writes slide outputs only to real folders inside "
                f"{out}: remove the link or choose another OUT"
            )
        if current.exists() and not current.is_dir():
            raise OutputError(f"{current} is a file where a slide's output folder belongs: move it away")
    if os.path.commonpath([base, target.resolve()]) != str(base):
        raise OutputError(f"{target} resolves outside {out}: choose another OUT")


def check_out_apart(sources: Sequence[Path], out: Path) -> None:
    """Refuse an OUT that is a SRC or holds one; an OUT inside a SRC is fine (discovery skips it).

    Writing into the input folders, or reading one's own results back as captures, could mix
    results with inputs and, when a slide is replaced, move inputs into the staging folder.

    Raises
    ------
    UsageError
        OUT resolves to a SRC, or a SRC lies inside OUT (exit code 2).
    """
    target = out.resolve()
    for src in sources:
        source = src.resolve()
        if source == target:
            raise UsageError(
                f"output {out} is the input {src}: cellbatch never writes into its inputs; choose another OUT "
                f"(a new folder inside the input, such as {src / 'cellbatch-out'}, is fine)"
            )
        if target in source.parents:
            raise UsageError(
                f"input {src} lies inside the output {out}: a run would read its own results as captures; "
                "move the input or choose another OUT"
            )


def check_writable(out: Path) -> None:
    """Create OUT if needed and prove a file can be written in it.

    Raises
    ------
    OutputError
        OUT is a file, or cannot be created or written (permissions, read-only or full file system),
        with one line naming the cause.
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} is a file, not a folder: choose another OUT")
    with output_errors(out, doing="create the output folder"):
        out.mkdir(parents=True, exist_ok=True)
    with output_errors(out, doing="write in the output folder"):
        fd, probe = tempfile.mkstemp(prefix=".cellbatch-probe-", dir=out)
        try:
            os.write(fd, b"cellbatch")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)


def output_error(exc: OSError, *, path: str | Path | None = None, doing: str = "write") -> OutputError:
    """One-line :class:`OutputError` for an ``OSError`` raised while writing outputs.

    Parameters
    ----------
    exc : OSError
        The error; its ``filename`` names the path when the OS reported one.
    path : str or Path, optional
        The path to name when ``exc`` carries none (e.g. ``os.write`` on a descriptor).
    doing : str
        What was being done, as a verb phrase: ``"write"``, ``"create the output folder"``.
    """
    where = exc.filename if exc.filename is not None else path
    cause, fix = _CAUSES.get(exc.errno, (exc.strerror or type(exc).__name__, "choose another OUT"))
    if exc.errno in (errno.EACCES, errno.EPERM):
        fix = f"make it writable for user {_user()} or choose another OUT"
    return OutputError(f"cannot {doing} {where if where is not None else 'output'}: {cause}: {fix}")


_CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free space there or choose another OUT"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there or choose another OUT"),
    errno.EROFS: ("the file system is read-only", "choose a writable OUT"),
    errno.EACCES: ("permission denied", ""),
    errno.EPERM: ("operation not permitted", ""),
    errno.ENOTDIR: ("part of the path is a file, not a folder", "choose another OUT"),
    errno.EEXIST: ("it already exists and is not a folder", "move it away or choose another OUT"),
    errno.ENAMETOOLONG: ("the path is too long", "choose a shorter OUT"),
    errno.EIO: ("input/output error (failing disk or lost network share)", "check the disk or share"),
    errno.ENOLCK: ("the file system does not support file locks", "choose an OUT on a local disk"),
}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid, e.g. in some containers
        return str(os.getuid())


@contextmanager
def output_errors(path: str | Path | None = None, *, doing: str = "write") -> Iterator[None]:
    """Re-raise any ``OSError`` in the block as a one-line :class:`OutputError` (see :func:`output_error`).

    ``CellbatchError`` subclasses (``OutputError`` is itself an ``OSError``) pass through unchanged.

    Examples
    --------
    >>> with output_errors(slide_dir, doing="write"):  # doctest: +SKIP
    ...     (slide_dir / "cells.csv").write_text(table)
    """
    try:
        yield
    except CellbatchError:
        raise
    except OSError as exc:
        raise output_error(exc, path=path, doing=doing) from exc
