"""Display normalisation: option syntax, constant background, nucleus contrast, with and without masks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cellbatch.detect.base import BACKGROUND, NUCLEUS
from cellbatch.errors import ConfigError
from cellbatch.normalise.display import DisplayNormaliser, DisplaySettings, parse_display_options
from tests.test_normalise_hm import scene, to_uint8


def test_options_parse_with_defaults_for_what_is_left_out() -> None:
    s = parse_display_options("background=240,230,230; nucleus_gain=1.5")
    assert s == DisplaySettings(background=(240, 230, 230), nucleus_gain=1.5)
    assert parse_display_options(None) == DisplaySettings()
    assert parse_display_options("softness=0;contrast=1") == DisplaySettings(softness=0.0, contrast=1.0)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("background=240,230", "background=.* is not valid"),
        ("background=300,0,0", "is not valid"),
        ("nucleus_gain=-1", "is not valid"),
        ("nucleus_gain=abc", "is not valid"),
        ("gamma=2", "has no option 'gamma'"),
        ("softness=1e9", "softness='1e9' is not valid"),
        ("softness=inf", "is not valid"),
        ("contrast=1e308", "is not valid"),
        ("nucleus_gain=nan", "is not valid"),
        ("nucleus_gain", "has no '='"),
    ],
)
def test_bad_options_are_one_line_config_errors_with_the_syntax(arg: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        DisplayNormaliser(arg)
    assert "display:background=R,G,B" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("use_masks", [True, False])
def test_background_becomes_the_constant_colour(use_masks: bool) -> None:
    img, lab = scene(np.random.default_rng(0), 256)
    crops = to_uint8(img)[None]
    out = DisplayNormaliser("background=240,230,230")(crops, lab[None] if use_masks else None)[0]
    deep_background = (lab == BACKGROUND) & (np.abs(np.gradient(lab.astype(float))).sum(axis=0) == 0)
    deep_background[:8], deep_background[-8:], deep_background[:, :8], deep_background[:, -8:] = (False,) * 4
    colours = out[deep_background].astype(float)
    assert np.abs(colours.mean(axis=0) - [240, 230, 230]).max() < 1.5
    assert colours.std(axis=0).max() < 2.0  # flattened, not just shifted (input texture std 2.5)


@pytest.mark.parametrize("use_masks", [True, False])
def test_nucleus_gain_raises_contrast_inside_the_nucleus(use_masks: bool) -> None:
    img, lab = scene(np.random.default_rng(1), 256)
    crops, masks = to_uint8(img)[None], (lab[None] if use_masks else None)
    inner = lab == NUCLEUS
    flat = DisplayNormaliser("nucleus_gain=1;contrast=1")(crops, masks)[0][inner].astype(float)
    gained = DisplayNormaliser("nucleus_gain=1.5;contrast=1")(crops, masks)[0][inner].astype(float)
    ratio = gained.std(axis=0) / flat.std(axis=0)
    assert (ratio > 1.3).all() and (ratio < 1.6).all()


def test_display_keeps_shape_dtype_and_pickles() -> None:
    img, lab = scene(np.random.default_rng(2))
    crops = np.stack([to_uint8(img)] * 2)
    norm = pickle.loads(pickle.dumps(DisplayNormaliser("background=235,235,235")))
    out = norm(crops, np.stack([lab] * 2))
    assert out.shape == crops.shape and out.dtype == np.uint8
    assert norm.provenance() == {
        "name": "display",
        "arg": "background=235,235,235",
        "settings": {"background": (235, 235, 235), "nucleus_gain": 1.3, "contrast": 1.1, "softness": 2.0},
    }
