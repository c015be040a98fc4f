"""CIEDE2000 helpers (cellbatch.colour)."""

from __future__ import annotations

import numpy as np
import pytest

from cellbatch.colour import delta_e_map, mean_delta_e, rgb_to_lab


def test_black_and_white_are_100_apart_and_equal_colours_0() -> None:
    black, white = np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), 255, np.uint8)
    assert delta_e_map(black, white)[0, 0] == pytest.approx(100, abs=0.01)
    assert mean_delta_e(white, white) == 0
    assert rgb_to_lab(white)[0, 0].tolist() == pytest.approx([100, 0, 0], abs=0.01)


def test_mean_delta_e_over_a_mask_only() -> None:
    a = np.full((2, 2, 3), 128, np.uint8)
    b = a.copy()
    b[0, 0] = 0
    mask = np.ones((2, 2), bool)
    mask[0, 0] = False
    assert mean_delta_e(a, b, mask=mask) == 0
    assert mean_delta_e(a, b) == pytest.approx(delta_e_map(a, b)[0, 0] / 4)
    assert delta_e_map(a, b)[0, 0] > 30


def test_shape_and_dtype_mistakes_raise() -> None:
    with pytest.raises(ValueError, match="differs from reference shape"):
        delta_e_map(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        rgb_to_lab(np.zeros((2, 2, 3), np.float32))
