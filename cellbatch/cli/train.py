"""``cellbatch train``: train a generator with one of the thesis's four setups."""

from __future__ import annotations

from pathlib import Path

import click

from cellbatch.cli.options import (
    Command,
    cell_diameter_option,
    device_option,
    json_option,
    quiet_option,
    threads_option,
    use_threads,
)
from cellbatch.errors import ConfigError

SETUP_NAMES = ("l1net", "l1gan", "ccgan", "pcnet")


def _parse_weights(values: tuple[str, ...]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"--weight {item}: write NAME=NUMBER, e.g. --weight paired=10")
    return weights


@click.command("train", cls=Command)
@click.option(
    "--setup", type=click.Choice(SETUP_NAMES), required=True, help="Training setup (thesis 3.2-3.5)."
)
@click.option(
    "--pairs",
    type=click.Path(path_type=Path),
    required=True,
    help="Pairs folder from `cellbatch pair`: source/<name>.png and target/<name>.png, aligned.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest checkpoint.")
@click.option(
    "--unpaired-source", type=click.Path(path_type=Path), help="Extra DM1200-look crops (ccgan, pcnet)."
)
@click.option(
    "--unpaired-target", type=click.Path(path_type=Path), help="Extra DM96-look crops (ccgan, pcnet)."
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=50_000, show_default=True, help="Optimisation steps (at most)."
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Train for at most this many seconds (validation excluded), then validate and checkpoint. Options left "
    "unset then follow the device's recipe (docs/training.md) instead of the thesis's.",
)
@click.option(
    "--checkpoint-seconds",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="Also validate and checkpoint every S seconds of training [with --time-limit: a sixth of it].",
)
@click.option(
    "--batch-size", type=click.IntRange(min=2), help="Default per setup: l1net 8, l1gan/ccgan 4, pcnet 2."
)
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), help="Adam rate [2e-4; with --time-limit: the recipe's]."
)
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine"]),
    help="Learning rate over the run [constant; with --time-limit: the recipe's]. cosine decays to 2 % by the end.",
)
@click.option(
    "--predict",
    type=click.Choice(["image", "residual"]),
    help="What the generator outputs: the image (thesis) or a correction added to its input "
    "[image; with --time-limit: the recipe's].",
)
@click.option(
    "--weight",
    "weights",
    multiple=True,
    metavar="NAME=W",
    help="Loss weight, repeatable: l1, disc, paired, cycle, identity, feat (defaults: appendix A).",
)
@click.option(
    "--base-filters", type=click.IntRange(min=1), help="Generator width [32; with --time-limit: the recipe's]."
)
@click.option(
    "--disc-base-filters", type=click.IntRange(min=1), help="Discriminator width [2x --base-filters]."
)
@click.option(
    "--crop", type=click.IntRange(min=128), help="Train on random square crops of this size (128, 256)."
)
@click.option("--no-rotate", is_flag=True, help="No random 90/180/270-degree rotations.")
@click.option("--no-intensity", is_flag=True, help="No random intensity changes.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Share of pairs held out.")
@click.option(
    "--val-pairs",
    type=click.Path(path_type=Path),
    help="A pairs folder to validate on instead (captures never trained on); all of --pairs then trains.",
)
@cell_diameter_option
@click.option(
    "--val-quick",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    metavar="N",
    help="Checkpoints before the last validate on N held-out pairs spread over the set (0: all); the last on all.",
)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True, metavar="N",
              help="Validate, log and checkpoint every N steps.")  # fmt: skip
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--vgg-weights", type=click.Path(path_type=Path), help="pcnet: torchvision VGG-16 state dict.")
@click.option("--vgg-random", is_flag=True, help="pcnet: random VGG weights (tests only).")
@click.option("--classifier", type=click.Path(path_type=Path), help="Classifier model file: adds agreement.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--bf16/--no-bf16",
    default=None,
    help="bfloat16 autocast (GPUs; CPUs with AMX/AVX512-BF16) [off; with --time-limit: on where fast].",
)
@click.option(
    "--ema",
    type=click.FloatRange(min=0, max=1, max_open=True),
    metavar="DECAY",
    help="Validate and export a moving average of the generator's weights and batch-norm statistics, "
    "each step keeping DECAY of it (0.999: the last ~1,000 steps) [0: the generator itself; with --time-limit: "
    "the recipe's].",
)
@device_option
@threads_option
@quiet_option
@json_option
def train(
    setup: str,
    pairs: Path,
    out: Path,
    resume: bool,
    unpaired_source: Path | None,
    unpaired_target: Path | None,
    steps: int,
    time_limit: float | None,
    checkpoint_seconds: float | None,
    batch_size: int | None,
    lr: float | None,
    lr_schedule: str | None,
    predict: str | None,
    weights: tuple[str, ...],
    base_filters: int | None,
    disc_base_filters: int | None,
    crop: int | None,
    no_rotate: bool,
    no_intensity: bool,
    val_fraction: float,
    val_pairs: Path | None,
    cell_diameter: float,
    val_quick: int,
    checkpoint_every: int,
    keep_checkpoints: int,
    vgg_weights: Path | None,
    vgg_random: bool,
    classifier: Path | None,
    seed: int,
    bf16: bool | None,
    ema: float | None,
    device: str,
    threads: int | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Train a DM1200 -> DM96 generator on aligned pairs; export it with `cellbatch model export RUN`.

    Writes RUN/settings.json, RUN/checkpoints/, RUN/metrics.csv (one row per checkpoint: losses and
    validation l1, PSNR, SSIM, CIEDE2000 ΔE over the crop and over the white cell, agreement),
    RUN/validation.json (with the untransformed input's figures and those of HM fitted on the same
    training pairs, RUN/hm-baseline.json, as the baselines to beat) and RUN/montage/step-N.png
    (validation cells: input | generated | target).
    """
    import json

    use_threads(threads, command="train", device=device)
    from cellbatch.train.loop import TrainSettings, beats_hm
    from cellbatch.train.loop import train as run_training

    settings = TrainSettings(
        setup=setup,
        pairs=str(pairs),
        steps=steps,
        time_limit=time_limit,
        checkpoint_seconds=checkpoint_seconds,
        batch_size=batch_size or 0,
        lr=lr or 0.0,
        lr_schedule=lr_schedule or "",
        predict=predict or "",
        weights=_parse_weights(weights),
        base_filters=base_filters or 0,
        disc_base_filters=disc_base_filters or 0,
        seed=seed,
        bf16=bf16,
        ema=ema,
        rotate=not no_rotate,
        intensity=not no_intensity,
        crop=crop,
        val_fraction=val_fraction,
        val_pairs=None if val_pairs is None else str(val_pairs),
        cell_diameter=cell_diameter,
        val_quick=val_quick,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        vgg_weights=None if vgg_weights is None else str(vgg_weights),
        vgg_random=vgg_random,
        classifier=None if classifier is None else str(classifier),
        unpaired_source=None if unpaired_source is None else str(unpaired_source),
        unpaired_target=None if unpaired_target is None else str(unpaired_target),
    )
    result = run_training(settings, out, device=device, resume=resume, progress=not quiet)
    summary = {
        "run": str(result.run),
        "step": result.step,
        "seconds": round(result.seconds, 2),
        "steps_per_s": round(result.steps_per_s, 3),
        "input": result.baseline,
        "hm": result.hm,
        "generated": result.validation,
        "beats_hm": beats_hm({"generated": result.validation, "hm": result.hm}),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"{setup}: {result.step} steps in {result.seconds:.1f} s ({result.steps_per_s:.2f} steps/s) -> {out}"
    )
    click.echo(f"  {'validation':12s} {'generated':>9s} {'HM':>9s} {'input':>9s}")
    for name in ("l1", "delta_e", "delta_e_cell", "psnr", "ssim", "agreement"):
        if name in result.validation:
            click.echo(
                f"  {name:12s} {result.validation[name]:9.4f} {result.hm.get(name, float('nan')):9.4f}"
                f" {result.baseline[name]:9.4f}"
            )
    verdict = summary["beats_hm"]
    click.echo(f"  beats HM (white-cell ΔE): {'yes' if verdict else 'not yet' if verdict is False else 'n/a'}")
