"""Time-limited generator training on real cells (PBC through the synthetic optics shift), both halves.

The PBC captures (../shared/data/pbc, DM96) are split by name order within each class folder into an
even and an odd half (``cellbatch eval centred --half``), each pushed through the synthetic DM1200 optics
(:func:`cellbatch.train.synthpairs.pairs_from_shifted_captures`). A generator trains on one half with
``--time-limit`` and is validated on the other, captures of every class it never saw, against HM fitted
on the same training pairs (every 5th pair of the other half: about 105 cells of all classes); then
the halves swap. Steps, one at a time (each prints where it wrote):

    python benchmarks/train_pbc.py pairs  --out BENCH            # both halves' pairs (~10 min on 2 busy cores)
    cellbatch classifier train ../shared/data/pbc --out BENCH/pbc-classifier.pt    # reference classifier
    python benchmarks/train_pbc.py train  --out BENCH --setup l1net --train even --time-limit 600 --device cpu
    python benchmarks/train_pbc.py train  --out BENCH --setup l1net --train odd  --time-limit 600 --device cpu
    python benchmarks/train_pbc.py train  --out BENCH --setup pcnet --train even --time-limit 600 --device cpu
    python benchmarks/train_pbc.py report --out BENCH            # final figures and the ΔE-vs-minutes curves
    python benchmarks/train_pbc.py full   --out BENCH            # final generators on every pair of the other half
    python benchmarks/train_pbc.py floor  --out BENCH            # how often the classifier changes its own mind

``train`` passes ``--classifier BENCH/pbc-classifier.pt`` when that file exists, ``--vgg-random`` to pcNET
unless ``--vgg-weights`` is given, and records the machine's load average every 15 s while it trains
(``BENCH/run-SETUP-HALF/load.csv``): a wall-clock limit on a busy machine buys fewer steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbc"
HALVES = ("even", "odd")
PAIR_SEEDS = {"even": 1, "odd": 2}  # the optics' sensor noise differs between the halves too
# Validation runs on every VAL_EVERY-th pair of the other half (about 105 cells, every class): the figures
# of a whole half cost more CPU than the training on a shared 2-core machine.
VAL_EVERY = 5


def make_pairs(out: Path, data: Path, synthetic: int) -> None:
    from cellbatch.train.synthpairs import pairs_from_shifted_captures, pairs_from_synth

    for half in HALVES:
        folder = out / f"pairs-{half}"
        if folder.exists():
            print(f"{folder}: exists, kept")
            continue
        start = time.perf_counter()
        if synthetic:  # no real captures on this machine: synthetic scenes, a different seed per half
            pairs_from_synth(folder, count=synthetic, seed=PAIR_SEEDS[half])
        else:
            pairs_from_shifted_captures(data, folder, seed=PAIR_SEEDS[half], half=half)
        count = len(list((folder / "source").glob("*.png")))
        print(f"{folder}: {count} pairs in {time.perf_counter() - start:.0f} s")
    for half in HALVES:
        validation_subset(out / f"pairs-{half}", out / f"val-{half}")


def validation_subset(pairs: Path, out: Path, every: int = VAL_EVERY) -> None:
    """Every ``every``-th pair of a half (names follow the class folders: every class stays in)."""
    if out.exists():
        return
    names = sorted(p.stem for p in (pairs / "source").glob("*.png"))[::every]
    for side in ("source", "target"):
        (out / side).mkdir(parents=True)
        for name in names:
            shutil.copyfile(pairs / side / f"{name}.png", out / side / f"{name}.png")
    print(f"{out}: {len(names)} validation pairs (every {every}th of {pairs.name})")


def _sample_load(path: Path, stop: threading.Event) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["t_s", "load1", "load5"])
        start = time.monotonic()
        while not stop.wait(15.0):
            one, five, _ = os.getloadavg()
            writer.writerow([round(time.monotonic() - start), one, five])
            fh.flush()


def run_training(args: argparse.Namespace) -> None:
    other = HALVES[1 - HALVES.index(args.train)]
    run = args.out / f"run-{args.setup}-{args.train}"
    command = [
        sys.executable, "-m", "cellbatch", "train", "--setup", args.setup,
        "--pairs", str(args.out / f"pairs-{args.train}"), "--val-pairs", str(args.out / f"val-{other}"),
        "--out", str(run), "--time-limit", str(args.time_limit), "--device", args.device, "-q", "--json",
        "--val-quick", "0",
    ]  # fmt: skip
    classifier = args.out / "pbc-classifier.pt"
    if classifier.is_file():
        command += ["--classifier", str(classifier)]
    if args.setup == "pcnet":
        command += ["--vgg-weights", str(args.vgg_weights)] if args.vgg_weights else ["--vgg-random"]
    command += args.extra
    run.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(run / "load.csv", stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = subprocess.run(command, check=True, capture_output=True, text=True)
    finally:
        stop.set()
        sampler.join()
    (run / "summary.json").write_text(result.stdout)
    print(f"{run}: done in {time.perf_counter() - start:.0f} s wall")
    report_run(run)


def _load(run: Path) -> str:
    path = run / "load.csv"
    if not path.is_file():
        return "load not recorded"
    rows = list(csv.DictReader(open(path)))
    if not rows:
        return "load not recorded"
    loads = [float(r["load1"]) for r in rows]
    return f"load average (1 min) during the run: mean {sum(loads) / len(loads):.1f}, max {max(loads):.1f}"


def report_run(run: Path) -> None:
    record = json.loads((run / "validation.json").read_text())
    settings = json.loads((run / "settings.json").read_text())
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    print(f"\n## {run.name}: {settings['setup']}, width {settings['base_filters']}, crop {settings['crop']}, "
          f"batch {settings['batch_size']}, lr {settings['lr']:g} {settings['lr_schedule']}, "
          f"predict {settings['predict']}, bf16 {settings['bf16']}; {_load(run)}")  # fmt: skip
    quick = record.get("quick", {})
    print(f"curve (first rows on {quick.get('pairs', '?')} held-out pairs, the last on all {record['pairs']}):")
    print(f"{'step':>6} {'train min':>9} {'steps/s':>8} {'ΔE cell':>8} {'ΔE crop':>8} {'agree':>6}  vs HM ΔE cell")
    for r in rows:
        hm = record["hm"] if int(r["val_pairs"]) == record["pairs"] else quick.get("hm", {})
        agree = f"{float(r['val_agreement']):6.3f}" if r.get("val_agreement") else "     -"
        print(f"{r['step']:>6} {float(r['elapsed_s']) / 60:9.2f} {float(r['steps_per_s']):8.2f} "
              f"{float(r['val_delta_e_cell']):8.3f} {float(r['val_delta_e']):8.3f} {agree}  "
              f"{hm.get('delta_e_cell', float('nan')):.3f}")  # fmt: skip
    print(f"final, {record['pairs']} held-out pairs:")
    print(f"{'':10} {'ΔE cell':>8} {'ΔE crop':>8} {'agreement':>9}")
    for name in ("input", "hm", "generated"):
        figures = record.get(name, {})
        agree = figures.get("agreement")
        print(f"{name:10} {figures.get('delta_e_cell', float('nan')):8.3f} {figures.get('delta_e', float('nan')):8.3f} "
              f"{'-' if agree is None else f'{agree:.4f}':>9}")  # fmt: skip
    print(f"beats HM on white-cell ΔE: {record.get('beats_hm')}")
    classifier = run.parent / "pbc-classifier.pt"
    if "agreement" not in record.get("generated", {}) and classifier.is_file():
        print("agreement with the target (measured after training, the run had no classifier):")
        for name, share in agreement_after(run, classifier).items():
            print(f"  {name:10} {share:.4f}")


def full_validation(run: Path, classifier: Path | None) -> dict:
    """The run's final generator, HM and the input on every pair of the other half (not every 5th).

    Training validates on a fifth of the other half to keep its checkpoints cheap; 106 cells make
    agreement move in steps of 0.9 %. This measures the same figures on all of them (about 530 cells),
    lists the cells whose class changed, and writes ``RUN/full-validation.json``.
    """
    import torch

    from cellbatch.export import generator_from_run
    from cellbatch.train import metrics
    from cellbatch.train.data import read_pairs
    from cellbatch.train.validate import HM_PROFILE_NAME, hm_outputs, validation_set

    settings = json.loads((run / "settings.json").read_text())
    half = Path(settings["pairs"]).name.removeprefix("pairs-")
    other = HALVES[1 - HALVES.index(half)]
    held_out = read_pairs(run.parent / f"pairs-{other}")
    val = validation_set(held_out.names, held_out.source, held_out.target, cell_diameter=settings["cell_diameter"])
    generator, _ = generator_from_run(run)
    outputs = {
        "input": val.source,
        "hm": hm_outputs(run / HM_PROFILE_NAME, val),
        "generated": metrics.generate(generator, val.source, device=torch.device("cpu"), batch_size=8),
    }
    classify = metrics.classifier_labels(str(classifier), device=torch.device("cpu")) if classifier else None
    truth = classify(val.target) if classify else None
    record: dict = {"pairs": len(val.names), "validated_on": f"pairs-{other}"}
    for name, images in outputs.items():
        record[name] = metrics.image_metrics(images, val.target, val.masks)
        if classify is not None:
            labels = classify(images)
            record[name]["agreement"] = float((labels == truth).mean())
            record[name]["changed_class"] = [val.names[i] for i in np.flatnonzero(labels != truth)]
    record["beats_hm"] = record["generated"]["delta_e_cell"] < record["hm"]["delta_e_cell"]
    (run / "full-validation.json").write_text(json.dumps(record, indent=1))
    return record


def report_full(run: Path) -> None:
    classifier = run.parent / "pbc-classifier.pt"
    record = full_validation(run, classifier if classifier.is_file() else None)
    print(f"\n## {run.name}: final generator on all {record['pairs']} pairs of {record['validated_on']}")
    print(f"{'':10} {'ΔE cell':>8} {'ΔE crop':>8} {'agreement':>9}  cells whose class changed")
    for name in ("input", "hm", "generated"):
        f = record[name]
        agree = f.get("agreement")
        changed = f.get("changed_class", [])
        shown = ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
        print(f"{name:10} {f['delta_e_cell']:8.3f} {f['delta_e']:8.3f} {'-' if agree is None else f'{agree:.4f}':>9}"
              f"  {len(changed)}: {shown}")
    print(f"beats HM on white-cell ΔE: {record['beats_hm']}")


def agreement_after(run: Path, classifier: Path) -> dict[str, float]:
    """Classifier agreement of the input, HM and the run's final generator with the target, on its held-out pairs."""
    import torch

    from cellbatch.export import generator_from_run
    from cellbatch.train import metrics
    from cellbatch.train.data import read_pairs
    from cellbatch.train.validate import HM_PROFILE_NAME, hm_outputs, validation_set

    settings = json.loads((run / "settings.json").read_text())
    held_out = read_pairs(settings["val_pairs"])
    val = validation_set(held_out.names, held_out.source, held_out.target, cell_diameter=settings["cell_diameter"])
    classify = metrics.classifier_labels(str(classifier), device=torch.device("cpu"))
    generator, _ = generator_from_run(run)
    outputs = {
        "input": val.source,
        "hm": hm_outputs(run / HM_PROFILE_NAME, val),
        "generated": metrics.generate(generator, val.source, device=torch.device("cpu"), batch_size=8),
    }
    truth = classify(val.target)
    return {name: float((classify(images) == truth).mean()) for name, images in outputs.items()}


