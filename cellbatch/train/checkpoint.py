"""The layout of a training run folder, and reading and writing its checkpoints.

A run folder ``RUN/`` holds ``settings.json`` (the resolved training settings), ``checkpoints/``
(``step-00001000.pt`` ..., the newest few), ``metrics.csv`` (one row per validation),
``validation.json`` (the untransformed-input baseline and the latest validation) and, when
TensorBoard is installed, ``tensorboard/``. ``cellbatch model export RUN`` reads the newest
checkpoint; ``cellbatch train --resume`` continues from it.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

from cellbatch.atomic import atomic_write, write_json_atomic
from cellbatch.errors import InputFormatError, InputNotFoundError

SETTINGS_NAME = "settings.json"
VALIDATION_NAME = "validation.json"
METRICS_NAME = "metrics.csv"
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(run: Path, step: int) -> Path:
    return run / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in a run, oldest first."""
    folder = Path(run) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(run: str | Path) -> Path:
    """The newest checkpoint of a run, or :class:`InputNotFoundError` naming the run."""
    run = Path(run)
    if not run.is_dir():
        raise InputNotFoundError(
            f"training run {run} does not exist: pass the --out folder of `cellbatch train`"
        )
    found = list_checkpoints(run)
    if not found:
        raise InputNotFoundError(
            f"training run {run} has no checkpoints in {CHECKPOINT_DIR}/: train it with `cellbatch train`"
        )
    return found[-1][1]


def save_checkpoint(state: dict[str, Any], run: Path, step: int, *, keep: int) -> Path:
    """Write a checkpoint atomically (temporary file, then rename) and keep only the newest ``keep``."""
    import torch

    path = checkpoint_path(run, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        torch.save(state, fh)
    for _, old in list_checkpoints(run)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU)."""
    import torch

    # weights_only: tensors and plain data only. Unpickling anything else could run code hidden in
    # the file; everything a checkpoint needs (settings, RNG states, optimiser state) is plain data.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputFormatError(
            f"checkpoint {path} holds Python objects other than tensors and plain data; cellbatch does not "
            "unpickle them (that can run code): use a checkpoint written by `cellbatch train`"
        ) from exc
    except Exception as exc:  # a truncated or foreign file
        raise InputFormatError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}): delete it and resume"
        ) from exc
    if not isinstance(state, dict) or "models" not in state or "step" not in state:
        raise InputFormatError(f"{path} is not a cellbatch training checkpoint")
    return state


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, sort_keys=True)
