"""Fixtures shared across the test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real images in ../shared/data; the test is skipped where that folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test images not found at {SHARED_DATA} (they live beside the checkout in shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny networks train faster on one thread than on two that wait on each other (and on a shared CPU)."""
    import torch

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # commands run in-process share out threads again; this caps them
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The bad-input corpus (tests/badinput.py) in a fresh folder, with each case's expected outcome."""
    from tests.badinput import make_bad_corpus

    folder = tmp_path_factory.mktemp("corpus")
    return folder, make_bad_corpus(folder)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests where CUDA is absent (CI never has a GPU)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA, which this machine does not have")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cellbatch(capsys: pytest.CaptureFixture[str]):
    """Run the ``cellbatch`` command in this process: ``cellbatch(*args) -> (exit code, stdout, stderr)``."""
    from cellbatch.cli import main

    def invoke(*args: object) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return invoke


@pytest.fixture(scope="session")
def report_run(tmp_path_factory: pytest.TempPathFactory):
    """One real ``cellbatch run ... --report`` with every kind of slide (tests/report_run.py); read it, never write."""
    from tests.report_run import make_report_run

    return make_report_run(tmp_path_factory.mktemp("report-run"))
