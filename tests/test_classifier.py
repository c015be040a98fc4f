"""The small classifier (cellbatch.models.classifier) and ``cellbatch classifier train``."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellbatch.check.agreement import classify, load_classifier
from cellbatch.cli import cli
from cellbatch.errors import InputFormatError, InputNotFoundError
from cellbatch.models.classifier import (
    ClassifierNet,
    TrainSettings,
    centre_crops,
    export_classifier,
    image_folder,
    split_heldout,
    train_classifier,
)

COLOURS = {"blue": (60, 60, 200), "pink": (220, 120, 180), "teal": (40, 170, 160)}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny batches on a shared machine: a second intra-op thread only adds waiting (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def colour_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of 16 small images each: a coloured disc on a light background."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:130]
    for name, colour in COLOURS.items():
        (root / name).mkdir()
        for i in range(16):
            image = np.full((120, 130, 3), 235, np.uint8)
            cx, cy = rng.integers(50, 80, size=2)
            image[(xx - cx) ** 2 + (yy - cy) ** 2 < 30**2] = colour
            iio.imwrite(root / name / f"{i}.png", image)
    (root / "notes.txt").write_text("not a class", encoding="utf-8")
    return root


def test_the_network_honours_the_classifier_contract():
    net = ClassifierNet(5).eval()
    with torch.no_grad():
        logits = net(torch.rand(3, 3, 256, 256))
    assert logits.shape == (3, 5) and logits.dtype == torch.float32


def test_heldout_split_is_stratified_disjoint_and_seeded():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 20)
    train, held = split_heldout(labels, fraction=0.2, seed=3)
    assert not set(train) & set(held) and len(train) + len(held) == len(labels)
    assert np.bincount(labels[held]).tolist() == [2, 1, 4]
    assert split_heldout(labels, fraction=0.2, seed=3)[1].tolist() == held.tolist()
    assert split_heldout(labels, fraction=0.2, seed=4)[1].tolist() != held.tolist()


def test_image_folder_lists_one_class_per_sub_folder(colour_set):
    files, labels, classes = image_folder(colour_set)
    assert classes == ["blue", "pink", "teal"]
    assert len(files) == 48 and np.bincount(labels).tolist() == [16, 16, 16]


def test_small_images_are_centre_cropped_to_256_and_padded_with_their_background(colour_set):
    (crop,) = centre_crops([colour_set / "blue" / "0.png"])
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    assert tuple(crop[0, 0]) == (235, 235, 235)


@pytest.mark.parametrize("layout", ["missing", "one-class"])
def test_a_training_folder_that_cannot_be_used_is_refused(tmp_path, layout):
    if layout == "missing":
        with pytest.raises(InputNotFoundError, match="one sub-folder per class"):
            image_folder(tmp_path / "nope")
    else:
        (tmp_path / "only").mkdir()
        iio.imwrite(tmp_path / "only" / "a.png", np.zeros((8, 8, 3), np.uint8))
        with pytest.raises(InputFormatError, match="at least two"):
            image_folder(tmp_path)


def test_training_learns_colours_and_the_export_matches_the_network(colour_set, tmp_path):
    files, labels, classes = image_folder(colour_set)
    settings = TrainSettings(epochs=4, batch_size=4, lr=1e-2, val_fraction=0.2, seed=0, width=8)
    result = train_classifier(files, labels, classes=classes, settings=settings)
    assert result.n_train == 39 and result.n_heldout == 9
    assert result.heldout_accuracy == 1.0, result.history
    assert set(result.per_class_accuracy) == set(classes)

    path = export_classifier(
        result.net, tmp_path / "clf.pt", classes=classes, extra={"heldout_accuracy": 1.0}
    )["torchscript"]
    model = load_classifier(path)
    assert model.metadata["classes"] == classes
    assert model.metadata["input_range"] == [0, 1] and model.metadata["torch_version"] == torch.__version__
    crops = np.stack(list(centre_crops(files[::5])))
    labels_exported, probs = classify(crops, classifier=model)
    with torch.no_grad():
        direct = torch.softmax(result.net(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255), 1).numpy()
    np.testing.assert_allclose(probs, direct, atol=1e-5)
    assert labels_exported.tolist() == labels[::5].tolist()


def test_classifier_train_command_writes_a_file_with_the_contract_metadata(colour_set, tmp_path):
    out = tmp_path / "models" / "clf.pt"
    result = CliRunner().invoke(
        cli,
        [
            "classifier",
            "train",
            str(colour_set),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--val-fraction",
            "0.2",
            "--seed",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    metadata = load_classifier(out).metadata
    assert metadata["kind"] == "classifier" and metadata["classes"] == ["blue", "pink", "teal"]
    assert metadata["heldout_accuracy"] == report["heldout_accuracy"]
    assert metadata["heldout_images"] == 9 and metadata["train_images"] == 39
    assert metadata["training"]["epochs"] == 2 and metadata["training"]["seed"] == 1


def test_pbc_lists_eight_classes(shared_data):
    files, labels, classes = image_folder(shared_data / "pbc")
    assert len(classes) == 8 and "eosinophil" in classes
    assert len(files) == len(labels) >= 1000


@pytest.mark.gpu
def test_training_and_classification_on_cuda_match_the_cpu(colour_set, tmp_path):
    files, labels, classes = image_folder(colour_set)
    settings = TrainSettings(epochs=3, batch_size=4, lr=1e-2, width=8)
    result = train_classifier(files, labels, classes=classes, settings=settings, device="cuda")
    assert result.heldout_accuracy is not None
    assert next(result.net.parameters()).device.type == "cpu", "the trained net comes back on the CPU"
    path = export_classifier(result.net, tmp_path / "clf.pt", classes=classes, extra={})["torchscript"]
    crops = np.stack(list(centre_crops(files)))
    on_cpu = classify(crops, classifier=load_classifier(path), device="cpu")
    on_gpu = classify(crops, classifier=load_classifier(path, device="cuda"), device="cuda", batch_size=7)
    assert on_gpu[0].tolist() == on_cpu[0].tolist()
    np.testing.assert_allclose(on_gpu[1], on_cpu[1], atol=1e-4)
