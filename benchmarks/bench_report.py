"""Time and peak memory of ``cellbatch report`` on synthetic output folders up to 100,000 cells.

Each synthetic OUT is laid out exactly as ``cellbatch run --classifier`` writes it: per slide a
``cells.csv`` with the check columns, a ``provenance.json`` with the agreement figures and one input
entry per capture, and a ``cells.zarr`` whose ``crop``, ``generated`` and ``normalised`` arrays hold
real compressed chunks of synthetic cells (one chunk of 16 cells is encoded once and hard-linked to
every chunk key, so a 100,000-cell OUT costs seconds and a few MB of disk, while the report still
decodes real chunks). Every report is built in a fresh process, which reports its own wall time, CPU
time (user + system, which other load on a shared machine inflates far less than wall time) and peak
RSS; the ratios between rows are what to compare.

Run from the repository root::

    python benchmarks/bench_report.py                         # 1,000 / 100,000 cells, defaults below
    python benchmarks/bench_report.py --cases 2000:10 100000:500 100000:10 --keep /tmp/bench-out
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
ARRAYS = ("crop", "generated", "normalised")
CHUNK = 16  # cells per chunk, as cellbatch.write.SlideWriter writes them


def template_chunks(folder: Path) -> dict[str, Path]:
    """One encoded chunk per array, of 16 synthetic white cells, written through the run's own writer."""
    from cellbatch.synth import synth_capture
    from cellbatch.write import CELL_COLUMNS, SlideWriter

    rng = np.random.default_rng(0)
    crops = np.empty((CHUNK, 256, 256, 3), np.uint8)
    for i in range(CHUNK):
        capture = synth_capture(rng, n_white=1)
        cell = capture.cells[0]
        x0 = int(np.clip(cell.cx - 128, 0, 640 - 256))
        y0 = int(np.clip(cell.cy - 128, 0, 480 - 256))
        crops[i] = capture.dm1200[y0 : y0 + 256, x0 : x0 + 256]
    pictures = {"crop": crops, "generated": crops[..., ::-1], "normalised": 255 - crops}
    writer = SlideWriter(folder / "template", out_root=folder, arrays={a: (256, 256, 3) for a in ARRAYS},
                         columns=CELL_COLUMNS, chunk=CHUNK)
    writer.add([{} for _ in range(CHUNK)], {a: np.ascontiguousarray(p) for a, p in pictures.items()})
    writer.commit({})
    return {a: folder / "template" / "cells.zarr" / a / "c" / "0" / "0" / "0" / "0" for a in ARRAYS}


