"""The agreement check (cellbatch.check.agreement) with a tiny deterministic classifier.

The classifier calls a crop red, green or blue by its mean colour, so the expected classes of any
synthetic crop are known without training anything.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from cellbatch.check.agreement import (
    AgreementCheck,
    CheckSettings,
    classify,
    load_classifier,
    summarise_run,
)
from cellbatch.errors import ConfigError, InputFormatError, ModelError
from cellbatch.modelfile import save_model

CLASSES = ["red", "green", "blue"]
RED, GREEN, BLUE, GREYISH_RED = (200, 30, 30), (30, 200, 30), (30, 30, 200), (130, 100, 100)


class MeanColour(torch.nn.Module):
    """Logits = 20 x mean of each channel: the dominant channel wins, a greyish crop is unsure."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 20.0


class WrongShape(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)).unsqueeze(1)


def save_classifier(path: Path, module: torch.nn.Module | None = None, *, with_classes: bool = True) -> Path:
    """Trace, freeze and save a classifier the way exports do."""
    module = (module or MeanColour()).eval()
    traced = torch.jit.freeze(torch.jit.trace(module, torch.zeros(1, 3, 256, 256)))
    metadata = {"kind": "classifier", "input_range": [0, 1]}
    if with_classes:
        metadata["classes"] = CLASSES
    return save_model(traced, path, metadata)


def make_crops(colours: list[tuple[int, int, int]], *, seed: int = 0) -> np.ndarray:
    """(N, 256, 256, 3) uint8 crops of the given colours with a little noise."""
    rng = np.random.default_rng(seed)
    crops = np.empty((len(colours), 256, 256, 3), np.uint8)
    for i, colour in enumerate(colours):
        noise = rng.integers(-10, 11, size=(256, 256, 3))
        crops[i] = np.clip(np.asarray(colour) + noise, 0, 255)
    return crops


def rows_for(n: int) -> list[dict]:
    return [{"source": f"c{i}.png", "frame": 0, "cx": 320.0, "cy": 240.0} for i in range(n)]


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_classifier(tmp_path_factory.mktemp("clf") / "mean_colour.pt")


@pytest.fixture()
def classifier(classifier_file: Path):
    return load_classifier(classifier_file)


def run_check(classifier, crops, outputs, *, settings=None, reference=None, slide_dir=None):
    check = AgreementCheck(classifier, settings=settings or CheckSettings(), reference=reference)
    state = check.start_slide("slide")
    columns = check.check_batch(state, rows_for(len(crops)), crops, outputs)
    summary = check.finish_slide(state, slide_dir) if slide_dir is not None else None
    return columns, summary, state


def test_identity_output_with_input_as_reference_agrees_fully(classifier, tmp_path):
    crops = make_crops([RED, GREEN, BLUE, RED, BLUE])
    columns, summary, _ = run_check(classifier, crops, crops.copy(), slide_dir=tmp_path)
    assert summary["agreement"] == 1.0
    assert summary["checked"] == summary["cells"] == 5
    assert [c["agree"] for c in columns] == [True] * 5
    assert all(c["class_reference"] == c["class_input"] == c["class_output"] for c in columns)
    assert summary["qc_failed"] is False


def test_channel_swap_changes_classes_and_the_confusion_matrix_shows_where(classifier, tmp_path):
    crops = make_crops([RED, RED, GREEN, BLUE, BLUE, BLUE])
    swapped = np.ascontiguousarray(crops[..., ::-1])  # RGB -> BGR: red and blue trade places
    columns, summary, _ = run_check(classifier, crops, swapped, slide_dir=tmp_path)
    assert [c["class_output"] for c in columns] == ["blue", "blue", "green", "red", "red", "red"]
    assert summary["confusion"]["classes"] == CLASSES
    # rows = reference class, columns = output class
    assert summary["confusion"]["matrix"] == [[0, 0, 2], [0, 1, 0], [3, 0, 0]]
    assert summary["agreement"] == pytest.approx(1 / 6)
    assert summary["per_class"]["green"]["agreement"] == 1.0
    assert summary["per_class"]["red"]["agreement"] == 0.0
    assert summary["per_class"]["blue"] == {"checked": 3, "agreeing": 0, "agreement": 0.0}


def test_written_classes_are_what_the_classifier_says_on_the_crops(classifier):
    crops = make_crops([RED, GREEN, BLUE, GREYISH_RED])
    outputs = make_crops([GREEN, GREEN, RED, BLUE], seed=1)
    columns, _, _ = run_check(classifier, crops, outputs)
    labels_in, _ = classify(crops, classifier=classifier)
    labels_out, probs_out = classify(outputs, classifier=classifier)
    assert [c["class_input"] for c in columns] == [CLASSES[i] for i in labels_in]
    assert [c["class_output"] for c in columns] == [CLASSES[i] for i in labels_out]
    assert [c["p_output"] for c in columns] == pytest.approx(probs_out.max(axis=1).tolist())
    assert [c["agree"] for c in columns] == [False, True, False, False]


