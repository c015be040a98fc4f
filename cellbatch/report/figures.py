"""The report's plots (matplotlib, Agg, no pyplot state): cells per slide and agreement per class.

Each function returns PNG bytes drawn at twice the size the page shows them, so they stay sharp on
high-density screens.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

# Status colours, shared with the page's badges.
STATUS_COLOURS = {
    "done": "#2e7d32",
    "skipped": "#607d8b",
    "qc_failed": "#ef6c00",
    "failed": "#c62828",
}
_OTHER = "#8d6e63"
_MAX_BARS = 60  # beyond this many slides, a histogram of cells per slide reads better than bars


def cells_per_slide(names: Sequence[str], cells: Sequence[int], statuses: Sequence[str]) -> bytes:
    """Bars of cells per slide coloured by status; a histogram when there are too many slides for bars."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if len(names) <= _MAX_BARS:
        fig = Figure(figsize=(7.5, 1.2 + 0.24 * max(len(names), 1)), dpi=144)
        ax = fig.add_subplot()
        y = list(range(len(names)))[::-1]
        ax.barh(y, cells, color=[STATUS_COLOURS.get(s, _OTHER) for s in statuses])
        ax.set_yticks(y, [_short(n) for n in names], fontsize=8)
        for yi, n in zip(y, cells, strict=True):
            ax.text(n, yi, f" {n}", va="center", fontsize=7)
        ax.set_xlabel("cells")
        ax.set_title("Cells per slide")
        present = [s for s in STATUS_COLOURS if s in statuses]
        if present:
            ax.legend(handles=[Patch(color=STATUS_COLOURS[s], label=s) for s in present], fontsize=7,
                      loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        ax.margins(x=0.12)
    else:
        fig = Figure(figsize=(7.5, 3.2), dpi=144)
        ax = fig.add_subplot()
        ax.hist(cells, bins=min(40, max(5, len(cells) // 10)), color="#455a64")
        ax.set_xlabel("cells in the slide")
        ax.set_ylabel("slides")
        ax.set_title(f"Cells per slide ({len(names)} slides)")
    return _png(fig)


def agreement_per_class(per_class: Mapping[str, Mapping[str, Any]], *, min_agreement: float | None) -> bytes:
    """Horizontal bars of agreement per reference class, with the cells behind each and the QC line."""
    from matplotlib.figure import Figure

    names = list(per_class)
    rates = [100 * (per_class[n].get("agreement") or 0.0) for n in names]
    checked = [int(per_class[n].get("checked") or 0) for n in names]
    fig = Figure(figsize=(7.5, 1.2 + 0.32 * max(len(names), 1)), dpi=144)
    ax = fig.add_subplot()
    y = list(range(len(names)))[::-1]
    colours = ["#bdbdbd" if c == 0 else "#1565c0" for c in checked]
    ax.barh(y, rates, color=colours)
    for yi, rate, n in zip(y, rates, checked, strict=True):
        label = "no cells checked" if n == 0 else f" {rate:.1f}% of {n}"
        ax.text(rate if n else 1, yi, label, va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlim(0, 118)
    ax.set_xticks([0, 20, 40, 60, 80, 100])
    ax.set_xlabel("agreement (% of the reference class's checked cells)")
    if min_agreement is not None:
        ax.axvline(100 * min_agreement, color="#c62828", linestyle="--", linewidth=1)
        ax.text(100 * min_agreement, -0.75, f"--min-agreement {100 * min_agreement:.0f}% ", color="#c62828",
                fontsize=7, ha="right", va="center")
        ax.set_ylim(-1.0, len(names) - 0.5)
    ax.set_title("Agreement per reference class")
    return _png(fig)


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.1)  # "tight" keeps outside legends
    return buffer.getvalue()


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]
