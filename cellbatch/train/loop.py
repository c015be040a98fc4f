"""The training loop: settings, checkpoints and resume, validation, metrics.

``train(settings, run)`` trains one setup on a pairs folder and writes the run folder described in
:mod:`cellbatch.train.checkpoint`. A checkpoint holds the step, the networks, the optimiser states
and the random-number states, so ``resume=True`` continues the same sequence of batches: training
N steps at once and training in two parts give the same weights on the same machine.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellbatch.atomic import atomic_write
from cellbatch.errors import ConfigError
from cellbatch.generate import device_name, resolve_device
from cellbatch.models.generator import TILE_MULTIPLE
from cellbatch.models.vgg import load_vgg16
from cellbatch.train import metrics
from cellbatch.train.checkpoint import (
    METRICS_NAME,
    SETTINGS_NAME,
    VALIDATION_NAME,
    list_checkpoints,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_json,
)
from cellbatch.train.data import (
    AugmentSettings,
    PairSet,
    augment,
    read_pairs,
    read_unpaired,
    sample_unpaired,
    split_indices,
)
from cellbatch.train.recipe import fill_defaults
from cellbatch.train.setups import CYCLIC, DEFAULT_BATCH, SETUP_CLASSES, SETUPS, Batch, Setup, resolve_weights
from cellbatch.train.validate import (
    HM_PROFILE_NAME,
    MONTAGE_DIR,
    fit_hm_baseline,
    hm_outputs,
    montage,
    validation_set,
)

VALIDATION_BATCH = 8
# Settings that may change between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = frozenset(
    {"steps", "checkpoint_every", "keep_checkpoints", "time_limit", "checkpoint_seconds", "val_quick"}
)
# A time-limited run validates this many times (plus at the end) unless --checkpoint-seconds says otherwise.
CURVE_POINTS = 6
# The cosine schedule ends at this share of the initial learning rate, not at zero.
MIN_LR_FACTOR = 0.02
PREDICT = ("image", "residual")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a training run (written to ``RUN/settings.json``)."""

    setup: str
    pairs: str
    steps: int = 50_000
    batch_size: int = 0  # 0: the setup's batch size from appendix A (or the time-limit recipe)
    lr: float = 0.0  # 0: 2e-4 (appendix A) or the time-limit recipe
    weights: Mapping[str, float] = field(default_factory=dict)
    base_filters: int = 0  # 0: 32, or the time-limit recipe
    disc_base_filters: int = 0  # 0: twice base_filters
    seed: int = 0
    bf16: bool | None = None  # None: off, or the time-limit recipe
    ema: float | None = None  # decay of G's moving average (0: none, the thesis); None: 0 or the recipe's
    rotate: bool = True
    intensity: bool = True
    crop: int | None = None  # None: whole pairs, or the time-limit recipe; 0: whole pairs always
    time_limit: float | None = None  # seconds of training; with it, unset options follow the device's recipe
    checkpoint_seconds: float | None = None  # also validate every this many seconds of training
    lr_schedule: str = ""  # "": constant, or the time-limit recipe
    predict: str = ""  # "": image (the thesis), or the time-limit recipe
    val_pairs: str | None = None  # a separate pairs folder to validate on (then all of `pairs` trains)
    cell_diameter: float = 110.0  # for the white-cell masks of validation
    val_quick: int = 64  # checkpoints before the last validate on this many held-out pairs (0: all)
    val_fraction: float = 0.1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    vgg_weights: str | None = None
    vgg_random: bool = False
    classifier: str | None = None
    unpaired_source: str | None = None
    unpaired_target: str | None = None


