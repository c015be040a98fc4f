"""Provenance: what a result was made from, enough to re-run a slide and get the same bytes.

Also the slide's *content key*: a hash of everything that determines its output (input hashes,
model and profile hashes, resolved settings). A rerun skips a slide whose key is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from datetime import datetime, timezone
from typing import Any

from cellbatch import __version__


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment(device: str) -> dict[str, Any]:
    """Versions of everything that can change a result, and the device that computed it."""
    import cv2
    import dask
    import numpy
    import torch
    import zarr

    from cellbatch.generate import device_name

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "dask": dask.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
        "device": device,
        "device_name": device_name(device),
    }


def content_key(
    *,
    inputs: list[dict[str, Any]],
    parameters: dict[str, Any],
    model_sha256: str | None,
    classifier_sha256: str | None,
    normalisers: list[dict[str, Any]],
    check: dict[str, Any] | None = None,
) -> str:
    """sha256 over what decides a slide's output; independent of paths outside the input root.

    ``check`` holds the agreement check's settings (reference, gate, confidence): they decide the
    slide's check columns and QC outcome, so changing them redoes the slide.
    """
    payload = {
        "cellbatch": __version__,
        "inputs": [(i["source"], i["frame"], i.get("sha256")) for i in inputs],
        "parameters": parameters,
        "model": model_sha256,
        "classifier": classifier_sha256,
        "normalisers": normalisers,
        "check": check,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
