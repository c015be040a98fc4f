"""``MODEL.md``: the card written beside exported model files (formats, sha256, self-test, measured speed).

The figures are measured by the export itself, on the machine that exports, so the card never states
a number nobody measured; a card made on a shared or busy machine says how many threads it had.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cellbatch.crop import CROP_SIZE

CARD_NAME = "MODEL.md"
SPEED_SIZE = CROP_SIZE  # timed on the crops a run feeds the model
SPEED_BATCHES = (1, 16)
SPEED_REPEATS = 3


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_per_crop(module: Any, *, batch: int, size: int = SPEED_SIZE, repeats: int = SPEED_REPEATS) -> float:
    """Median milliseconds per crop of ``module`` on (batch, 3, size, size) float32, after one warm-up call."""
    import torch

    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    times = []
    with torch.inference_mode():
        module(x)
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / batch


def measure_speed(
    files: Mapping[str, Path], kind: str, *, batches: Sequence[int] = SPEED_BATCHES
) -> list[dict[str, Any]]:
    """ms per 256x256 crop of each written file, loaded as a run loads it, on the CPU."""
    from cellbatch.modelfile import load_model

    rows = []
    for fmt, path in files.items():
        model = load_model(path, kind=kind)
        row: dict[str, Any] = {"format": fmt, "runtime": f"{model.runtime['name']} {model.runtime['version']}"}
        for batch in batches:
            row[f"ms_per_crop_batch_{batch}"] = round(time_per_crop(model.module, batch=batch), 1)
        rows.append(row)
    return rows


def write_model_card(files: Mapping[str, Path], metadata: Mapping[str, Any], speed: list[dict[str, Any]]) -> Path:
    """Write ``MODEL.md`` in the folder of ``files`` and return its path."""
    import torch

    from cellbatch.modelfile import read_metadata, sha256_file

    folder = next(iter(files.values())).parent
    test = metadata["self_test"]
    tol = test["tolerance"]
    lines = [
        f"# Model card: {next(iter(files.values())).stem}",
        "",
        f"Written by `cellbatch` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "The format and self-test contract is `docs/model-files.md` in the cellbatch repository.",
        "",
        "## What it is",
        "",
    ]
    for key in ("kind", "architecture", "base_filters", "parameters", "classes", "trained", "setup", "steps"):
        if metadata.get(key) is not None:
            lines.append(f"- `{key}`: {metadata[key]}")
    ema = (metadata.get("training") or {}).get("ema")
    if ema:
        lines.append(f"- weights: the moving average of the generator over its last steps (`--ema {ema:g}`)")
    lines += [
        f"- input: float RGB (N, 3, H, W) in {metadata.get('input_range')}"
        + (f", H and W multiples of {metadata['tile_multiple']}" if metadata["kind"] == "generator" else ""),
        "",
        "## Files",
        "",
        "| format | file | bytes | sha256 |",
        "| --- | --- | ---: | --- |",
    ]
    for fmt, path in files.items():
        detail = f"ONNX opset {(read_metadata(path) or {}).get('onnx_opset')}" if fmt == "onnx" else "TorchScript"
        lines.append(f"| {detail} | `{path.name}` | {path.stat().st_size:,} | `{sha256_file(path)}` |")
    lines += [
        "",
        "## Self-test",
        "",
        f"Each file holds {test['inputs'][0]} fixed input crops of {test['inputs'][1]}x{test['inputs'][2]} pixels",
        f"and the outputs they gave ({test['made_with']}, {test['precision']}). Every load, and",
        "`cellbatch model verify FILE`, runs them again on the device in use and refuses the file when more",
        f"than {tol['mismatched_per_million']:g} elements per million differ by more than {tol['absolute']:.4g}"
        + (f" + {tol['relative']:g} x |expected|" if tol["relative"] else "")
        + (" (one grey level)" if metadata["kind"] == "generator" else "")
        + ".",
        "",
        "## Measured speed",
        "",
        f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads (ONNX Runtime the same), measured by the",
        "export itself; on a busy or shared machine these figures are high. Median of "
        f"{SPEED_REPEATS} calls after a warm-up, {SPEED_SIZE}x{SPEED_SIZE} crops.",
        "",
        "| format | runtime | " + " | ".join(f"ms per crop, batch {b}" for b in SPEED_BATCHES) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in SPEED_BATCHES) + " |",
    ]
    for row in speed:
        figures = " | ".join(str(row.get(f"ms_per_crop_batch_{b}", "")) for b in SPEED_BATCHES)
        lines.append(f"| {row['format']} | {row['runtime']} | {figures} |")
    path = folder / CARD_NAME
    path.write_text("\n".join(lines) + "\n")
    return path
