"""Run a TorchScript generator over batches of crops.

The model contract (docs/model-files.md): float RGB (N, 3, H, W) in ``input_range`` in, the same shape in
``output_range`` out, H and W multiples of ``tile_multiple``. Crops are padded to that multiple by
reflection (so the network sees plausible context, not a hard edge) and cropped back.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellbatch.errors import CellbatchError, ConfigError, ModelError, UnavailableError, WorkerLostError
from cellbatch.modelfile import ModelFile, load_model

if TYPE_CHECKING:
    from cellbatch.stages import Batch


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when CUDA is present, else ``cpu``; checks an explicit CUDA device exists."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnavailableError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UnavailableError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here; pick cuda:0.."
            )
    elif device != "cpu":
        raise ConfigError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return device


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def to_range(crops: Any, value_range: tuple[float, float]) -> Any:
    """uint8 tensor (N, H, W, 3) -> float32 (N, 3, H, W) linearly mapped from [0, 255] to ``value_range``.

    Done on the model's device: moving uint8 there and converting in place costs a quarter of the
    transfer and none of the CPU time that a float conversion on the host would.
    """
    import torch

    lo, hi = value_range
    # Converted in the crops' own (N, H, W, 3) order, where the conversion reads and writes in step,
    # then viewed as (N, 3, H, W): that view is the channels_last layout the networks run in, so no
    # copy reorders it. In place on the one new tensor: each full-size temporary costs as much as the
    # arithmetic.
    return crops.to(torch.float32).mul_((hi - lo) / 255.0).add_(lo).permute(0, 3, 1, 2)


def from_range(x: Any, value_range: tuple[float, float]) -> Any:
    """float tensor (N, 3, H, W) in ``value_range`` -> uint8 (N, H, W, 3), rounded (half to even) and clipped."""
    import torch

    lo, hi = value_range
    # one new tensor, then in place: a (16, 3, 256, 256) batch is 12.6 MB a pass
    y = x.to(torch.float32, copy=True).sub_(lo).mul_(255.0 / (hi - lo))
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class Generator:
    """A loaded generator, a :class:`~cellbatch.stages.Stage` whose output is written as ``generated``.

    ``Generator.load(path, device=..., precision=...)``; ``generator(batch) -> batch`` on the device,
    or ``generator.generate(crops) -> crops`` for numpy arrays on the host.
    """

    output = "generated"

    def __init__(self, model: ModelFile, *, device: str = "cpu", precision: str = "fp32") -> None:
        from cellbatch.precision import prepare_model

        self.model = model
        self.device = device
        meta = model.metadata
        self.input_range = tuple(float(v) for v in meta["input_range"])
        self.output_range = tuple(float(v) for v in meta["output_range"])
        self.tile_multiple = int(meta.get("tile_multiple", 1))
        self.precision = prepare_model(model, precision=precision, device=device)

    @classmethod
    def load(
        cls, path: str | Path, *, device: str = "cpu", precision: str = "fp32", expected_sha256: str | None = None
    ) -> Generator:
        model = load_model(path, kind="generator", device=device, expected_sha256=expected_sha256)
        return cls(model, device=device, precision=precision)

    def __call__(self, batch: Batch) -> Batch:
        return batch.with_output(self.run(batch.image), self.output)

    def run(self, images: Any) -> Any:
        """(N, H, W, 3) uint8 tensor on the device -> generated (N, H, W, 3) uint8 tensor there."""
        import torch

        from cellbatch.precision import network_input

        _, h, w, _ = images.shape
        x = to_range(images, self.input_range)
        pad_h, pad_w = -h % self.tile_multiple, -w % self.tile_multiple
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        x = network_input(x, self.precision)
        with torch.inference_mode():
            try:
                y = self.model.module(x)
            except Exception as exc:
                from cellbatch.stages import is_out_of_memory

                if is_out_of_memory(exc):
                    raise  # the consumer halves the batch and retries
                raise ModelError(
                    f"generator {self.model.path} failed on a batch of shape {tuple(x.shape)}: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from exc
        check_output(y, tuple(x.shape), self.model.path)
        return from_range(y[:, :, :h, :w], self.output_range)

    def generate(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 crops on the host -> generated crops on the host."""
        import torch

        return self.run(torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)).cpu().numpy()

    def provenance(self) -> dict[str, Any]:
        return {**self.model.provenance(), "precision": self.precision}


def check_output(y: Any, expected_shape: tuple[int, ...], path: Path) -> None:
    """Raise :class:`ModelError` unless ``y`` is a finite floating tensor of ``expected_shape``."""
    import torch

    if not isinstance(y, torch.Tensor):
        raise ModelError(f"model {path} returned {type(y).__name__}, not a tensor: it breaks the model contract")
    if tuple(y.shape) != expected_shape:
        raise ModelError(
            f"model {path} returned shape {tuple(y.shape)} for input {expected_shape}: "
            "a generator must return the input's shape"
        )
    if not y.is_floating_point():
        raise ModelError(f"model {path} returned dtype {y.dtype}: a generator must return floats")
    # One reduction instead of an elementwise test (a third of the post-processing time on a CPU): the
    # sum is finite exactly when every value is, short of values near 1e38 that no image model returns.
    if not bool(torch.isfinite(y.sum(dtype=torch.float32))):
        raise ModelError(f"model {path} returned NaN or infinite values: the model file is broken")


@functools.lru_cache(maxsize=4)
def _loaded_on_this_worker(path: str, sha256: str, device: str, precision: str) -> Generator:
    # One load per worker process and model: Dask reuses the process across tasks.
    from cellbatch.precision import resolve_precision

    device = resolve_device(device)
    return Generator.load(path, device=device, precision=resolve_precision(precision, device), expected_sha256=sha256)


def generate_batch(path: str, sha256: str, device: str, precision: str, crops: np.ndarray) -> np.ndarray:
    """The Dask task that runs the generator on a worker (see :class:`ClusterGenerator`)."""
    return _loaded_on_this_worker(path, sha256, device, precision).generate(crops)


def gpu_workers(client: Any) -> list[str]:
    """Addresses of the cluster's workers that declare a ``GPU`` resource (``dask worker --resources GPU=1``)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(addr for addr, info in workers.items() if info.get("resources", {}).get("GPU", 0) > 0)


class ClusterGenerator:
    """Runs the generator on the Dask workers that declare a ``GPU`` resource.

    The model file must be readable at the same path on those workers (a shared file system); its
    sha256 is checked there, so a worker never runs a different file than the one in provenance.
    """

    output = "generated"

    def __init__(self, local: Generator, client: Any, *, device: str, precision: str = "auto") -> None:
        self.model = local.model
        self.client = client
        self.device = device
        self.precision = precision  # resolved on each worker, for its own device
        self.workers = gpu_workers(client)

    def __call__(self, batch: Batch) -> Batch:
        import torch

        future = self.client.submit(generate_batch, str(self.model.path.resolve()), self.model.sha256, self.device,
                                    self.precision, batch.image.cpu().numpy(), resources={"GPU": 1}, pure=False)
        try:
            generated = future.result()
        except CellbatchError:
            raise
        except Exception as exc:  # a lost worker (KilledWorker, closed comm): this slide fails, the run goes on
            raise WorkerLostError(f"the generator task failed on the cluster: {type(exc).__name__}: {exc}") from exc
        return batch.with_output(torch.from_numpy(generated).to(batch.image.device), self.output)

    def provenance(self) -> dict[str, Any]:
        return {**self.model.provenance(), "precision": self.precision, "ran_on": self.workers}
