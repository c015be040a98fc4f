"""Training defaults: the thesis's (appendix A) without a time limit, a measured recipe with one.

``cellbatch train --time-limit SECONDS`` promises the best generator that budget buys on the device
given, so options the user leaves unset follow :data:`RECIPES` for that device instead of the
thesis's 50,000-step setting. Every figure behind the recipes is in docs/training.md ("Training to a
time limit"). Options the user sets always win; the thesis's setups and architecture stay exactly
available (``--predict image --lr-schedule constant`` and the thesis's width, batch and rate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from cellbatch.precision import cpu_has_native_bf16

if TYPE_CHECKING:
    from cellbatch.train.loop import TrainSettings

THESIS_BASE_FILTERS = 32
THESIS_LR = 2e-4


@dataclass(frozen=True)
class Recipe:
    """The unset options of a time-limited run on one kind of device (0 / None: the thesis's)."""

    base_filters: int
    lr: float
    crop: int | None
    batch_size: int  # 0: the setup's batch size from appendix A
    bf16: bool
    lr_schedule: str
    predict: str
    ema: float  # decay of the exported moving average of G (0: G itself)


THESIS = Recipe(
    base_filters=THESIS_BASE_FILTERS, lr=THESIS_LR, crop=None, batch_size=0, bf16=False,
    lr_schedule="constant", predict="image", ema=0.0,
)  # fmt: skip
RECIPES: dict[str, Recipe] = {
    # A CPU buys a few thousand small steps in minutes: a narrow network on 128x128 crops, bfloat16
    # where the CPU has AMX / AVX512-BF16 (2.1-2.8x faster training steps here), a higher rate that a
    # cosine schedule brings down by the end, and the network predicting a correction to its input.
    # Both recipes export a moving average of the generator over its last ~1,000 steps: batch norm's
    # running statistics alone follow the last ~10 augmented batches, and final generators of one
    # recipe differed by 0.885-1.000 white-cell ΔE and 6-19 class changes (docs/training.md).
    "cpu": Recipe(base_filters=8, lr=1e-3, crop=128, batch_size=0, bf16=True, lr_schedule="cosine", predict="residual",
                  ema=0.999),
    # A GPU buys tens of thousands of steps: the thesis's width, whole 256x256 pairs, bfloat16.
    "cuda": Recipe(
        base_filters=32, lr=5e-4, crop=None, batch_size=8, bf16=True, lr_schedule="cosine", predict="residual",
        ema=0.999,
    ),
}  # fmt: skip


def recipe_for(device_type: str) -> Recipe:
    recipe = RECIPES["cuda" if device_type == "cuda" else "cpu"]
    # bfloat16 only where the CPU computes it natively (AMX or AVX512-BF16): emulated, it is slower
    if device_type != "cuda" and recipe.bf16 and not cpu_has_native_bf16():
        recipe = replace(recipe, bf16=False)
    return recipe


def fill_defaults(settings: TrainSettings, device_type: str) -> TrainSettings:
    """``settings`` with every unset option (0, None, "") filled from the thesis or the device's recipe."""
    recipe = THESIS if settings.time_limit is None else recipe_for(device_type)
    current = asdict(settings)
    filled = {}
    for name, value in asdict(recipe).items():
        given = current[name]
        # crop 0 and ema 0 are choices (whole pairs, no average), not unset
        unset = given is None or (given in (0, "") and not isinstance(given, bool) and name not in ("crop", "ema"))
        filled[name] = value if unset else given
    if filled["crop"] == 0:  # 0: whole pairs, whatever the recipe says
        filled["crop"] = None
    return replace(settings, **filled)
