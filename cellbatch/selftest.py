"""The self-test inside every model file: fixed input crops, the outputs they gave, and a tolerance.

After bioimage.io's test inputs/outputs (``test_tensor`` + ``reproducibility_tolerance``): export runs
the network once on a few fixed crops and stores the crops and the outputs in the file; every load (and
``cellbatch model verify``) runs the file again on the device in use and refuses it when its outputs
moved beyond the tolerance. That catches a file damaged in transit or edited, and a runtime (torch,
ONNX Runtime, driver, device) that no longer computes what the model computed when it was validated.

The test data is an ``.npz`` with ``inputs`` (N, H, W, 3) uint8 RGB crops and ``outputs``, the float32
model outputs for them (generator: (N, 3, H, W) in ``output_range``; classifier: (N, K) logits). It
travels beside ``cellbatch.json`` (TorchScript: extra file; ONNX: metadata property), whose
``self_test`` entry records its sha256, shapes and tolerance. Contract: docs/model-files.md.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cellbatch.crop import CROP_SIZE
from cellbatch.errors import ModelError

SELFTEST_NAME = "cellbatch-selftest.npz"
MAX_SELFTEST_BYTES = 16 * 1024 * 1024
SELFTEST_CROPS = 2
SELFTEST_SEED = 20261201
# Both cell types a white-cell look differs most on: a granular cytoplasm and a dense nucleus.
SELFTEST_CELL_TYPES = ("eosinophil", "lymphocyte")
CLASSIFIER_SIZE = CROP_SIZE  # the classifier contract's input side


@dataclass(frozen=True)
class Tolerance:
    """An element passes when ``|actual - expected| <= absolute + relative * |expected|``; the test passes
    when at most ``mismatched_per_million`` elements per million fail (bioimage.io's three numbers)."""

    absolute: float
    relative: float
    mismatched_per_million: float


def default_tolerance(metadata: Mapping[str, Any]) -> Tolerance:
    """Generator: 1 grey level on 99.9 % of elements (what ONNX vs torch must meet); classifier: 0.01 logits.

    The generator's bound is in its ``output_range``: one grey level is (high - low) / 255.
    """
    if metadata["kind"] == "generator":
        lo, hi = metadata["output_range"]
        return Tolerance(absolute=(hi - lo) / 255.0, relative=0.0, mismatched_per_million=1000.0)
    return Tolerance(absolute=1e-2, relative=1e-2, mismatched_per_million=0.0)


def selftest_inputs(metadata: Mapping[str, Any]) -> np.ndarray:
    """The fixed crops: (2, S, S, 3) uint8 DM1200-look cells from :mod:`cellbatch.synth`.

    S is 256 for a classifier (its contract) and the smallest multiple of ``tile_multiple`` of at least
    128 for a generator, so the test stays small inside the file.
    """
    if metadata["kind"] == "classifier":
        return _synth_crops(CLASSIFIER_SIZE).copy()
    multiple = int(metadata.get("tile_multiple", 1))
    return _synth_crops(multiple * -(-128 // multiple)).copy()


@functools.lru_cache(maxsize=4)
def _synth_crops(size: int) -> np.ndarray:
    from cellbatch.crop import background_colour, crop_window
    from cellbatch.synth import synth_capture

    rng = np.random.default_rng(SELFTEST_SEED)
    crops = []
    for cell_type in SELFTEST_CELL_TYPES:
        capture = synth_capture(rng, n_white=1, cell_types=(cell_type,))
        cell = capture.cells[0]
        crop, _ = crop_window(capture.dm1200, cell.cx, cell.cy, size=size, fill=background_colour(capture.dm1200))
        crops.append(crop)
    return np.stack(crops)


def forward(
    module: Callable[[Any], Any], inputs: np.ndarray, metadata: Mapping[str, Any], *, device: str
) -> np.ndarray:
    """Run ``module`` on uint8 crops as a run feeds it (``input_range``, float32) and return float32 outputs."""
    import torch

    from cellbatch.generate import to_range

    x = to_range(torch.from_numpy(np.ascontiguousarray(inputs)).to(device), tuple(metadata["input_range"]))
    with torch.inference_mode():
        y = module(x)
    if not isinstance(y, torch.Tensor):
        raise ModelError(f"the model returned {type(y).__name__}, not a tensor: it breaks the model contract")
    return y.to(torch.float32).cpu().numpy()


def make_selftest(module: Callable[[Any], Any], metadata: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Run ``module`` (fp32, CPU) on the fixed crops: the ``.npz`` bytes and the ``self_test`` metadata entry."""
    import torch

    inputs = selftest_inputs(metadata)
    outputs = forward(module, inputs, metadata, device="cpu")
    if not np.isfinite(outputs).all():
        raise ModelError("the model returns NaN or infinite values on the self-test crops: it cannot be exported")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, inputs=inputs, outputs=outputs)
    raw = buffer.getvalue()
    entry = {
        "file": SELFTEST_NAME,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "inputs": list(inputs.shape),
        "outputs": list(outputs.shape),
        "precision": "fp32",
        "made_with": f"torch {torch.__version__} on cpu",
        "tolerance": asdict(default_tolerance(metadata)),
    }
    return raw, entry


@dataclass(frozen=True)
class Comparison:
    """How far actual outputs are from the stored ones."""

    max_abs_diff: float
    mismatched: int
    allowed: int
    elements: int

    @property
    def passed(self) -> bool:
        return self.mismatched <= self.allowed


def compare(actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance) -> Comparison:
    """Count the elements of ``actual`` outside the tolerance around ``expected``.

    Examples
    --------
    >>> compare(np.array([0.0, 0.5]), np.array([0.0, 0.0]), Tolerance(0.1, 0.0, 0.0)).mismatched
    1
    """
    if actual.shape != expected.shape:
        return Comparison(float("inf"), expected.size, 0, expected.size)
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    diff[~np.isfinite(actual)] = np.inf
    beyond = diff > tolerance.absolute + tolerance.relative * np.abs(expected)
    allowed = int(tolerance.mismatched_per_million * expected.size // 1_000_000)
    return Comparison(float(diff.max()) if diff.size else 0.0, int(beyond.sum()), allowed, int(expected.size))


def load_selftest(raw: bytes, entry: Mapping[str, Any], *, source: object) -> tuple[np.ndarray, np.ndarray, Tolerance]:
    """Decode the stored test, checking it is the one ``cellbatch.json`` describes."""
    if hashlib.sha256(raw).hexdigest() != entry.get("sha256"):
        raise ModelError(
            f"{source}: the self-test data does not match its sha256 in cellbatch.json: the file was altered"
        )
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            inputs, outputs = data["inputs"], data["outputs"]
        tolerance = Tolerance(**{k: float(v) for k, v in entry["tolerance"].items()})
    except Exception as exc:  # numpy raises many types for a damaged archive
        raise ModelError(
            f"{source}: the self-test data cannot be read ({type(exc).__name__}): re-export the model"
        ) from exc
    if inputs.dtype != np.uint8 or inputs.ndim != 4 or inputs.shape[-1] != 3 or len(outputs) != len(inputs):
        raise ModelError(f"{source}: the self-test data has inputs {inputs.shape} {inputs.dtype}: re-export the model")
    return inputs, outputs, tolerance


def run_selftest(
    module: Callable[[Any], Any],
    raw: bytes | None,
    metadata: Mapping[str, Any],
    *,
    device: str,
    source: object,
) -> dict[str, Any]:
    """Check a loaded model against its stored test on ``device`` at fp32; the result for provenance.

    Raises :class:`ModelError` (one line with the measured difference) when the outputs moved. A file
    without a self-test passes with ``status: absent`` and a note.
    """
    entry = metadata.get("self_test")
    if raw is None or not isinstance(entry, Mapping):
        return {
            "status": "absent",
            "note": "this file has no self-test (it predates them): its outputs were not checked at load; "
            "`cellbatch model convert FILE --to torchscript` adds one",
        }
    inputs, expected, tolerance = load_selftest(raw, entry, source=source)
    try:
        actual = forward(module, inputs, metadata, device=device)
    except ModelError:
        raise
    except Exception as exc:  # the runtime's own error for a graph it cannot run
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{source}: the self-test failed to run on {device}: {first}") from exc
    result = compare(actual, expected, tolerance)
    summary = {
        "status": "passed" if result.passed else "failed",
        "device": device,
        "precision": "fp32",
        "max_abs_diff": result.max_abs_diff,
        "elements_beyond_tolerance": result.mismatched,
        "elements_allowed_beyond": result.allowed,
        "elements": result.elements,
        "tolerance": asdict(tolerance),
    }
    if not result.passed:
        raise ModelError(
            f"{source}: self-test failed on {device} at fp32: outputs moved by up to {_describe(result, metadata)}, "
            f"{result.mismatched} of {result.elements} elements beyond the tolerance (allowed {result.allowed}); "
            "the file was altered or this runtime computes it differently: do not use it"
        )
    return summary


def _describe(result: Comparison, metadata: Mapping[str, Any]) -> str:
    if metadata["kind"] == "generator" and np.isfinite(result.max_abs_diff):
        lo, hi = metadata["output_range"]
        return f"{result.max_abs_diff:.4g} ({result.max_abs_diff * 255 / (hi - lo):.1f} grey levels)"
    return f"{result.max_abs_diff:.4g}"
