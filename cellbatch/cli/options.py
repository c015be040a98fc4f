"""Click options shared by several commands, so each is spelled and documented once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]


def cell_diameter_option(f: F) -> F:
    return click.option(
        "--cell-diameter",
        type=click.FloatRange(min=8),
        default=110.0,
        show_default=True,
        metavar="PX",
        help="Expected white-cell diameter in pixels (DM captures at 0.1 µm/px: about 110); "
        "every size threshold scales with it.",
    )(f)


def detector_option(f: F) -> F:
    return click.option(
        "--detector",
        default="threshold",
        show_default=True,
        help="White-cell detector from the cellbatch.detectors registry.",
    )(f)


def device_option(f: F) -> F:
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (CUDA when present), cpu, cuda or cuda:N.",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")(f)


def quiet_option(f: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(f)
