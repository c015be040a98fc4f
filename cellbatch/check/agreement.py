"""Classifier agreement: does a converted cell keep the class of its reference? (thesis sections 4, 5.6)

A classifier labels three crops of every cell: the raw input crop, the output (what the run writes
last) and the reference (the paired DM96 capture's cell, or the input crop when there is none). The
cell *agrees* when output and reference get the same class; whether either class is right does not
matter. Cells whose output class is less likely than ``min_confidence`` are *unsure*, cells whose
reference is missing are *no_reference*; both stay out of the rate and are counted. The rate per
slide, per reference class and per run, with a confusion matrix, goes to provenance; a slide below
``min_agreement`` is flagged ``qc_failed``.

The run pipeline streams batches through :class:`AgreementCheck`, and ``cellbatch check`` re-checks a
written output through the same class, so both give the same figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellbatch.check.confusion import (
    agreement_figures,
    confusion_counts,
    write_confusion_csv,
    write_confusion_png,
)
from cellbatch.check.reference import ReferenceSource
from cellbatch.crop import CROP_SIZE  # the classifier contract's input side
from cellbatch.errors import ConfigError, InputFormatError, ModelError
from cellbatch.modelfile import ModelFile, load_model


@dataclass(frozen=True)
class CheckSettings:
    """Settings of the agreement check.

    Parameters
    ----------
    min_confidence
        A cell whose output class has a softmax probability below this is *unsure* and left out of
        the rate (``--min-confidence``).
    min_agreement
        A slide whose agreement rate is below this is flagged ``qc_failed`` (``--min-agreement``);
        ``None`` turns the gate off.
    max_unsure
        With the gate on, a slide where more than this share of the cells is unsure also fails it
        (``--max-unsure``): a rate over a few confident cells says little about the slide.
    batch_size
        Crops per classifier call.
    """

    min_confidence: float = 0.0
    min_agreement: float | None = None
    max_unsure: float = 0.5
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError(f"--min-confidence {self.min_confidence}: give a probability from 0 to 1")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError(f"--min-agreement {self.min_agreement}: give a rate from 0 to 1 (0.85 for 85%)")
        if not 0.0 <= self.max_unsure <= 1.0:
            raise ConfigError(f"--max-unsure {self.max_unsure}: give a share from 0 to 1 (0.5 for half the cells)")
        if self.batch_size < 1:
            raise ConfigError(f"batch size {self.batch_size}: give at least 1")


@dataclass
class SlideState:
    """Running counts of one slide; ``matrix`` counts checked cells, reference class x output class."""

    slide_name: str
    matrix: np.ndarray
    cells: int = 0
    unsure: int = 0
    no_reference: int = 0


def load_classifier(path: str | Path, *, classes: Sequence[str] | None = None, device: str = "cpu") -> ModelFile:
    """Load a classifier file and settle its class names.

    The names come from the file's ``cellbatch.json``; a file without them needs ``classes``
    (``--classes a,b,c``). Passing ``classes`` for a file that names its own must repeat them exactly,
    so a mistyped list cannot silently relabel the output.
    """
    model = load_model(path, kind="classifier", device=device)
    stored = model.metadata.get("classes")
    if classes is not None:
        classes = [c.strip() for c in classes]
        if not all(classes) or len(set(classes)) != len(classes):
            raise ConfigError(f"--classes {','.join(classes)}: give distinct, non-empty names separated by commas")
        if stored is not None and list(stored) != classes:
            raise ConfigError(
                f"--classes {','.join(classes)} differs from the classes stored in {model.path} "
                f"({','.join(stored)}): leave --classes out"
            )
        model.metadata["classes"] = classes
    elif not stored:
        raise ModelError(f"{model.path} does not name its classes: pass --classes a,b,c in the order of its outputs")
    return model


def classify(
    crops: np.ndarray,
    *,
    classifier: ModelFile,
    device: str = "cpu",
    batch_size: int = 64,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Class index and softmax probabilities of every crop.

    Parameters
    ----------
    crops : (N, 256, 256, 3) uint8
        RGB crops.
    classifier
        A classifier from :func:`load_classifier`, already on ``device`` (and prepared for ``precision``
        by :func:`~cellbatch.precision.prepare_module`).

    Returns
    -------
    labels : (N,) int64
    probabilities : (N, K) float32
    """
    import torch

    _check_crops(crops, "crops to classify")
    probabilities = np.empty((len(crops), len(classifier.metadata["classes"])), np.float32)
    for start in range(0, len(crops), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(crops[start : start + batch_size])).to(device)
        probabilities[start : start + len(batch)] = classify_tensors(
            batch, classifier=classifier, precision=precision
        ).cpu().numpy()
    return probabilities.argmax(axis=1).astype(np.int64), probabilities


