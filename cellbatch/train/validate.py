"""What a training run is judged by: held-out pairs, their white-cell masks, the HM baseline, montages.

Every validation compares the generator with two baselines on the same held-out pairs: the
untransformed input, and HM normalisation (thesis 2.2) fitted on the same training pairs, the method
a generator has to beat to be worth its cost. The white-cell masks come from the threshold detector
run on each target crop (what the cell is in the DM96 look), so ``delta_e_cell`` measures the part of
the crop a classifier or a haematologist looks at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellbatch.atomic import write_bytes_atomic
from cellbatch.detect.base import CYTOPLASM, NUCLEUS

HM_PROFILE_NAME = "hm-baseline.json"
MONTAGE_DIR = "montage"
MONTAGE_CELLS = 8  # rows of input | generated | target
# At most this many training pairs (spread over them) fit the HM baseline: 6.5 M pixels a side settle the
# class colour statistics.
HM_FIT_PAIRS = 100


@dataclass(frozen=True)
class ValidationSet:
    """Held-out pairs in memory: uint8 (N, Y, X, 3) ``source``/``target``, white-cell ``masks`` (N, Y, X)."""

    names: tuple[str, ...]
    source: np.ndarray
    target: np.ndarray
    masks: np.ndarray
    source_labels: np.ndarray  # the detector's labels on each source crop (what HM blends by)

    def subset(self, count: int) -> ValidationSet:
        """At most ``count`` pairs spread evenly over the set (names sort by class: every class stays in)."""
        if count <= 0 or count >= len(self.names):
            return self
        rows = np.unique(np.linspace(0, len(self.names) - 1, count).round().astype(int))
        return ValidationSet(
            names=tuple(self.names[i] for i in rows),
            source=self.source[rows],
            target=self.target[rows],
            masks=self.masks[rows],
            source_labels=self.source_labels[rows],
        )


def _detector(cell_diameter: float):
    from cellbatch.registry import make_detector

    return make_detector("threshold", cell_diameter=cell_diameter)


def validation_set(
    names: tuple[str, ...], source: np.ndarray, target: np.ndarray, *, cell_diameter: float
) -> ValidationSet:
    """Detect the white cells of every target crop (masks) and segment every source crop (for HM)."""
    detect = _detector(cell_diameter)
    labels = np.stack([detect(t).labels for t in target])
    source_labels = np.stack([detect(s).labels for s in source])
    masks = (labels == CYTOPLASM) | (labels == NUCLEUS)
    return ValidationSet(names=names, source=source, target=target, masks=masks, source_labels=source_labels)


def fit_hm_baseline(source: np.ndarray, target: np.ndarray, out: Path, *, cell_diameter: float) -> Path:
    """Fit an HM profile on training pairs (as ``cellbatch normalise fit --method hm`` would) into ``out``."""
    from cellbatch.normalise.fit import fit_profile
    from cellbatch.normalise.profile import write_profile

    step = max(1, -(-len(source) // HM_FIT_PAIRS))
    detect = _detector(cell_diameter)
    fields, counts = fit_profile(
        "hm", source=list(source[::step]), target=list(target[::step]), segment=lambda im: detect(im).labels
    )
    return write_profile(out, method="hm", fields=fields, fit={**counts, "from": "training pairs"})


def hm_outputs(profile: Path, val: ValidationSet) -> np.ndarray:
    """The validation sources converted by HM with ``profile`` (blended by the source crops' labels)."""
    from cellbatch.normalise.hm import HMNormaliser

    return HMNormaliser(str(profile))(val.source, val.source_labels)


def montage(val: ValidationSet, generated: np.ndarray, path: Path, *, cells: int = MONTAGE_CELLS) -> Path:
    """Write a PNG of ``cells`` validation cells spread over the set: rows of input | generated | target."""
    import imageio.v3 as iio

    rows = np.unique(np.linspace(0, len(val.names) - 1, min(cells, len(val.names))).round().astype(int))
    gap = np.full((val.source.shape[1], 4, 3), 255, np.uint8)
    image = np.concatenate(
        [np.concatenate([val.source[i], gap, generated[i], gap, val.target[i]], axis=1) for i in rows], axis=0
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, iio.imwrite("<bytes>", image, extension=".png"))
    return path
