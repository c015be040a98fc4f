"""Confusion matrices of reference class x output class: counting, CSV and a PNG heat map.

Rows are the class the classifier gives the reference cell, columns the class it gives the output cell,
as in the thesis (appendix A, figure 35). Only checked cells are counted (a reference exists and the
output class is confident enough), so the diagonal sum over the total is the agreement rate.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellbatch.atomic import atomic_write, write_bytes_atomic

# Heat-map geometry in pixels; big enough for three-digit counts in a cell.
_CELL = 56
_MARGIN = 12
_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX, spelled as a number so importing this module does not need cv2
_LEGEND_BAR = 14  # colour-bar width
_LEGEND_NOTE_H = 18  # the upright line saying what the colour measures
_LEGEND_TEXT = 40 + _LEGEND_NOTE_H  # tick labels, then that line


def confusion_counts(reference: np.ndarray, output: np.ndarray, *, n_classes: int) -> np.ndarray:
    """Count (reference, output) class pairs into an (n_classes, n_classes) int64 matrix.

    Parameters
    ----------
    reference, output : (N,) integer arrays
        Class indices of the same N cells.
    n_classes : int
        Number of classes of the classifier.

    Examples
    --------
    >>> confusion_counts(np.array([0, 0, 1]), np.array([0, 1, 1]), n_classes=2).tolist()
    [[1, 1], [0, 1]]
    """
    flat = np.asarray(reference, dtype=np.int64) * n_classes + np.asarray(output, dtype=np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def agreement_figures(matrix: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Overall and per-reference-class agreement of a confusion matrix.

    Returns ``{"checked", "agreeing", "agreement", "per_class"}``; ``agreement`` is ``None`` when no cell
    was checked, and ``per_class`` maps each class to ``{"checked", "agreeing", "agreement"}`` (the
    thesis's "Correct (%)" column, as a fraction).
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    checked = int(matrix.sum())
    agreeing = int(np.trace(matrix))
    per_class = {}
    for i, name in enumerate(classes):
        row = int(matrix[i].sum())
        diag = int(matrix[i, i])
        per_class[name] = {"checked": row, "agreeing": diag, "agreement": diag / row if row else None}
    return {
        "checked": checked,
        "agreeing": agreeing,
        "agreement": agreeing / checked if checked else None,
        "per_class": per_class,
    }


def write_confusion_csv(matrix: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """Write the matrix as CSV: one row per reference class, one column per output class.

    Each row ends with the cells ``checked`` and the row's ``agreement``; a last row ``all`` holds the
    column sums and the overall agreement. Empty cells mean "no cell to rate".
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    figures = agreement_figures(matrix, classes)
    path = Path(path)
    with atomic_write(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["reference\\output", *classes, "checked", "agreement"])
        for i, name in enumerate(classes):
            row = figures["per_class"][name]
            writer.writerow([name, *matrix[i].tolist(), row["checked"], _fraction(row["agreement"])])
        writer.writerow(["all", *matrix.sum(axis=0).tolist(), figures["checked"], _fraction(figures["agreement"])])
    return path


