"""Output folders stay inside OUT whatever the slide name; disk problems become one-line OutputErrors.

Tests run as root, where chmod does not stop writes, so unwritable folders are simulated: a path
under a file (a real ENOTDIR), /dev/full (a real ENOSPC) and patched calls for EROFS and EACCES.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

from cellbatch.errors import InputFormatError, OutputError, UsageError
from cellbatch.safepath import (
    RESERVED_NAMES,
    ROOT_SLIDE_DIR,
    check_out_apart,
    check_writable,
    output_clashes,
    output_dir_for,
    output_error,
    output_errors,
    sanitize_component,
)

HOSTILE_BUT_HARMLESS = [
    "slide 1",
    "slide é/日本語",
    "a\\b",
    "tab\there",
    "nul\x00byte",
    "new\nline",
    "\udcff\udcfe undecodable",
    "x" * 400,
    "é" * 200,
    "...",
    " leading and trailing ",
    'zarr key:with*odd?chars<>|"',
    "deep/" * 30 + "end",
]


@pytest.mark.parametrize("name", HOSTILE_BUT_HARMLESS)
def test_any_name_maps_to_a_folder_inside_out(tmp_path, name):
    out = tmp_path / "out"
    target = output_dir_for(out, name)
    assert target.resolve().is_relative_to(out.resolve())
    assert target != out
    assert all(len(part.encode("utf-8")) <= 255 for part in target.relative_to(out).parts)
    assert len(target.relative_to(out).parts) == name.count("/") + 1
    target.mkdir(parents=True)  # the OS accepts every component


@pytest.mark.parametrize("name", ["..", "../x", "a/../../b", "/etc", "/", "a//b", "./a", "a/.", "a/"])
def test_names_that_could_escape_or_alias_are_refused(tmp_path, name):
    with pytest.raises(OutputError) as info:
        output_dir_for(tmp_path, name)
    assert "\n" not in str(info.value)


def test_plain_names_are_kept_as_they_are(tmp_path):
    assert output_dir_for(tmp_path, "2026-11-25/slide 7 é") == tmp_path / "2026-11-25" / "slide 7 é"


def test_root_slide_gets_a_named_folder(tmp_path):
    assert output_dir_for(tmp_path, ".") == tmp_path / ROOT_SLIDE_DIR
    assert output_dir_for(tmp_path, "") == tmp_path / ROOT_SLIDE_DIR
    assert output_dir_for(tmp_path, ".", root_name="slide42") == tmp_path / "slide42"
    evil_root = output_dir_for(tmp_path, ".", root_name="../up")
    assert evil_root.parent == tmp_path


def test_distinct_names_get_distinct_components():
    names = ["a/b", "a_b", "a\\b", "a\x00b", "", ".", "..", "_", "__", "x" * 300, "x" * 301, "\udcff", "\udcfe"]
    cleaned = [sanitize_component(n) for n in names]
    assert len(set(cleaned)) == len(names)
    assert all(c not in ("", ".", "..") and "/" not in c for c in cleaned)


def test_existing_symlink_in_out_is_refused_wherever_it_points(tmp_path):
    out = tmp_path / "out"
    (out / "inside").mkdir(parents=True)
    os.symlink(tmp_path, out / "escape", target_is_directory=True)
    os.symlink("inside", out / "alias", target_is_directory=True)
    for name in ["escape", "escape/slide", "alias/slide"]:
        with pytest.raises(OutputError, match="is a symlink"):
            output_dir_for(out, name)


def test_file_where_a_slide_folder_belongs_is_refused(tmp_path):
    (tmp_path / "slide").write_text("not a folder")
    with pytest.raises(OutputError, match="is a file"):
        output_dir_for(tmp_path, "slide/sub")


def test_out_itself_may_be_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "out", target_is_directory=True)
    assert output_dir_for(tmp_path / "out", "s") == tmp_path / "out" / "s"


def test_check_writable_creates_missing_folders(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    check_writable(out)
    assert out.is_dir() and list(out.iterdir()) == []


def test_check_writable_refuses_a_file(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        check_writable(tmp_path / "out")


def test_check_writable_refuses_a_folder_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="part of the path is a file") as info:
        check_writable(tmp_path / "file" / "out")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission denied"),
        (errno.ENOSPC, "no space left"),
        (errno.EDQUOT, "quota"),
    ],
)
def test_check_writable_reports_why_a_folder_cannot_be_written(tmp_path, monkeypatch, code, text):
    def refuse(**kwargs):
        raise OSError(code, os.strerror(code), str(kwargs["dir"]))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=text) as info:
        check_writable(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full is Linux-only")
def test_real_full_disk_becomes_an_output_error():
    with pytest.raises(OutputError, match="no space left") as info:
        with output_errors("/dev/full"), open("/dev/full", "wb", buffering=0) as fh:
            fh.write(b"cells")
    assert "/dev/full" in str(info.value)


def test_output_errors_passes_cellbatch_errors_and_other_exceptions_through():
    with pytest.raises(InputFormatError):
        with output_errors():
            raise InputFormatError("not mine")
    original = OutputError("already one line")
    with pytest.raises(OutputError) as info:
        with output_errors():
            raise original
    assert info.value is original
    with pytest.raises(ValueError):
        with output_errors():
            raise ValueError("not an OS error")


def test_output_error_names_the_path_from_the_error_or_the_argument():
    assert "/x/cells.csv" in str(output_error(OSError(errno.ENOSPC, "No space", "/x/cells.csv")))
    assert "/x/given" in str(output_error(OSError(errno.EIO, "I/O error"), path="/x/given"))
    unknown = output_error(OSError(errno.ENXIO, os.strerror(errno.ENXIO)), path="/x")
    assert os.strerror(errno.ENXIO) in str(unknown)


@pytest.mark.parametrize("name", ["cells.csv", "cells.zarr", "provenance.json", "run.json", "confusion.png",
                                  "Cells.CSV", ".cellbatch-staging", ".cellbatch.lock", "a_b~c14cddc0", "run.log",
                                  "RO-Crate-Metadata.json", ".cellbatch-claims"])
def test_names_of_the_layout_hidden_names_and_changed_lookalikes_get_their_own_names(name):
    changed = sanitize_component(name)
    assert changed != name and not changed.startswith(".")
    assert changed.casefold() not in RESERVED_NAMES


def test_a_folder_named_like_a_cleaned_name_keeps_its_own_folder():
    assert sanitize_component("a/b") != sanitize_component(sanitize_component("a/b"))


def test_two_slides_with_one_output_folder_both_get_the_reason(tmp_path):
    clashes = output_clashes(tmp_path, ["slides", "x", "slides", "y/cells.zarr"],
                             ["in (SRC)", "in/x", "in/slides", "in/y/cells.zarr"])
    assert set(clashes) == {0, 2}
    assert "in (SRC)" in clashes[0] and "in/slides" in clashes[0] and clashes[0] == clashes[2]


def test_an_output_path_over_the_file_system_limit_fails_that_slide_only(tmp_path):
    long = "/".join(["x" * 250] * 17)
    with pytest.raises(OutputError, match="over the file system's limit") as info:
        output_dir_for(tmp_path, long)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    assert output_dir_for(tmp_path, "x" * 250) == tmp_path / ("x" * 250)


def test_out_that_is_or_holds_a_source_is_refused_and_out_inside_a_source_is_not(tmp_path):
    src = tmp_path / "in"
    (src / "s").mkdir(parents=True)
    os.symlink(src, tmp_path / "link", target_is_directory=True)
    for out in (src, tmp_path / "link", tmp_path):
        with pytest.raises(UsageError) as info:
            check_out_apart([tmp_path / "elsewhere", src], out)
        assert info.value.exit_code == 2 and "\n" not in str(info.value)
    check_out_apart([src], src / "out")
    check_out_apart([src / "s"], src / "out")