def classifier_floor(out: Path) -> None:
    """How often the reference classifier changes its own mind: agreement of its class for each target
    cell of each half with its class for the same cell after an imperceptible change (Gaussian noise
    of 1 and 2 grey levels, a JPEG round trip at quality 95). A converter cannot be held to more
    agreement than this."""
    import cv2
    import torch

    from cellbatch.train import metrics
    from cellbatch.train.data import read_pairs
    from cellbatch.train.validate import validation_set

    classify = metrics.classifier_labels(str(out / "pbc-classifier.pt"), device=torch.device("cpu"))
    rng = np.random.default_rng(0)

    def noise(images: np.ndarray, sigma: float) -> np.ndarray:
        return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)

    def jpeg(images: np.ndarray) -> np.ndarray:
        return np.stack([cv2.imdecode(cv2.imencode(".jpg", i, [cv2.IMWRITE_JPEG_QUALITY, 95])[1], cv2.IMREAD_UNCHANGED)
                         for i in images])

    changes = {"noise 1 level": lambda x: noise(x, 1), "noise 2 levels": lambda x: noise(x, 2), "JPEG q95": jpeg}
    for half in HALVES:
        pairs = read_pairs(out / f"pairs-{half}")
        val = validation_set(pairs.names, pairs.source, pairs.target, cell_diameter=110.0)
        truth = classify(val.target)
        for name, change in changes.items():
            same = classify(change(val.target)) == truth
            print(f"{half} half ({len(truth)} cells), target vs target with {name}: agreement {same.mean():.4f} "
                  f"({int((~same).sum())} cells changed class)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["pairs", "train", "report", "full", "floor"])
    parser.add_argument("--out", type=Path, default=Path("train-pbc"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--setup", default="l1net")
    parser.add_argument("--train", choices=HALVES, default="even", help="the half to train on; the other validates")
    parser.add_argument("--time-limit", type=float, default=600.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vgg-weights", type=Path)
    parser.add_argument("--synthetic", type=int, default=0, metavar="N", help="pairs: N synthetic captures per half")
    args, extra = parser.parse_known_args()  # the rest (after --) goes to `cellbatch train`
    args.extra = [a for a in extra if a != "--"]
    if args.step == "pairs":
        if not args.synthetic and not args.data.is_dir():
            raise SystemExit(f"no PBC images at {args.data}: pass --data, or --synthetic N for synthetic pairs")
        make_pairs(args.out, args.data, args.synthetic)
    elif args.step == "train":
        run_training(args)
    elif args.step == "floor":
        classifier_floor(args.out)
    else:
        for run in sorted(args.out.glob("run-*")):
            if (run / "validation.json").is_file() and (run / "metrics.csv").is_file():
                report_run(run) if args.step == "report" else report_full(run)


if __name__ == "__main__":
    main()