def test_min_confidence_leaves_unsure_cells_out_of_the_rate_and_counts_them(classifier, tmp_path):
    crops = make_crops([RED, GREYISH_RED, BLUE, GREYISH_RED])
    outputs = crops.copy()
    outputs[2] = make_crops([GREEN])[0]  # a confident disagreement
    columns, summary, _ = run_check(
        classifier, crops, outputs, settings=CheckSettings(min_confidence=0.9), slide_dir=tmp_path
    )
    p_greyish = columns[1]["p_output"]
    assert 0.5 < p_greyish < 0.9, "the greyish crop must be an unconfident red for this test to mean anything"
    assert summary["unsure"] == 2
    assert summary["checked"] == 2
    assert summary["agreement"] == 0.5
    assert [c["agree"] for c in columns] == [True, None, False, None]
    assert columns[1]["class_reference"] == "red", "unsure cells still get their classes written"
    assert np.sum(summary["confusion"]["matrix"]) == 2, "unsure cells stay out of the matrix"


def test_qc_flag_marks_slides_below_min_agreement(classifier, tmp_path):
    crops = make_crops([RED, GREEN, BLUE, RED])
    outputs = crops.copy()
    outputs[0] = make_crops([BLUE])[0]  # 3 of 4 agree
    _, below, _ = run_check(classifier, crops, outputs, settings=CheckSettings(min_agreement=0.8), slide_dir=tmp_path)
    _, at, _ = run_check(classifier, crops, outputs, settings=CheckSettings(min_agreement=0.75), slide_dir=tmp_path)
    _, off, _ = run_check(classifier, crops, outputs, slide_dir=tmp_path)
    assert below["agreement"] == 0.75
    assert below["qc_failed"] is True
    assert at["qc_failed"] is False
    assert off["qc_failed"] is False


def test_a_slide_whose_cells_are_all_unsure_fails_the_gate_but_an_empty_slide_does_not(classifier, tmp_path):
    settings = CheckSettings(min_agreement=0.5, min_confidence=0.99)
    crops = make_crops([GREYISH_RED, GREYISH_RED])
    _, unsure, _ = run_check(classifier, crops, crops, settings=settings, slide_dir=tmp_path)
    assert unsure["agreement"] is None and unsure["unsure"] == 2
    assert unsure["qc_failed"] is True
    check = AgreementCheck(classifier, settings=settings)
    empty = check.finish_slide(check.start_slide("empty"), tmp_path)
    assert empty["cells"] == 0 and empty["qc_failed"] is False


class StubReference:
    """Stands in for ReferenceSource: a fixed crop (or None) per row."""

    def __init__(self, crops: list[np.ndarray | None]) -> None:
        self.crops = crops

    def crops_for(self, rows, *, slide=None):
        return self.crops[: len(rows)]

    def provenance(self):
        return {"root": "stub"}


def test_reference_crops_decide_agreement_and_missing_references_are_counted(classifier, tmp_path):
    crops = make_crops([RED, RED, GREEN])
    reference = StubReference([make_crops([RED])[0], None, make_crops([BLUE])[0]])
    columns, summary, _ = run_check(classifier, crops, crops, reference=reference, slide_dir=tmp_path)
    assert [c["class_reference"] for c in columns] == ["red", None, "blue"]
    assert [c["agree"] for c in columns] == [True, None, False]
    assert summary["no_reference"] == 1
    assert summary["checked"] == 2
    assert summary["agreement"] == 0.5
    assert summary["confusion"]["matrix"] == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]


def test_streaming_in_batches_equals_one_batch(classifier, tmp_path):
    colours = [RED, GREEN, BLUE, GREYISH_RED, BLUE, RED, GREEN]
    crops, outputs = make_crops(colours), make_crops(colours[::-1], seed=3)
    settings = CheckSettings(min_confidence=0.8, batch_size=2)
    whole_columns, whole, _ = run_check(classifier, crops, outputs, settings=settings, slide_dir=tmp_path)
    check = AgreementCheck(classifier, settings=settings)
    state = check.start_slide("slide")
    parts = []
    for start in (0, 3, 4):
        stop = {0: 3, 3: 4, 4: 7}[start]
        parts += check.check_batch(state, rows_for(stop - start), crops[start:stop], outputs[start:stop])
    assert parts == whole_columns
    assert check.finish_slide(state, tmp_path) == whole