def row_fractions(matrix: np.ndarray) -> np.ndarray:
    """Each count as a fraction of its row (its reference class's checked cells); 0 for an empty row."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)


def heat_colours(fraction: np.ndarray) -> np.ndarray:
    """Viridis RGB (..., 3) uint8 for fractions in [0, 1]: the one colour scale of every confusion heat map."""
    fraction = np.asarray(fraction, dtype=np.float64)
    levels = np.round(np.clip(fraction, 0, 1) * 255).astype(np.uint8)
    return _viridis()[levels]


@functools.cache
def _viridis() -> np.ndarray:
    # OpenCV builds its colour table on every applyColorMap call (about 1 ms): build it once.
    import cv2

    table = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(-1, 1), cv2.COLORMAP_VIRIDIS)[:, 0, ::-1]
    table = np.ascontiguousarray(table)
    table.flags.writeable = False
    return table


def ink_for(fraction: float) -> tuple[int, int, int]:
    """Text colour that reads on :func:`heat_colours` of ``fraction``: black on the light end."""
    return (0, 0, 0) if fraction > 0.6 else (255, 255, 255)


def render_confusion(matrix: np.ndarray, classes: Sequence[str], *, title: str = "") -> np.ndarray:
    """Draw the matrix as an (H, W, 3) uint8 RGB heat map with a colour legend.

    Colour is the row-normalised fraction (viridis), so a rare reference class shows its confusions as
    clearly as a common one; the legend on the right says so. Each cell prints its count. Rows are
    reference classes, columns output classes. ``title`` may hold several lines (``\n``).
    """
    import cv2

    matrix = np.asarray(matrix, dtype=np.int64)
    k = len(classes)
    scale, thick = 0.45, 1
    label_w = max((cv2.getTextSize(c, _FONT, scale, thick)[0][0] for c in classes), default=0) + 2 * _MARGIN
    title_lines = [line for line in title.split("\n") if line]
    title_h = 22 * len(title_lines) + (8 if title_lines else 0)
    axis_h = 22
    legend_w = _LEGEND_BAR + _LEGEND_TEXT + 2 * _MARGIN
    grid = max(k, 3) * _CELL  # the legend needs some height even for one class
    height = title_h + axis_h + label_w + grid + _MARGIN
    width = axis_h + label_w + k * _CELL + legend_w
    for line in title_lines:
        width = max(width, cv2.getTextSize(line, _FONT, 0.5, thick)[0][0] + 2 * _MARGIN)
    canvas = np.full((height, width, 3), 255, np.uint8)
    top, left = title_h + axis_h + label_w, axis_h + label_w

    fraction = row_fractions(matrix)
    colours = heat_colours(fraction)
    for i in range(k):
        for j in range(k):
            y, x = top + i * _CELL, left + j * _CELL
            colour = tuple(int(c) for c in colours[i, j])
            cv2.rectangle(canvas, (x, y), (x + _CELL - 1, y + _CELL - 1), colour, thickness=-1)
            text = str(int(matrix[i, j]))
            (tw, th), _ = cv2.getTextSize(text, _FONT, scale, thick)
            cv2.putText(
                canvas,
                text,
                (x + (_CELL - tw) // 2, y + (_CELL + th) // 2),
                _FONT,
                scale,
                ink_for(fraction[i, j]),
                thick,
                cv2.LINE_AA,
            )
    cv2.rectangle(canvas, (left - 1, top - 1), (left + k * _CELL, top + k * _CELL), (0, 0, 0), 1)

    for i, name in enumerate(classes):
        (tw, th), _ = cv2.getTextSize(name, _FONT, scale, thick)
        y = top + i * _CELL + (_CELL + th) // 2
        cv2.putText(canvas, name, (left - _MARGIN // 2 - tw, y), _FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)
    # Column labels are drawn horizontally on a strip that is then turned upright.
    strip = np.full((k * _CELL, label_w, 3), 255, np.uint8)
    for j, name in enumerate(classes):
        (tw, th), _ = cv2.getTextSize(name, _FONT, scale, thick)
        y = j * _CELL + (_CELL + th) // 2
        cv2.putText(strip, name, (_MARGIN // 2, y), _FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)
    canvas[title_h + axis_h : top, left : left + k * _CELL] = np.rot90(strip, k=1)

    _centred_text(canvas, "output class", (left + k * _CELL // 2, title_h + axis_h - 6), scale)
    side = np.full((axis_h, grid, 3), 255, np.uint8)
    _centred_text(side, "reference class", (grid // 2, axis_h - 6), scale)
    canvas[top : top + grid, 0:axis_h] = np.rot90(side, k=1)
    _draw_legend(canvas, x=left + k * _CELL + _MARGIN, top=top, height=grid)
    for n, line in enumerate(title_lines):
        _centred_text(canvas, line, (width // 2, 20 + 22 * n), 0.5)
    return canvas


def _draw_legend(canvas: np.ndarray, *, x: int, top: int, height: int) -> None:
    """A vertical colour bar, 100% at the top, with ticks and what the colour means."""
    import cv2

    bar = heat_colours(np.linspace(1.0, 0.0, height))
    canvas[top : top + height, x : x + _LEGEND_BAR] = bar[:, None, :]
    cv2.rectangle(canvas, (x - 1, top - 1), (x + _LEGEND_BAR, top + height), (0, 0, 0), 1)
    for value in (0.0, 0.5, 1.0):
        y = top + round((1.0 - value) * (height - 1))
        cv2.line(canvas, (x + _LEGEND_BAR, y), (x + _LEGEND_BAR + 4, y), (0, 0, 0), 1)
        label = f"{value:.0%}"
        (_, th), _ = cv2.getTextSize(label, _FONT, 0.4, 1)
        y_text = min(max(y + th // 2, top + th), top + height)
        cv2.putText(canvas, label, (x + _LEGEND_BAR + 7, y_text), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    # What the colour measures, written along the bar (turned upright like the column labels).
    note = "share of the reference class's cells"
    strip = np.full((_LEGEND_NOTE_H, height, 3), 255, np.uint8)
    _centred_text(strip, note, (height // 2, _LEGEND_NOTE_H - 5), 0.4)
    x_note = x + _LEGEND_BAR + _LEGEND_TEXT - _LEGEND_NOTE_H
    canvas[top : top + height, x_note : x_note + _LEGEND_NOTE_H] = np.rot90(strip, k=-1)


def write_confusion_png(matrix: np.ndarray, classes: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Render :func:`render_confusion` and write it as PNG (atomically)."""
    import cv2

    path = Path(path)
    image = render_confusion(matrix, classes, title=title)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    write_bytes_atomic(path, png.tobytes())
    return path


def _centred_text(canvas: np.ndarray, text: str, centre: tuple[int, int], scale: float) -> None:
    import cv2

    (tw, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
    cv2.putText(canvas, text, (centre[0] - tw // 2, centre[1]), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)


def _fraction(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