def write_slide(out: Path, name: str, n: int, chunks: dict[str, Path], rng: np.random.Generator) -> dict:
    """One slide folder of ``n`` cells; returns its run.json entry."""
    from cellbatch.check.agreement import summarise
    from cellbatch.check.confusion import confusion_counts
    from cellbatch.write import CELL_COLUMNS, CHECK_COLUMNS

    folder = out / name
    folder.mkdir(parents=True)
    reference = rng.integers(0, len(CLASSES), n)
    output = np.where(rng.random(n) < 0.9, reference, rng.integers(0, len(CLASSES), n))
    with open(folder / "cells.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CELL_COLUMNS + CHECK_COLUMNS)
        for i in range(n):
            writer.writerow([i, f"{name}/capture_{i:05d}.bmp", 0, 192, 112, 448, 368, 320.5, 240.5, 9500, 4200, 0,
                             CLASSES[reference[i]], CLASSES[output[i]], CLASSES[reference[i]], "0.93",
                             int(output[i] == reference[i])])
    # The writer's own metadata (codecs included) with this slide's length.
    template = chunks["crop"].parents[4].parent
    (folder / "cells.zarr").mkdir()
    (folder / "cells.zarr" / "zarr.json").write_bytes((template / "zarr.json").read_bytes())
    for array in ARRAYS:
        meta = json.loads((template / array / "zarr.json").read_text())
        meta["shape"][0] = n
        (folder / "cells.zarr" / array).mkdir()
        (folder / "cells.zarr" / array / "zarr.json").write_text(json.dumps(meta))
        for c in range((n + CHUNK - 1) // CHUNK):
            key = folder / "cells.zarr" / array / "c" / str(c) / "0" / "0" / "0"
            key.parent.mkdir(parents=True, exist_ok=True)
            os.link(chunks[array], key)
    matrix = confusion_counts(reference, output, n_classes=len(CLASSES))
    check = summarise(matrix, CLASSES, cells=n, unsure=0, no_reference=0, min_agreement=0.85)
    provenance = {
        "cellbatch_version": "bench", "slide": name, "cells": n, "check": check,
        "model": {"path": "model.pt", "sha256": "ab" * 32, "trained": True},
        "classifier": {"path": "clf.pt", "sha256": "cd" * 32, "metadata": {"classes": CLASSES}},
        "normalisation": [{"name": "display", "arg": None}],
        "parameters": {"device": "cpu"}, "environment": {"device": "cpu"},
        "inputs": [{"path": f"capture_{i:05d}.bmp", "frame": 0, "bytes": 921654, "sha256": "ef" * 32, "cells": 1}
                   for i in range(n)],
        "failures": [],
    }
    (folder / "provenance.json").write_text(json.dumps(provenance), encoding="utf-8")
    status = "qc_failed" if check["qc_failed"] else "done"
    return {"name": name, "status": status, "captures": n, "failed_captures": 0, "cells": n, "check": check}


def make_out(out: Path, cells: int, slides: int, chunks: dict[str, Path]) -> None:
    rng = np.random.default_rng(1)
    per_slide = [cells // slides + (1 if i < cells % slides else 0) for i in range(slides)]
    entries = [write_slide(out, f"day{i // 100:02d}/slide{i:04d}", n, chunks, rng) for i, n in enumerate(per_slide)]
    run = {"cellbatch_version": "bench", "command": ["cellbatch", "run", "bench"], "exit_code": 0,
           "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T01:00:00+00:00",
           "slides": entries, "failures": []}
    (out / "run.json").write_text(json.dumps(run), encoding="utf-8")


def measure(out: Path) -> dict:
    """Build the report in a fresh process; its own wall time and peak RSS."""
    code = textwrap.dedent(f"""
        import json, resource, time
        start = time.perf_counter()
        from cellbatch.report import build_report
        result = build_report({str(out)!r})
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({{"seconds": time.perf_counter() - start, "build_seconds": result.seconds,
                          "cpu_seconds": usage.ru_utime + usage.ru_stime,
                          "peak_rss_mib": usage.ru_maxrss / 1024,
                          "html_mib": result.path.stat().st_size / 2**20, "sampled": result.sampled}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["1000:5", "100000:500", "100000:10"], metavar="CELLS:SLIDES")
    parser.add_argument("--keep", type=Path, help="Write the synthetic OUTs here and keep them (default: a temp dir).")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-report-"))
    root.mkdir(parents=True, exist_ok=True)
    chunks = template_chunks(root / "template")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"{'cells':>8} {'slides':>6} {'seconds':>8} {'CPU s':>6} {'peak RSS MiB':>13} {'report MiB':>10} "
          f"{'shown':>6}")
    rows = []
    for case in args.cases:
        cells, slides = (int(v) for v in case.split(":"))
        out = root / f"out-{cells}-{slides}"
        if not (out / "run.json").exists():
            make_out(out, cells, slides, chunks)
        figures = measure(out)
        rows.append((cells, slides, figures))
        print(f"{cells:>8,} {slides:>6} {figures['seconds']:>8.2f} {figures['cpu_seconds']:>6.2f} "
              f"{figures['peak_rss_mib']:>13.1f} "
              f"{figures['html_mib']:>10.2f} {figures['sampled']:>6}")
    base = rows[0][2]
    for cells, slides, figures in rows[1:]:
        print(f"{cells:,} cells in {slides} slides against the first row: "
              f"time x{figures['seconds'] / base['seconds']:.2f}, "
              f"CPU time x{figures['cpu_seconds'] / base['cpu_seconds']:.2f}, "
              f"peak RSS x{figures['peak_rss_mib'] / base['peak_rss_mib']:.2f}")
    if not args.keep:
        import shutil

        shutil.rmtree(root)


if __name__ == "__main__":
    main()
