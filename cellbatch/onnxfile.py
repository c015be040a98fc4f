"""ONNX model files: export beside TorchScript, and run with ONNX Runtime behind the torch module call.

The ONNX file is exported from the same traced and frozen graph as the TorchScript file (so
``cellbatch model convert OLD.pt --to onnx`` and ``export`` take one path), with the batch, height and
width axes dynamic (a generator's height and width must stay multiples of ``tile_multiple``, as with
TorchScript). ``cellbatch.json`` and the self-test travel as metadata properties of the ONNX model.
Contract: docs/model-files.md.
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cellbatch.errors import ModelError
from cellbatch.modelschema import MAX_METADATA_BYTES
from cellbatch.selftest import MAX_SELFTEST_BYTES, SELFTEST_NAME

# ONNX Runtime has run opset 17 since 1.13 (2022); newer opsets add nothing these networks use.
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "output"
_LIMITS = {"cellbatch.json": MAX_METADATA_BYTES, SELFTEST_NAME: MAX_SELFTEST_BYTES * 4 // 3 + 4}


def export_onnx(
    module: Any,
    path: str | Path,
    *,
    metadata: Mapping[str, Any],
    selftest: bytes | None,
    example_size: int,
) -> Path:
    """Write ``module`` (a traced/frozen or loaded TorchScript module) as ONNX with its metadata.

    Parameters
    ----------
    module
        Maps (N, 3, H, W) float32 to the output; traced at ``example_size`` x ``example_size``.
    metadata
        The ``cellbatch.json`` document; ``onnx_opset`` is added.
    selftest
        The self-test ``.npz`` bytes (stored base64), or ``None``.
    """
    import onnx
    import torch

    from cellbatch.modelfile import METADATA_NAME, encode_metadata

    path = Path(path)
    generator = metadata["kind"] == "generator"
    axes = {0: "batch", 2: "height", 3: "width"} if generator else {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is the one that takes a TorchScript graph (convert needs it);
        # its deprecation and tracing notes say nothing about this graph.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, example_size, example_size),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes if generator else {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    meta = {**metadata, "onnx_opset": OPSET}
    properties = {METADATA_NAME: encode_metadata(meta, path)}
    if selftest is not None:
        properties[SELFTEST_NAME] = base64.b64encode(selftest).decode("ascii")
    onnx.helper.set_model_props(model, properties)
    model.producer_name, model.producer_version = "cellbatch", _cellbatch_version()
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def read_onnx_properties(raw: bytes, *, source: object) -> dict[str, bytes]:
    """The cellbatch metadata properties of an ONNX model (``cellbatch.json`` and the self-test), bounded."""
    import onnx

    try:
        model = onnx.load_from_string(raw)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(
            f"{source} is not an ONNX model ({type(exc).__name__}): export it with `cellbatch model export`"
        ) from exc
    found: dict[str, bytes] = {}
    for prop in model.metadata_props:
        if prop.key in _LIMITS:
            if len(prop.value) > _LIMITS[prop.key]:
                raise ModelError(
                    f"{source}: {prop.key} is {len(prop.value):,} bytes, over the {_LIMITS[prop.key]:,}-byte limit: "
                    "re-export the model"
                )
            found[prop.key] = prop.value.encode("utf-8")
    if SELFTEST_NAME in found:
        try:
            found[SELFTEST_NAME] = base64.b64decode(found[SELFTEST_NAME], validate=True)
        except ValueError as exc:
            raise ModelError(f"{source}: the self-test property is not base64: re-export the model") from exc
    return found


class OnnxModule:
    """An ONNX Runtime session called like a torch module: float32 tensor in, tensor out on the input's device."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: Any) -> Any:
        import torch

        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (y,) = self.session.run(None, {self.input_name: array})[:1]
        return torch.from_numpy(y).to(x.device)

    def eval(self) -> OnnxModule:
        return self


def load_onnx(
    raw: bytes, *, device: str, source: object
) -> tuple[OnnxModule, dict[str, Any] | None, bytes | None, dict[str, Any]]:
    """Open an ONNX model from its bytes on ``device``: the module, its metadata, self-test bytes, runtime info.

    CUDA devices use ONNX Runtime's CUDA execution provider when this onnxruntime has it, else the CPU
    one (the runtime info says which ran). Threads follow torch's intra-op setting, so ``--threads``
    binds both runtimes alike.
    """
    import onnxruntime as ort
    import torch

    from cellbatch.modelfile import METADATA_NAME
    from cellbatch.modelschema import parse_metadata

    properties = read_onnx_properties(raw, source=source)
    stored = parse_metadata(properties[METADATA_NAME], source=source) if METADATA_NAME in properties else None
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.partition(":")[2] or 0)
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(raw, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{source} cannot be loaded by onnxruntime {ort.__version__}: {first}; re-export it with "
            "`cellbatch model export --format onnx`"
        ) from exc
    runtime = {"name": "onnxruntime", "version": ort.__version__, "providers": session.get_providers()}
    return OnnxModule(session), stored, properties.get(SELFTEST_NAME), runtime


def _cellbatch_version() -> str:
    from cellbatch import __version__

    return __version__
