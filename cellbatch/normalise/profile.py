"""Fitted normalisation profiles: versioned JSON files (contract: docs/normalisation.md).

Every profile is one JSON object with ``"format": "cellbatch-<method>-profile"`` (method ``hm``,
``global``, ``reinhard`` or ``macenko``), ``"version": 1``, the fitted numbers, and a ``"fit"``
record of how it was made. A normaliser reads its profile with :func:`read_profile`, which turns
every way a file can be wrong (missing, not JSON, another method's profile, a newer version, a
missing or misshapen field, non-finite numbers) into one :class:`~cellbatch.errors.ProfileError`
line that names the file and the fix. The profile's sha256 goes into provenance.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from cellbatch.atomic import write_text_atomic
from cellbatch.errors import ConfigError, InputNotFoundError, ProfileError

VERSION = 1
# A fitted profile is a few kilobytes of numbers; anything near this size is not one, and reading it
# whole would cost memory for nothing.
MAX_PROFILE_BYTES = 1_000_000
# No fitted number comes near this: colours are 0-255, variances at most 255**2, transforms map colours
# to colours. A larger one (1e308, say) would overflow to inf and NaN in the arithmetic.
MAX_MAGNITUDE = 1e6
_NUMBER_LIST = re.compile(r"\[\s*([-+0-9.eE,\s]+?)\s*\]")
METHODS = ("hm", "global", "reinhard", "macenko")


def profile_format(method: str) -> str:
    return f"cellbatch-{method}-profile"


@dataclass(frozen=True)
class Profile:
    """A profile read from disk: its ``method``, parsed JSON ``data``, ``path`` and ``sha256``."""

    method: str
    data: dict[str, Any]
    path: Path
    sha256: str

    def array(
        self, *keys: str, shape: tuple[int, ...], bounds: tuple[float, float] = (-MAX_MAGNITUDE, MAX_MAGNITUDE)
    ) -> np.ndarray:
        """The float64 array at ``data[keys[0]][keys[1]]...``, checked to have ``shape`` and values in ``bounds``."""
        node: Any = self.data
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                self.fail(f"has no field {'.'.join(keys)!r}")
            node = node[key]
        try:
            arr = np.asarray(node, dtype=np.float64)
        except (TypeError, ValueError):
            self.fail(f"field {'.'.join(keys)!r} is not an array of numbers")
        if arr.shape != shape:
            self.fail(f"field {'.'.join(keys)!r} has shape {arr.shape}, expected {shape}")
        if not np.isfinite(arr).all():
            self.fail(f"field {'.'.join(keys)!r} holds non-finite numbers")
        low, high = bounds
        if arr.size and (arr.min() < low or arr.max() > high):
            worst = arr.min() if arr.min() < low else arr.max()
            self.fail(f"field {'.'.join(keys)!r} holds {worst:g}, outside {low:g} to {high:g} where fitted values lie")
        return arr

    def provenance(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "format": self.data["format"]}

    @property
    def fitted_on(self) -> dict[str, Any] | None:
        """What a profile fitted from --source captures maps from (``None`` for a target-only profile).

        ``{"kind": "captures"}`` for raw captures (profiles written before this was recorded included),
        ``{"kind": "model_output", "sha256": ...}`` for the output of one generator.
        """
        fit = self.data.get("fit")
        if not isinstance(fit, dict) or fit.get("source") is None:
            return None
        recorded = fit.get("fitted_on")
        return recorded if isinstance(recorded, dict) else {"kind": "captures"}

    def check_use(self, *, model_sha256: str | None, model: str | None = None) -> None:
        """Refuse to apply this profile where it would convert colours twice or fit the wrong input.

        A profile fitted on raw captures maps the raw look to the target look by itself: after a
        generator, which already did that, it would shift the colours again (red cells turn purple).
        A profile fitted on one generator's output belongs after that generator only.
        """
        fitted = self.fitted_on
        if fitted is None:
            return
        use = f"--normalise {self.method}:{self.path}"
        if fitted.get("kind") == "captures" and model_sha256 is not None:
            raise ConfigError(
                f"{use} was fitted on raw captures: it converts them to the target look by itself, and after "
                f"--model {model} it would convert the colours twice; drop --model to use the profile instead "
                "of the generator, or fit it on the model's output (cellbatch normalise fit --source "
                "<generated crops> --source-model MODEL.pt ...)"
            )
        if fitted.get("kind") == "model_output" and fitted.get("sha256") != model_sha256:
            after = f"--model {model}" if model_sha256 else "no --model"
            raise ConfigError(
                f"{use} was fitted on the output of the model {fitted.get('model')} (sha256 "
                f"{str(fitted.get('sha256'))[:12]}...), not for {after}: run it after that model, or refit it"
            )

    def fail(self, what: str) -> NoReturn:
        """Raise the :class:`ProfileError` for a profile whose content is wrong (``what`` says how)."""
        raise ProfileError(
            f"profile {self.path} {what}: it is corrupt or was edited by hand; refit it with "
            f"`cellbatch normalise fit --method {self.method}`"
        )


def read_profile(path: str | Path | None, *, method: str) -> Profile:
    """Read and check the envelope of a ``method`` profile.

    Parameters
    ----------
    path : str or Path or None
        The profile file (``None`` when the user gave no ``NAME:ARG``).
    method : str
        The method the caller needs (``hm``, ``global``, ``reinhard``, ``macenko``).

    Raises
    ------
    ProfileError
        Missing argument, not JSON, wrong method, unknown version.
    InputNotFoundError
        The file does not exist.
    """
    if not path:
        raise ProfileError(
            f"--normalise {method} needs a profile: write --normalise {method}:PROFILE.json, fitted with "
            f"`cellbatch normalise fit --method {method} ...`"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputNotFoundError(
            f"profile {path} does not exist: fit one with "
            f"`cellbatch normalise fit --method {method} --out {path}`"
        )
    refit = f"refit it with `cellbatch normalise fit --method {method}`"
    with open(path, "rb") as fh:
        raw = fh.read(MAX_PROFILE_BYTES + 1)
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(
            f"profile {path} is larger than {MAX_PROFILE_BYTES // 1000} kB, far beyond a fitted profile "
            f"(a few kB): it is not one; {refit}"
        )
    digest = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"profile {path} is not valid JSON ({exc}): the file is corrupt; {refit}") from exc
    except RecursionError as exc:
        raise ProfileError(f"profile {path} is nested too deeply to be a profile: it is corrupt; {refit}") from exc
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("cellbatch-"):
        raise ProfileError(f"profile {path} is not a cellbatch profile (no cellbatch format field); {refit}")
    fmt = data["format"]
    if fmt != profile_format(method):
        other = fmt.removeprefix("cellbatch-").removesuffix("-profile")
        raise ProfileError(
            f"profile {path} is a {other!r} profile, not {method!r}: "
            f"use --normalise {other}:{path}, or {refit}"
        )
    version = data.get("version")
    if version != VERSION:
        raise ProfileError(
            f"profile {path} has version {version!r}, this cellbatch reads version {VERSION}: "
            f"upgrade cellbatch or {refit}"
        )
    return Profile(method=method, data=data, path=path, sha256=digest)


def write_profile(path: str | Path, *, method: str, fields: dict[str, Any], fit: dict[str, Any]) -> Path:
    """Write a profile atomically (temporary file, then rename) and return its path.

    ``fields`` may hold numpy arrays; they are written as nested lists.
    """
    data = {"format": profile_format(method), "version": VERSION, **_plain(fields), "fit": _plain(fit)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, allow_nan=False)
    # one innermost vector per line: a 4x3x3 covariance stays readable instead of 60 lines
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    write_text_atomic(path, text + "\n")
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("profiles hold finite numbers only")
    return value
