"""Numeric precision and memory layout of the networks a run executes (``--precision``).

``fp32`` is the reference. ``bf16`` keeps fp32's range with an 8-bit mantissa: a generated crop moves
by well under one grey level on average (figures in README, "Measured") and a classifier's decisions
hardly at all, while matrix units (CUDA tensor cores, x86 AMX / AVX512-BF16) run it several times
faster. ``fp16`` has more mantissa but a range that a network trained in fp32 can overflow; it is
offered for GPUs without bf16. ``auto`` picks bf16 where the hardware runs it natively and fp32
elsewhere, where emulated bf16 would be slower than fp32.

A model file is a frozen TorchScript graph: its weights are graph constants, not parameters, so
``module.to(dtype)`` and autocast leave them in fp32. :func:`prepare_module` therefore casts the
constants in the graph itself, and the caller casts the input to match.
On the CPU the cast copy (an fp32 one too) also runs each convolution and its activation as one
oneDNN call (:func:`fuse_conv_activations`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from cellbatch.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from cellbatch.modelfile import ModelFile

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AMX-BF16 or AVX512-BF16 (the oneDNN kernels torch uses for bf16 convolutions)."""
    return bool(cpu_bf16_instructions())


def cpu_bf16_instructions() -> list[str]:
    """The native bf16 instruction sets of this CPU that oneDNN uses: ``AMX-BF16``, ``AVX512-BF16``, both or none.

    Benchmarks name them beside the CPU's model: bf16 speed depends on which a machine has.
    """
    import torch

    found = set()
    if "AMX" in torch.backends.cpu.get_cpu_capability().upper():
        found.add("AMX-BF16")
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    found |= {name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
                              if flag in flags}
                    break
    except OSError:
        pass
    return sorted(found)


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16`` on CUDA and on CPUs with native bf16, else ``fp32``; checks the name."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise ConfigError("--precision fp16 runs only on CUDA (CPU kernels emulate it slowly): use bf16 or fp32")
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved precision (``fp32``, ``bf16`` or ``fp16``)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def prepare_module(
    module: Any, *, precision: str, device: str, fresh: Callable[[], Any] | None = None
) -> tuple[Any, str]:
    """A loaded model with its weights cast to ``precision`` in channels_last layout, and the precision
    it will run at (on CUDA, fp32 models run as they were saved).

    Casts parameters and buffers (scripted modules) and the tensor constants of every graph (frozen
    modules, where the weights live), in a copy: a module that has already run (the model file's
    self-test, :mod:`cellbatch.selftest`) keeps the execution plan it compiled with its fp32
    constants. ``fresh`` makes that copy from the file's bytes
    (:attr:`cellbatch.modelfile.ModelFile.fresh_module`); without it the module is copied through
    ``torch.jit.save``, whose serialisation alone took 0.32 s of a run's start-up for a thesis-size
    generator and a classifier. On CUDA it also turns on cuDNN autotuning: a run feeds thousands of
    batches of one shape, so the search pays for itself in the first few. A model in another runtime
    (an ONNX file, :mod:`cellbatch.onnxfile`) is left as it is and runs in fp32.
    """
    import io

    import torch

    if not isinstance(module, torch.nn.Module):  # ScriptModules are nn.Modules too
        return module, "fp32"
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    if precision == "fp32" and device != "cpu":
        return module, precision
    # On the CPU an fp32 model gets the copy too, for the layout and the fused activations alone: the
    # same values, and a thesis-size generator 5-6 % faster (docs/devices.md, "Fused activations").
    dtype = torch_dtype(precision)
    if isinstance(module, torch.jit.ScriptModule):
        if fresh is not None:
            module = fresh()
        else:
            buffer = io.BytesIO()
            torch.jit.save(module, buffer)
            buffer.seek(0)
            module = torch.jit.load(buffer, map_location=device)
    module.to(dtype)
    for sub in module.modules():
        graph = getattr(sub, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes():
            if node.kind() == "prim::Constant" and node.hasAttribute("value") and node.kindOf("value") == "t":
                node.t_("value", _cast_constant(node.t("value"), dtype))
        if device == "cpu":
            fuse_conv_activations(graph)
    return module, precision


FUSIBLE_ACTIVATIONS = ("aten::relu", "aten::leaky_relu")


def fuse_conv_activations(graph: Any) -> int:
    """Replace each 2-D convolution whose only use is a ReLU or LeakyReLU by one oneDNN convolution with
    the activation fused (``mkldnn::_convolution_pointwise``); returns how many it replaced.

    Unfused, every activation is one more pass over a batch's activations in memory: a tenth of a
    thesis-size generator's time at bf16 on a CPU (measured on the 2-core AMX machine, one thread,
    batch 16: 7.5 against 6.5 ms a crop; docs/devices.md, "Fused activations"). A ReLU gives the
    same values; a LeakyReLU's product is rounded once instead of twice, which moves a bf16 result
    by at most one step of bf16. Other convolutions (transposed, or with weights that are not a 4-D
    constant) stay as they are, as does everything where torch has no oneDNN.
    """
    import torch

    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return 0
    fused = 0
    for conv in graph.findAllNodes("aten::_convolution"):
        uses = conv.output().uses()
        if len(uses) != 1 or uses[0].user.kind() not in FUSIBLE_ACTIVATIONS or not _plain_2d_convolution(conv):
            continue
        activation = uses[0].user
        x, weight, bias, stride, padding, dilation, _, _, groups = list(conv.inputs())[:9]
        with graph.insert_point_guard(activation):
            name = graph.insertConstant(activation.kind().removeprefix("aten::"))
            algorithm = graph.insertConstant(None)
        scalars = graph.create("prim::ListConstruct", list(activation.inputs())[1:])  # LeakyReLU's slope
        scalars.output().setType(torch._C.ListType(torch._C.OptionalType(torch._C.NumberType.get())))
        scalars.insertBefore(activation)
        call = graph.create("mkldnn::_convolution_pointwise",
                            [x, weight, bias, padding, stride, dilation, groups, name, scalars.output(), algorithm])
        call.output().setType(activation.output().type())
        call.insertBefore(activation)
        activation.output().replaceAllUsesWith(call.output())
        activation.destroy()
        conv.destroy()
        fused += 1
    return fused


def _plain_2d_convolution(node: Any) -> bool:
    """Whether a traced ``aten::_convolution`` is a forward 2-D convolution with constant weights."""
    import torch

    weight, transposed = node.inputsAt(1).toIValue(), node.inputsAt(6).toIValue()
    return transposed is False and isinstance(weight, torch.Tensor) and weight.dim() == 4


def prepare_model(model: ModelFile, *, precision: str, device: str) -> str:
    """:func:`prepare_module` on a loaded model file, in place; returns the precision it will run at.

    Uses the file's never-run copy and lets go of it afterwards (it holds the file's bytes).
    """
    model.module, resolved = prepare_module(model.module, precision=precision, device=device, fresh=model.fresh_module)
    model.fresh_module = None
    return resolved


def _cast_constant(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import torch

    if t.is_floating_point():
        t = t.to(dtype)
        if t.dim() == 4:  # convolution weights: the layout oneDNN and cuDNN run fastest
            t = t.contiguous(memory_format=torch.channels_last)
    return t


def network_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Cast an (N, C, H, W) float input to ``precision`` in channels_last layout."""
    import torch

    return x.to(torch_dtype(precision)).contiguous(memory_format=torch.channels_last)