def resolve_settings(settings: TrainSettings, device_type: str = "cpu") -> TrainSettings:
    """Fill the setup's defaults (batch size, loss weights) and check options against each other.

    Without a time limit every unset option takes the thesis's value; with one, the recipe of
    :mod:`cellbatch.train.recipe` for ``device_type`` (``cpu`` or ``cuda``).
    """
    s = settings
    if s.setup not in SETUPS:
        raise ConfigError(f"--setup {s.setup} is unknown: use one of {', '.join(SETUPS)}")
    if s.time_limit is not None and s.time_limit <= 0:
        raise ConfigError(f"--time-limit {s.time_limit:g} must be a positive number of seconds")
    if s.predict and s.predict not in PREDICT:
        raise ConfigError(f"--predict {s.predict} is unknown: use one of {', '.join(PREDICT)}")
    if s.lr_schedule and s.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"--lr-schedule {s.lr_schedule} is unknown: use one of {', '.join(LR_SCHEDULES)}")
    s = fill_defaults(s, device_type)
    batch = s.batch_size or DEFAULT_BATCH[s.setup]
    # Batch norm in the innermost block sees one value per channel per image at 128x128.
    if batch < 2:
        raise ConfigError(f"--batch-size {batch} is too small: batch norm needs at least 2")
    if not 0 <= s.ema < 1:
        raise ConfigError(f"--ema {s.ema:g} must lie in [0, 1): the share of the average each step keeps")
    if s.steps < 1 or s.checkpoint_every < 1 or s.keep_checkpoints < 1:
        raise ConfigError("--steps, --checkpoint-every and the number of kept checkpoints must be at least 1")
    if s.crop is not None and (s.crop < TILE_MULTIPLE or s.crop % TILE_MULTIPLE):
        raise ConfigError(f"--crop {s.crop} is not a multiple of {TILE_MULTIPLE}: use 128 or 256")
    if not 0 < s.val_fraction < 1:
        raise ConfigError(f"--val-fraction {s.val_fraction} must lie between 0 and 1")
    if s.setup == "pcnet":
        if s.vgg_weights is None and not s.vgg_random:
            raise ConfigError(
                "pcnet needs VGG-16 weights: pass --vgg-weights FILE (a torchvision vgg16 state dict); "
                "--vgg-random is for tests only"
            )
        if s.vgg_weights is not None and s.vgg_random:
            raise ConfigError("--vgg-weights and --vgg-random exclude each other: pass one")
    elif s.vgg_weights is not None or s.vgg_random:
        raise ConfigError(f"--vgg-weights and --vgg-random apply to pcnet only, not {s.setup}")
    if (s.unpaired_source is None) != (s.unpaired_target is None):
        raise ConfigError("--unpaired-source and --unpaired-target go together: pass both or neither")
    if s.unpaired_source is not None and s.setup not in CYCLIC:
        raise ConfigError(f"unpaired folders feed the cycle terms of ccgan and pcnet, not {s.setup}")
    return TrainSettings(
        **{
            **asdict(s),
            "batch_size": batch,
            "weights": resolve_weights(s.setup, s.weights),
            "disc_base_filters": s.disc_base_filters or 2 * s.base_filters,
        }
    )


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or resumed-and-finished) run reports."""

    run: Path
    step: int
    seconds: float
    steps_per_s: float
    baseline: dict[str, float]
    validation: dict[str, float]
    hm: dict[str, float] = field(default_factory=dict)


def _check_resume(stored: Mapping[str, Any], settings: TrainSettings, data_sha256: str) -> None:
    current = asdict(settings)
    for key, value in stored.items():
        if key in RESUMABLE_CHANGES or key == "data_sha256" or key not in current:
            continue
        if current[key] != value:
            raise ConfigError(
                f"--resume: {key} was {value!r} when the run started, now {current[key]!r}: "
                "pass the same options, or start a new --out"
            )
    if stored.get("data_sha256") != data_sha256:
        raise ConfigError("--resume: the pairs folder changed since the run started: start a new --out")


class _MetricsLog:
    """``metrics.csv`` (and TensorBoard when installed), cut back to the resumed step."""

    def __init__(self, run: Path, start_step: int) -> None:
        self.path = run / METRICS_NAME
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start_step]
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional: metrics.csv holds the same figures
            pass
        else:
            self.tensorboard = SummaryWriter(str(run / "tensorboard"), purge_step=start_step + 1)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        with atomic_write(self.path, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()


class _Sampler:
    """Draws the augmented batches of one step from the training pairs (and unpaired folders)."""

    def __init__(self, settings: TrainSettings, pairs: PairSet, train_idx: np.ndarray) -> None:
        self.settings = settings
        self.pairs = pairs
        self.train_idx = train_idx
        self.size = settings.crop or pairs.source.shape[1]
        self.crop_aug = AugmentSettings(settings.rotate, settings.intensity, settings.crop)
        self.plain_aug = AugmentSettings(settings.rotate, settings.intensity, None)
        self.unpaired = None
        if settings.unpaired_source is not None and settings.unpaired_target is not None:
            self.unpaired = (
                read_unpaired(settings.unpaired_source, min_size=self.size),
                read_unpaired(settings.unpaired_target, min_size=self.size),
            )

    def _indices(self, rng: np.random.Generator) -> np.ndarray:
        n = self.settings.batch_size
        return rng.choice(self.train_idx, size=n, replace=len(self.train_idx) < n)

    def batch(self, rng: np.random.Generator, device: torch.device) -> Batch:
        idx = self._indices(rng)
        x_p, y_p = augment([self.pairs.source[idx], self.pairs.target[idx]], rng=rng, settings=self.crop_aug)
        x = y = None
        if self.settings.setup in CYCLIC:
            n = self.settings.batch_size
            if self.unpaired is not None:
                xs = sample_unpaired(self.unpaired[0], n, self.size, rng=rng)
                ys = sample_unpaired(self.unpaired[1], n, self.size, rng=rng)
                (x,) = augment([xs], rng=rng, settings=self.plain_aug)
                (y,) = augment([ys], rng=rng, settings=self.plain_aug)
            else:
                # Without unpaired folders, the pairs drawn independently serve as unpaired images.
                (x,) = augment([self.pairs.source[self._indices(rng)]], rng=rng, settings=self.crop_aug)
                (y,) = augment([self.pairs.target[self._indices(rng)]], rng=rng, settings=self.crop_aug)
        return Batch(
            x_p=x_p.to(device),
            y_p=y_p.to(device),
            x=None if x is None else x.to(device),
            y=None if y is None else y.to(device),
        )


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(rng: np.random.Generator, state: Mapping[str, Any]) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    settings: TrainSettings,
    run: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train ``settings.setup`` on ``settings.pairs`` and write the run folder ``run``.

    Parameters
    ----------
    settings : TrainSettings
        Resolved here with :func:`resolve_settings`.
    run : str or Path
        The run folder. Without ``resume`` it must not hold checkpoints already.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    resume : bool
        Continue from the newest checkpoint (a run without one starts from step 0).
    progress : bool
        Show a progress bar (only when stderr is a terminal).
    """
    from tqdm import tqdm

    run = Path(run)
    dev = torch.device(resolve_device(device))
    settings = resolve_settings(settings, dev.type)
    checkpoints = list_checkpoints(run)
    if checkpoints and not resume:
        raise ConfigError(
            f"{run} already holds a training run: pass --resume to continue it, or another --out"
        )

    pairs = read_pairs(settings.pairs)
    size = pairs.source.shape[1:3]
    if size[0] % TILE_MULTIPLE or size[1] % TILE_MULTIPLE:
        raise ConfigError(
            f"pairs in {settings.pairs} are {size[1]}x{size[0]}: sides must be multiples of {TILE_MULTIPLE}"
        )
    if settings.crop is not None and settings.crop > min(size):
        raise ConfigError(f"--crop {settings.crop} is larger than the {size[1]}x{size[0]} pairs")
    if settings.val_pairs is not None:
        held_out = read_pairs(settings.val_pairs)
        train_idx = np.arange(len(pairs.names))
        val_names, val_source, val_target = held_out.names, held_out.source, held_out.target
        data_sha256 = f"{pairs.sha256}+{held_out.sha256}"
    else:
        train_idx, val_idx = split_indices(len(pairs.names), val_fraction=settings.val_fraction, seed=settings.seed)
        val_names = tuple(pairs.names[i] for i in val_idx)
        val_source, val_target = pairs.source[val_idx], pairs.target[val_idx]
        data_sha256 = pairs.sha256

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    vgg = None
    if settings.setup == "pcnet":
        vgg = load_vgg16(None if settings.vgg_random else settings.vgg_weights, seed=settings.seed)
    setup: Setup = SETUP_CLASSES[settings.setup](
        weights=settings.weights,
        base_filters=settings.base_filters,
        disc_base_filters=settings.disc_base_filters,
        lr=settings.lr,
        device=dev,
        bf16=bool(settings.bf16),
        vgg=vgg,
        residual=settings.predict == "residual",
        ema=float(settings.ema or 0.0),
    )
    start_step, elapsed = 0, 0.0
    if checkpoints:
        state = load_checkpoint(checkpoints[-1][1])
        _check_resume(read_json(run / SETTINGS_NAME) or state["settings"], settings, data_sha256)
        setup.load_state_dict(state)
        _set_rng_state(rng, state["rng"])
        start_step, elapsed = int(state["step"]), float(state["elapsed_s"])

    run.mkdir(parents=True, exist_ok=True)
    stored_settings = {**asdict(settings), "data_sha256": data_sha256}
    write_json(run / SETTINGS_NAME, stored_settings)
    classify = metrics.classifier_labels(settings.classifier, device=dev) if settings.classifier else None
    val = validation_set(val_names, val_source, val_target, cell_diameter=settings.cell_diameter)
    quick = val.subset(settings.val_quick)
    record = read_json(run / VALIDATION_NAME) or {}
    if "hm" not in record or record.get("quick", {}).get("pairs") != len(quick.names):
        profile = fit_hm_baseline(
            pairs.source[train_idx],
            pairs.target[train_idx],
            run / HM_PROFILE_NAME,
            cell_diameter=settings.cell_diameter,
        )
        record = {
            "pairs": len(val_names),
            "val_names": list(val_names),
            "input": metrics.figures(val.source, val.target, classify, val.masks),
            "hm": metrics.figures(hm_outputs(profile, val), val.target, classify, val.masks),
        }
        record["quick"] = {
            "pairs": len(quick.names),
            "input": metrics.figures(quick.source, quick.target, classify, quick.masks),
            "hm": metrics.figures(hm_outputs(profile, quick), quick.target, classify, quick.masks),
        }
        write_json(run / VALIDATION_NAME, record)

    sampler = _Sampler(settings, pairs, train_idx)
    log = _MetricsLog(run, start_step)
    clock = _Clock(settings, elapsed)
    cpu_start = time.process_time()
    sums: dict[str, torch.Tensor] = {}
    interval_steps = 0
    bar = tqdm(
        total=settings.steps,
        initial=start_step,
        unit="step",
        disable=not progress or not sys.stderr.isatty(),
        desc=settings.setup,
    )
    step = start_step
    with bar:
        for step in range(start_step + 1, settings.steps + 1):
            if settings.lr_schedule == "cosine":
                setup.set_lr(clock.lr_factor(step))
            terms = setup.step(sampler.batch(rng, dev))
            for key, value in terms.items():
                sums[key] = sums[key] + value if key in sums else value
            interval_steps += 1
            bar.update(1)
            if not bar.disable and step % 25 == 0:  # reading a loss waits for the device: not every step
                bar.set_postfix(total=f"{float(terms['total']):.3f}", refresh=False)
            if not clock.checkpoint_due(step):
                continue
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)  # so the interval's time includes its queued GPU work
            seconds = clock.end_interval()
            last = step == settings.steps or clock.out_of_time()
            on = val if last else quick
            generated = metrics.generate(setup.result, on.source, device=dev, batch_size=VALIDATION_BATCH)
            figures = metrics.figures(generated, on.target, classify, on.masks)
            montage(on, generated, run / MONTAGE_DIR / f"step-{step:08d}.png")
            log.add(
                {
                    "step": step,
                    "elapsed_s": round(clock.elapsed, 3),
                    "steps_per_s": round(interval_steps / seconds, 4),
                    "cpu_s": round(time.process_time() - cpu_start, 1),  # this process, validation included
                    "lr": setup.optimizers["G"].param_groups[0]["lr"],
                    "val_pairs": len(on.names),
                    **{f"loss_{k}": round(float(v) / interval_steps, 6) for k, v in sums.items()},
                    **{f"val_{k}": round(v, 6) for k, v in figures.items()},
                }
            )
            record = {**record, "step": step, "elapsed_s": clock.elapsed}
            if on is val:
                record["generated"] = figures
                record["beats_hm"] = beats_hm(record)
            else:
                record["quick"] = {**record["quick"], "step": step, "generated": figures}
                record["quick"]["beats_hm"] = beats_hm(record["quick"])
            write_json(run / VALIDATION_NAME, record)
            save_checkpoint(
                {
                    "step": step,
                    "elapsed_s": clock.elapsed,
                    "settings": stored_settings,
                    "device": device_name(str(dev)),
                    **setup.state_dict(),
                    "rng": _rng_state(rng),
                },
                run,
                step,
                keep=settings.keep_checkpoints,
            )
            sums, interval_steps = {}, 0
            clock.start_interval()
            if last:
                break
    return TrainResult(
        run=run,
        step=step,
        seconds=clock.elapsed,
        steps_per_s=step / clock.elapsed if clock.elapsed else 0.0,
        baseline=record["input"],
        validation=record.get("generated", {}),
        hm=record["hm"],
    )


