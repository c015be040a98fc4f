"""CPU runtimes for the thesis-size generator, side by side in one run: which should a CPU run use?

Compares, on 256x256 crops at batch 1 and 16 (issue 14):
- torch fp32, the TorchScript model file as ``cellbatch run`` loads it;
- torch fp32, the eager network (what training and the bf16 path run);
- torch bf16, the eager network cast to bfloat16 (oneDNN uses AMX where the CPU has it);
- ONNX Runtime fp32, the ONNX model file as ``cellbatch run`` loads it.
The configurations take turns within each repeat, so a shared machine's load falls on all of them
alike; the ratios to TorchScript fp32 are the figures to compare. Each also reports how far its
output is from TorchScript fp32 (share of uint8 pixels within 1 grey level, largest difference).

    OMP_NUM_THREADS=2 python benchmarks/bench_modelfiles.py --threads 2 [--base-filters 32] [--repeats 5]

Prints one JSON object. Untrained weights (seeded): speed does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-filters", type=int, default=32, help="32 is the thesis-size generator")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    import numpy as np
    import torch

    from cellbatch.export import export_generator, generator_metadata, untrained_generator
    from cellbatch.generate import from_range
    from cellbatch.modelcard import cpu_name
    from cellbatch.modelfile import load_model

    torch.set_num_threads(args.threads)
    net = untrained_generator(base_filters=args.base_filters, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        files = export_generator(
            net, Path(tmp) / "g.pt", metadata=generator_metadata(net, trained=False), check_sizes=(128,),
            formats=("torchscript", "onnx"),
        )
        runs = {
            "torch_fp32_torchscript": load_model(files["torchscript"], kind="generator").module,
            "torch_fp32_eager": net,
            "torch_bf16_eager": _bf16(untrained_generator(base_filters=args.base_filters, seed=0)),
            "onnxruntime_fp32": load_model(files["onnx"], kind="generator").module,
        }
        x = torch.rand(max(args.batches), 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        outputs = {}
        with torch.inference_mode():
            for name, module in runs.items():  # warm-up, and the outputs to compare
                outputs[name] = from_range(module(x[:4]).float(), (-1.0, 1.0)).numpy().astype(np.int16)
            times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.batches} for name in runs}
            for _ in range(args.repeats):
                for batch in args.batches:
                    for name, module in runs.items():
                        start = time.perf_counter()
                        module(x[:batch])
                        times[name][batch].append((time.perf_counter() - start) * 1000 / batch)
    reference = outputs["torch_fp32_torchscript"]
    table = {}
    for name in runs:
        diff = np.abs(outputs[name] - reference)
        row = {f"ms_per_crop_batch_{b}": round(statistics.median(times[name][b]), 1) for b in args.batches}
        row |= {
            f"ratio_to_torchscript_fp32_batch_{b}": round(
                statistics.median(times[name][b]) / statistics.median(times["torch_fp32_torchscript"][b]), 2
            )
            for b in args.batches
        }
        row |= {"within_1_grey_level": round(float((diff <= 1).mean()), 5), "max_grey_diff": int(diff.max())}
        table[name] = row
    print(json.dumps({
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                    "onnxruntime": _ort_version(), "amx": _has_amx()},
        "generator": {"base_filters": args.base_filters, "parameters": sum(p.numel() for p in net.parameters()),
                      "crop": args.size, "repeats": args.repeats},
        "runs": table,
    }, indent=2))


def _bf16(net):  # noqa: ANN001, ANN202
    import torch

    class Bf16(torch.nn.Module):
        """bf16 weights and input, fp32 out: the arithmetic is bf16 end to end."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner.to(torch.bfloat16).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.to(torch.bfloat16)).float()

    return Bf16(net)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


if __name__ == "__main__":
    main()
