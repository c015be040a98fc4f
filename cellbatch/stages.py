"""The device stages of a run: one typed interface from the generator to the last normaliser.

A batch of cells goes to the run's device once, as uint8 (a quarter of the bytes of float32), and
every stage maps it there::

    upload crops + masks (uint8) -> generator -> normaliser ... -> download each written array (uint8)

A :class:`Stage` is anything with ``__call__(batch) -> batch``, ``provenance()`` and an ``output``
name (the array its result is written as: ``"generated"``, ``"normalised"``). Stages pass uint8
images between them, as their numpy references do, so a chain of torch stages gives the same bytes
as the chain of numpy ones within a grey level. Built-in normalisers also have
``apply_tensors(images, masks)`` and stay on a CUDA device; a plugin normaliser with only a numpy
``__call__(crops, masks)`` runs through :class:`NormaliserStage` with a round trip to the host.

On CUDA, uploads go through pinned host memory on a side stream, so the next batch's upload overlaps
the current batch's compute, and downloads are non-blocking copies into pinned memory that the
consumer waits for only when it writes (see :class:`Transfer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from cellbatch.normalise.base import Normaliser


@dataclass(frozen=True)
class Batch:
    """One batch of cells on the run's device.

    Attributes
    ----------
    crops : torch.Tensor
        (N, H, W, 3) uint8 RGB input crops, as extracted; never changed by a stage.
    masks : torch.Tensor
        (N, H, W) uint8 labels (0 background, 1 red cell, 2 cytoplasm, 3 nucleus).
    image : torch.Tensor
        (N, H, W, 3) uint8 RGB: the current image, what the next stage transforms.
    arrays : dict
        Images to write, by array name (``"generated"``, ``"normalised"``), uint8 on the device.
    """

    crops: torch.Tensor
    masks: torch.Tensor
    image: torch.Tensor
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)

    def with_output(self, image: torch.Tensor, output: str) -> Batch:
        """This batch with ``image`` as the current image, written as array ``output``."""
        return replace(self, image=image, arrays={**self.arrays, output: image})

    def __len__(self) -> int:
        return int(self.crops.shape[0])


@runtime_checkable
class Stage(Protocol):
    """``stage(batch) -> batch`` on the run's device, and what to record about it.

    ``output`` names the array the stage's image is written as; when several stages share a name
    (a chain of normalisers), the last one's image is written.
    """

    output: str

    def __call__(self, batch: Batch) -> Batch: ...

    def provenance(self) -> dict[str, Any]: ...


class NormaliserStage:
    """A normaliser as a :class:`Stage`.

    On CUDA a normaliser with ``apply_tensors(images, masks) -> images`` (every built-in) runs there.
    Elsewhere, and for a plugin with only the numpy contract ``__call__(crops, masks) -> crops``, the
    numpy version runs on the host: on a CPU device on views of the batch (no copy), since there the
    OpenCV/numpy reference is faster than the same operations in torch (docs/devices.md); on CUDA with
    one download and one upload per batch.
    """

    output = "normalised"

    def __init__(self, normaliser: Normaliser, *, device: str = "cpu") -> None:
        self.normaliser = normaliser
        on_device = callable(getattr(normaliser, "apply_tensors", None)) and device != "cpu"
        self.implementation = "torch" if on_device else "numpy"

    def __call__(self, batch: Batch) -> Batch:
        import torch

        if self.implementation == "torch":
            image = self.normaliser.apply_tensors(batch.image, batch.masks)  # type: ignore[attr-defined]
        else:
            host = self.normaliser(batch.image.cpu().numpy(), batch.masks.cpu().numpy())
            image = torch.from_numpy(np.ascontiguousarray(host)).to(batch.image.device)
        return batch.with_output(image, self.output)

    def provenance(self) -> dict[str, Any]:
        return {**self.normaliser.provenance(), "implementation": self.implementation}


@dataclass
class Download:
    """Arrays on their way to the host; :meth:`wait` returns them as numpy once the copies are done."""

    tensors: dict[str, torch.Tensor]
    event: Any = None  # a torch.cuda.Event after the copies, on CUDA

    def wait(self) -> dict[str, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return {name: t.numpy() for name, t in self.tensors.items()}


class Transfer:
    """Moves batches between host and device: one upload per batch, one download per array.

    On CPU both are plain views. On CUDA the host side is pinned memory (from torch's caching host
    allocator, so it is reused without re-pinning), uploads run on a side stream that the compute
    stream waits for, and downloads are non-blocking with an event to wait on.
    """

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def upload(self, crops: np.ndarray, masks: np.ndarray) -> Batch:
        """(N, H, W, 3) uint8 crops and (N, H, W) uint8 masks -> a :class:`Batch` on the device."""
        import torch

        if not self.cuda:
            crops_t = torch.from_numpy(np.ascontiguousarray(crops))
            return Batch(crops=crops_t, masks=torch.from_numpy(np.ascontiguousarray(masks)), image=crops_t)
        host = [self._pinned(crops), self._pinned(masks)]
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            on_device = [h.to(self.device, non_blocking=True) for h in host]
        compute.wait_stream(self._copy_stream)
        for t in on_device:
            t.record_stream(compute)  # the allocator must not reuse it before compute is done
        return Batch(crops=on_device[0], masks=on_device[1], image=on_device[0])

    def download(self, arrays: dict[str, torch.Tensor]) -> Download:
        """Start copying ``arrays`` (uint8 on the device) to the host."""
        import torch

        if not self.cuda:
            return Download({name: t.contiguous() for name, t in arrays.items()})
        host = {}
        for name, t in arrays.items():
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[name].copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Download(host, event)

    @staticmethod
    def _pinned(array: np.ndarray) -> torch.Tensor:
        import torch

        pinned = torch.empty(array.shape, dtype=torch.uint8, pin_memory=True)
        pinned.numpy()[...] = array
        return pinned


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error (torch's own class, or a TorchScript error wrapping one)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_stages(stages: Sequence[Stage], batch: Batch) -> Batch:
    """Apply ``stages`` in order under inference mode."""
    import torch

    with torch.inference_mode():
        for stage in stages:
            batch = stage(batch)
    return batch