def beats_hm(record: Mapping[str, Any]) -> bool | None:
    """Whether the generator's white-cell ΔE (whole-crop ΔE where no cell was found) is below HM's."""
    generated, hm = record.get("generated"), record.get("hm")
    if not generated or not hm:
        return None
    key = "delta_e_cell" if "delta_e_cell" in generated and "delta_e_cell" in hm else "delta_e"
    return bool(generated[key] < hm[key])


class _Clock:
    """Training time (validation excluded), the time limit, when to validate, and the cosine schedule."""

    def __init__(self, settings: TrainSettings, elapsed: float) -> None:
        self.settings = settings
        self.elapsed = elapsed  # training seconds up to the start of this interval
        limit = settings.time_limit
        self.every_s = settings.checkpoint_seconds or (limit / CURVE_POINTS if limit else None)
        self.last_checkpoint = elapsed
        self.start_interval()

    def start_interval(self) -> None:
        self.interval_start = time.perf_counter()

    def now(self) -> float:
        return self.elapsed + time.perf_counter() - self.interval_start

    def end_interval(self) -> float:
        seconds = time.perf_counter() - self.interval_start
        self.elapsed += seconds
        self.last_checkpoint = self.elapsed
        return seconds

    def out_of_time(self) -> bool:
        return self.settings.time_limit is not None and self.elapsed >= self.settings.time_limit

    def checkpoint_due(self, step: int) -> bool:
        s = self.settings
        if step % s.checkpoint_every == 0 or step == s.steps:
            return True
        now = self.now()
        if s.time_limit is not None and now >= s.time_limit:
            return True
        return self.every_s is not None and now - self.last_checkpoint >= self.every_s

    def lr_factor(self, step: int) -> float:
        """Cosine from 1 to MIN_LR_FACTOR over the time limit (or, without one, over the steps)."""
        s = self.settings
        done = self.now() / s.time_limit if s.time_limit else (step - 1) / s.steps
        return MIN_LR_FACTOR + (1.0 - MIN_LR_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