def classify_tensors(images: Any, *, classifier: ModelFile, precision: str = "fp32") -> Any:
    """Softmax probabilities (N, K) float32 of (N, 256, 256, 3) uint8 crops, a tensor on the classifier's device."""
    import torch

    from cellbatch.generate import to_range
    from cellbatch.precision import network_input

    classes = classifier.metadata["classes"]
    value_range = tuple(classifier.metadata.get("input_range", (0, 1)))
    with torch.inference_mode():
        x = network_input(to_range(images, value_range), precision)
        logits = classifier.module(x)
        n = x.shape[0]
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (n, len(classes)):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ModelError(
                f"classifier {classifier.path} returned {shape} for {n} crops, not ({n}, {len(classes)}) "
                f"logits for its classes {','.join(classes)}: check the file or --classes"
            )
        if not torch.isfinite(logits).all():
            raise ModelError(f"classifier {classifier.path} returned non-finite logits: the file is broken")
        return torch.softmax(logits.float(), dim=1)


class AgreementCheck:
    """Classify input, output and reference crops of each cell and keep the agreement figures.

    Parameters
    ----------
    classifier
        From :func:`load_classifier` (class names settled), loaded on ``device``.
    settings
        Confidence floor, QC gate and batch size.
    reference
        Paired reference captures; ``None`` makes the raw input crop the reference.
    device
        Torch device the classifier runs on.
    precision
        ``fp32``, ``bf16`` or ``fp16`` (resolved, see :mod:`cellbatch.precision`): the classifier's
        weights are cast to it here.

    Examples
    --------
    >>> check = AgreementCheck(load_classifier("clf.pt"), settings=CheckSettings())  # doctest: +SKIP
    >>> state = check.start_slide("slide-01")  # doctest: +SKIP
    >>> columns = check.check_batch(state, rows, crops, outputs)  # doctest: +SKIP
    >>> summary = check.finish_slide(state, Path("OUT/slide-01"))  # doctest: +SKIP
    """

    def __init__(
        self,
        classifier: ModelFile,
        *,
        settings: CheckSettings,
        reference: ReferenceSource | None = None,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        from cellbatch.precision import prepare_model

        if not classifier.metadata.get("classes"):
            raise ModelError(f"{classifier.path} does not name its classes: pass --classes a,b,c")
        self.precision = prepare_model(classifier, precision=precision, device=device)
        self.classifier = classifier
        self.classes: list[str] = list(classifier.metadata["classes"])
        self.settings = settings
        self.reference = reference
        self.device = device

    def start_slide(self, slide_name: str) -> SlideState:
        k = len(self.classes)
        return SlideState(slide_name=slide_name, matrix=np.zeros((k, k), np.int64))

    def score(self, crops: Any, outputs: Any) -> dict[str, Any]:
        """Class probabilities of input and output crops, uint8 (N, 256, 256, 3) tensors on the device.

        The run calls this on the batch already on the device, so the classifier needs no upload of
        its own; the result (``{"p_input": (N, K), "p_output": (N, K)}`` float32 tensors) goes to
        :meth:`check_batch` as ``probabilities``.
        """
        p_input = classify_tensors(crops, classifier=self.classifier, precision=self.precision)
        if outputs is crops:
            return {"p_input": p_input, "p_output": p_input}
        return {"p_input": p_input,
                "p_output": classify_tensors(outputs, classifier=self.classifier, precision=self.precision)}

    def check_batch(
        self,
        state: SlideState,
        rows: list[dict[str, Any]],
        crops: np.ndarray,
        outputs: np.ndarray,
        *,
        probabilities: Mapping[str, np.ndarray] | None = None,
    ) -> list[dict[str, Any]]:
        """Classify one batch of cells and add it to the slide's counts.

        Parameters
        ----------
        rows
            One dict per cell with at least ``source``, ``frame``, ``cx``, ``cy`` (used to find the
            reference cell).
        crops, outputs : (N, S, S, 3) uint8, S >= 256
            The raw input crops and what the run writes last for the same cells; crops larger than the
            classifier's 256x256 input (``--crop-size``) are classified on their centre, where the cell is.
        probabilities
            ``p_input`` and ``p_output`` from :meth:`score`, when the crops were classified already.

        Returns
        -------
        list of dict
            Per cell: ``class_input``, ``class_output``, ``class_reference`` (``None`` without a
            reference cell), ``p_output`` (probability of the output class) and ``agree`` (``None``
            when the cell is not checked: no reference cell, or unsure).
        """
        same = outputs is crops
        crops, outputs = centre_crops(crops), centre_crops(outputs)
        outputs = crops if same else outputs
        _check_crops(outputs, "output crops")
        if len(rows) != len(crops) or len(crops) != len(outputs):
            raise InputFormatError(
                f"slide {state.slide_name}: {len(rows)} rows, {len(crops)} crops and {len(outputs)} outputs; "
                "each cell needs one of each"
            )
        n = len(rows)
        if n == 0:
            return []
        if probabilities is not None:
            prob_input, prob_output = probabilities["p_input"], probabilities["p_output"]
            label_input, label_output = prob_input.argmax(axis=1), prob_output.argmax(axis=1)
        else:
            label_input, prob_input = self._classify(crops)
            if outputs is crops or np.array_equal(outputs, crops):
                label_output, prob_output = label_input, prob_input
            else:
                label_output, prob_output = self._classify(outputs)
        label_reference = label_input.copy()
        has_reference = np.ones(n, bool)
        if self.reference is not None:
            found = self.reference.crops_for(rows, slide=state.slide_name)
            has_reference = np.array([c is not None for c in found])
            label_reference[:] = -1
            if has_reference.any():
                label_reference[has_reference], _ = self._classify(np.stack([c for c in found if c is not None]))

        p_output = prob_output[np.arange(n), label_output]
        confident = p_output >= self.settings.min_confidence
        checked = has_reference & confident
        state.cells += n
        state.no_reference += int((~has_reference).sum())
        state.unsure += int((has_reference & ~confident).sum())
        state.matrix += confusion_counts(label_reference[checked], label_output[checked], n_classes=len(self.classes))

        names = self.classes
        return [
            {
                "class_input": names[label_input[i]],
                "class_output": names[label_output[i]],
                "class_reference": names[label_reference[i]] if has_reference[i] else None,
                "p_output": float(p_output[i]),
                "agree": bool(label_reference[i] == label_output[i]) if checked[i] else None,
            }
            for i in range(n)
        ]

    def finish_slide(self, state: SlideState, slide_dir: Path) -> dict[str, Any]:
        """Write ``confusion.csv`` and ``confusion.png`` into ``slide_dir`` and return the slide summary.

        The summary holds ``cells``, ``checked``, ``agreeing``, ``unsure``, ``no_reference``,
        ``agreement`` (``None`` when no cell was checked), ``per_class`` (by reference class),
        ``confusion`` (``classes`` and ``matrix``, rows = reference class) and ``qc_failed``.
        """
        summary = summarise(
            state.matrix,
            self.classes,
            cells=state.cells,
            unsure=state.unsure,
            no_reference=state.no_reference,
            min_agreement=self.settings.min_agreement,
            max_unsure=self.settings.max_unsure,
        )
        slide_dir = Path(slide_dir)
        # A re-check replaces these files in a finished slide folder: both writers replace atomically.
        write_confusion_csv(state.matrix, self.classes, slide_dir / "confusion.csv")
        title = agreement_title(state.slide_name, summary)
        write_confusion_png(state.matrix, self.classes, slide_dir / "confusion.png", title=title)
        return summary

    def provenance(self) -> dict[str, Any]:
        """Classifier identity (path, sha256, metadata), settings, reference and device."""
        return {
            **self.classifier.provenance(),
            "settings": asdict(self.settings),
            "reference": None if self.reference is None else self.reference.provenance(),
            "device": self.device,
            "precision": self.precision,
        }

    def _classify(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return classify(crops, classifier=self.classifier, device=self.device, batch_size=self.settings.batch_size,
                        precision=self.precision)


def summarise(
    matrix: np.ndarray,
    classes: Sequence[str],
    *,
    cells: int,
    unsure: int,
    no_reference: int,
    min_agreement: float | None,
    max_unsure: float = 1.0,
) -> dict[str, Any]:
    """The summary dict of :meth:`AgreementCheck.finish_slide` from counts.

    ``qc_failed`` is true when ``min_agreement`` is set and the rate is below it, when the slide has
    cells but none could be checked, or when more than ``max_unsure`` of its cells were unsure: a gate
    that cannot measure must not pass.
    """
    figures = agreement_figures(matrix, classes)
    agreement = figures["agreement"]
    if min_agreement is None:
        qc_failed = False
    elif agreement is None:
        qc_failed = cells > 0
    else:
        qc_failed = agreement < min_agreement or (cells > 0 and unsure / cells > max_unsure)
    return {
        "cells": int(cells),
        "checked": figures["checked"],
        "agreeing": figures["agreeing"],
        "unsure": int(unsure),
        "no_reference": int(no_reference),
        "agreement": agreement,
        "per_class": figures["per_class"],
        "confusion": {"classes": list(classes), "matrix": np.asarray(matrix, dtype=np.int64).tolist()},
        "min_agreement": min_agreement,
        "max_unsure": max_unsure,
        "qc_failed": bool(qc_failed),
    }


def agreement_title(name: str, summary: Mapping[str, Any]) -> str:
    """Two lines naming the rate, its base and the QC gate's threshold and outcome, for heat-map titles.

    >>> agreement_title("s1", {"agreement": 0.8, "checked": 10, "min_agreement": 0.85, "qc_failed": True})
    's1: agreement 80.0% of 10 checked cells\\nQC FAILED: below --min-agreement 85.0%'
    """
    first = f"{name}: agreement {_percent(summary.get('agreement'))} of {summary.get('checked', 0)} checked cells"
    return f"{first}\n{qc_outcome(summary)}"


def qc_state(summary: Mapping[str, Any]) -> str:
    """``"no gate"``, ``"failed"`` or ``"passed"``: the QC gate's outcome for a slide or run summary."""
    if summary.get("min_agreement") is None:
        return "no gate"
    return "failed" if summary.get("qc_failed") else "passed"


def qc_outcome(summary: Mapping[str, Any]) -> str:
    """The QC gate's threshold and outcome in words."""
    threshold = _percent(summary.get("min_agreement"))
    return {
        "no gate": "no QC gate (--min-agreement not set)",
        "failed": f"QC FAILED: below --min-agreement {threshold}",
        "passed": f"QC passed: at or above --min-agreement {threshold}",
    }[qc_state(summary)]


def summarise_run(slides: Mapping[str, Mapping[str, Any]], *, min_agreement: float | None) -> dict[str, Any]:
    """Per-run figures from the slide summaries (name -> summary), for ``run.json``.

    The counts and matrices are summed (all slides share one classifier), so the run's rate weighs
    every checked cell equally; ``qc_failed_slides`` lists the slides below the gate.
    """
    summaries = list(slides.values())
    if not summaries:
        return {
            "slides": 0,
            "cells": 0,
            "checked": 0,
            "agreeing": 0,
            "unsure": 0,
            "no_reference": 0,
            "agreement": None,
            "per_class": {},
            "confusion": None,
            "min_agreement": min_agreement,
            "qc_failed": False,
            "qc_failed_slides": [],
        }
    classes = summaries[0]["confusion"]["classes"]
    if any(s["confusion"]["classes"] != classes for s in summaries):
        raise ConfigError("slides were checked with classifiers of different classes: re-check them all at once")
    matrix = sum(np.asarray(s["confusion"]["matrix"], np.int64) for s in summaries)
    run = summarise(
        matrix,
        classes,
        cells=sum(s["cells"] for s in summaries),
        unsure=sum(s["unsure"] for s in summaries),
        no_reference=sum(s["no_reference"] for s in summaries),
        min_agreement=min_agreement,
    )
    failed = [name for name, s in slides.items() if s["qc_failed"]]
    run.update({"slides": len(summaries), "qc_failed": bool(failed), "qc_failed_slides": failed})
    return run


def centre_crops(crops: np.ndarray) -> np.ndarray:
    """The centre ``CROP_SIZE`` x ``CROP_SIZE`` of crops cut larger (``--crop-size``); others as they are."""
    size = getattr(crops, "shape", (0, 0))[1:3]
    if len(size) != 2 or size[0] != size[1] or size[0] <= CROP_SIZE:
        return crops
    start = (size[0] - CROP_SIZE) // 2
    return crops[:, start : start + CROP_SIZE, start : start + CROP_SIZE]


def _check_crops(crops: np.ndarray, what: str) -> None:
    if (
        not isinstance(crops, np.ndarray)
        or crops.dtype != np.uint8
        or crops.ndim != 4
        or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3)
    ):
        shape = getattr(crops, "shape", None)
        dtype = getattr(crops, "dtype", type(crops).__name__)
        raise InputFormatError(
            f"{what} are {dtype} {shape}, not uint8 (N, {CROP_SIZE}, {CROP_SIZE}, 3) RGB: "
            "the classifier contract takes 256x256 crops"
        )


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