def test_finish_slide_writes_confusion_csv_and_png(classifier, tmp_path):
    import imageio.v3 as iio

    crops = make_crops([RED, GREEN, BLUE])
    _, summary, _ = run_check(classifier, crops, np.ascontiguousarray(crops[..., ::-1]), slide_dir=tmp_path)
    with open(tmp_path / "confusion.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["reference\\output", *CLASSES, "checked", "agreement"]
    assert [[int(v) for v in row[1:4]] for row in table[1:4]] == summary["confusion"]["matrix"]
    assert table[-1][0] == "all" and table[-1][-1] == f"{summary['agreement']:.4f}"
    png = iio.imread(tmp_path / "confusion.png")
    assert png.ndim == 3 and png.shape[2] == 3 and png.dtype == np.uint8
    assert not list(tmp_path.glob(".*")), "no temporary files are left behind"


def test_summarise_run_sums_slides_and_lists_failed_ones(classifier, tmp_path):
    crops = make_crops([RED, GREEN, BLUE, RED])
    settings = CheckSettings(min_agreement=0.9)
    _, good, _ = run_check(classifier, crops, crops, settings=settings, slide_dir=tmp_path)
    _, bad, _ = run_check(
        classifier, crops, np.ascontiguousarray(crops[..., ::-1]), settings=settings, slide_dir=tmp_path
    )
    run = summarise_run({"a": good, "b": bad}, min_agreement=0.9)
    assert run["cells"] == 8 and run["checked"] == 8
    assert run["agreeing"] == good["agreeing"] + bad["agreeing"]
    assert run["agreement"] == pytest.approx(run["agreeing"] / 8)
    assert run["qc_failed_slides"] == ["b"] and run["qc_failed"] is True
    assert (
        run["confusion"]["matrix"]
        == (np.asarray(good["confusion"]["matrix"]) + np.asarray(bad["confusion"]["matrix"])).tolist()
    )


def test_provenance_names_classifier_and_settings(classifier, classifier_file):
    check = AgreementCheck(classifier, settings=CheckSettings(min_agreement=0.85))
    prov = check.provenance()
    assert prov["path"] == str(classifier_file)
    assert len(prov["sha256"]) == 64
    assert prov["metadata"]["classes"] == CLASSES
    assert prov["settings"] == {"min_confidence": 0.0, "min_agreement": 0.85, "max_unsure": 0.5, "batch_size": 64}
    assert prov["reference"] is None


def test_a_file_without_classes_needs_them_and_a_contradicting_list_is_refused(tmp_path, classifier_file):
    bare = save_classifier(tmp_path / "bare.pt", with_classes=False)
    with pytest.raises(ModelError, match="--classes"):
        load_classifier(bare)
    assert load_classifier(bare, classes=["r", "g", "b"]).metadata["classes"] == ["r", "g", "b"]
    with pytest.raises(ConfigError, match="leave --classes out"):
        load_classifier(classifier_file, classes=["b", "g", "r"])


def test_classifier_output_of_the_wrong_shape_is_a_model_error(tmp_path):
    wrong = load_classifier(save_classifier(tmp_path / "wrong.pt", WrongShape()))
    with pytest.raises(ModelError, match=r"not \(2, 3\) logits"):
        classify(make_crops([RED, RED]), classifier=wrong)


def test_crops_of_the_wrong_size_are_refused(classifier):
    check = AgreementCheck(classifier, settings=CheckSettings())
    small = np.zeros((1, 128, 128, 3), np.uint8)
    with pytest.raises(InputFormatError, match="256"):
        check.check_batch(check.start_slide("s"), rows_for(1), small, small)


@pytest.mark.parametrize("kwargs", [{"min_confidence": 1.5}, {"min_agreement": 85.0}, {"batch_size": 0}])
def test_settings_out_of_range_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        CheckSettings(**kwargs)


@pytest.mark.gpu
def test_the_check_on_cuda_gives_the_cpu_result(classifier_file, tmp_path):
    crops = make_crops([RED, GREEN, BLUE, GREYISH_RED, BLUE])
    outputs = np.ascontiguousarray(crops[..., ::-1])
    settings = CheckSettings(min_confidence=0.9, batch_size=2)
    results = []
    for device in ("cpu", "cuda"):
        check = AgreementCheck(load_classifier(classifier_file, device=device), settings=settings, device=device)
        state = check.start_slide("slide")
        columns = check.check_batch(state, rows_for(5), crops, outputs)
        (tmp_path / device).mkdir()
        results.append((columns, check.finish_slide(state, tmp_path / device)))
    (cpu_columns, cpu_summary), (gpu_columns, gpu_summary) = results
    assert gpu_summary == cpu_summary
    assert [{k: v for k, v in c.items() if k != "p_output"} for c in gpu_columns] == [
        {k: v for k, v in c.items() if k != "p_output"} for c in cpu_columns
    ]
    assert [c["p_output"] for c in gpu_columns] == pytest.approx([c["p_output"] for c in cpu_columns], abs=1e-5)
