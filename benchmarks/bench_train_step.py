"""Training steps per second of the time-limit recipe on this machine, and what the thread setup costs.

Times the body of ``cellbatch train``'s loop (draw an augmented batch, one optimisation step) for the
recipe ``--time-limit`` picks on the device, in fresh processes, one per way of setting up the native
thread pools (OpenMP reads its wait policy when it loads):

* ``cli``: what ``cellbatch train`` sets (``cellbatch.threads.prepare_native_runtimes("train")``:
  OpenMP's default wait, huge pages for torch, one OpenBLAS thread);
* ``passive``: the same with ``OMP_WAIT_POLICY=PASSIVE``, what ``run`` sets and ``train`` set before;
* ``ema``: ``cli`` keeping a moving average of the generator (``--ema 0.999``), what it costs a step;

and prints steps/s, milliseconds a step, the cores the process kept busy, and the ratio of the two
measured in one run. Pairs: ``--pairs FOLDER`` (e.g. ``BENCH/pairs-even`` of ``train_pbc.py``), else
64 synthetic pairs written to a temporary folder.

    python benchmarks/bench_train_step.py                       # CPU, synthetic pairs
    python benchmarks/bench_train_step.py --pairs BENCH/pairs-even --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (environment, --ema decay)
SETUPS = {"cli": ({}, 0.0), "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0.0), "ema": ({}, 0.999)}


def measure(pairs: str, setup: str, steps: int, device: str, ema: float) -> dict:
    """In this (fresh) process: steps/s of the loop body for ``setup`` (environment already set)."""
    from cellbatch.threads import prepare_native_runtimes

    prepare_native_runtimes("train")
    import numpy as np
    import torch

    from cellbatch.cli.options import use_threads
    from cellbatch.train.data import read_pairs
    from cellbatch.train.loop import TrainSettings, _Sampler, resolve_settings
    from cellbatch.train.setups import SETUP_CLASSES

    use_threads(None, command="train", device=device)
    dev = torch.device(device)
    settings = resolve_settings(TrainSettings(setup=setup, pairs=pairs, time_limit=600.0), dev.type)
    data = read_pairs(pairs)
    trainer = SETUP_CLASSES[setup](
        weights=settings.weights, base_filters=settings.base_filters, disc_base_filters=settings.disc_base_filters,
        lr=settings.lr, device=dev, bf16=bool(settings.bf16), vgg=None, residual=settings.predict == "residual",
        ema=ema,
    )
    sampler = _Sampler(settings, data, np.arange(len(data.names)))
    rng = np.random.default_rng(0)
    for _ in range(10):  # warm up: allocator, oneDNN primitives
        trainer.step(sampler.batch(rng, dev))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.step(sampler.batch(rng, dev))
    wall = time.perf_counter() - wall
    return {
        "steps_per_s": steps / wall, "ms_per_step": 1e3 * wall / steps, "cores": (time.process_time() - cpu) / wall,
        "recipe": {k: getattr(settings, k) for k in ("base_filters", "batch_size", "crop", "bf16", "predict")},
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", help="pairs folder (default: 64 synthetic pairs)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--setup", default="l1net", choices=("l1net",))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--measure", choices=tuple(SETUPS), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--ema", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.pairs, args.setup, args.steps, args.device, args.ema)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        pairs = args.pairs
        if pairs is None:
            from cellbatch.train.synthpairs import pairs_from_synth

            pairs = str(pairs_from_synth(Path(tmp) / "pairs", count=64, seed=0))
        results = {}
        for name, (extra, ema) in SETUPS.items():
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | extra
            cmd = [sys.executable, __file__, "--measure", name, "--pairs", pairs, "--steps", str(args.steps),
                   "--setup", args.setup, "--device", args.device, "--ema", str(ema)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    print(f"machine: {os.cpu_count()} cores ({platform.machine()}), device {args.device}, "
          f"torch threads {first['torch_threads']}, load average {os.getloadavg()[0]:.2f}")
    print(f"{args.setup}, recipe of --time-limit: {first['recipe']}; {args.steps} steps each, fresh process each")
    print(f"{'thread setup':14} {'steps/s':>8} {'ms/step':>8} {'cores busy':>10}")
    for name, r in results.items():
        print(f"{name:14} {r['steps_per_s']:8.2f} {r['ms_per_step']:8.1f} {r['cores']:10.2f}")
    print(f"ratio cli / passive: {results['cli']['steps_per_s'] / results['passive']['steps_per_s']:.2f}x steps/s")
    print(f"ratio ema / cli: {results['ema']['steps_per_s'] / results['cli']['steps_per_s']:.2f}x steps/s")


if __name__ == "__main__":
    main()
