"""A small white-cell classifier for the agreement check, and how to train and export it.

The network honours the classifier contract (docs/model-files.md): float RGB (N, 3, 256, 256) in [0, 1] in,
logits (N, K) out. It averages the crop down by ``downsample`` first (256 -> 64 by default) and
then runs four conv-BN-ReLU blocks and a global average pool, so it trains in minutes on a CPU. The
averaging is part of the exported graph, so callers always pass full 256x256 crops; training runs it
once per image up front (it commutes with the flips and quarter turns used as augmentation).

Training data is a folder per class (``DIR/<class>/*.jpg``), each image centre-cropped to 256x256 at
its native scale, padded with its background colour when smaller, as the run crops a centred cell.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cellbatch.crop import CROP_SIZE
from cellbatch.errors import InputFormatError, InputNotFoundError
from cellbatch.read import is_image_file, read_image

INPUT_SIZE = CROP_SIZE


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ClassifierNet(nn.Module):
    """Averaging stem + four conv blocks (``width`` .. 8 x ``width`` channels) + linear head.

    Parameters
    ----------
    n_classes
        Number of output logits.
    width
        Channels of the first block; each later block doubles it.
    downsample
        Average-pooling factor applied to the 256x256 input first.

    Examples
    --------
    >>> net = ClassifierNet(8).eval()
    >>> net(torch.zeros(2, 3, 256, 256)).shape
    torch.Size([2, 8])
    """

    def __init__(self, n_classes: int, *, width: int = 16, downsample: int = 4) -> None:
        super().__init__()
        self.downsample = downsample
        self.features = nn.Sequential(
            _block(3, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
            nn.MaxPool2d(2),
            _block(4 * width, 8 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(8 * width, n_classes),
        )

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """The averaging stem: (N, 3, 256, 256) -> (N, 3, 256 / downsample, 256 / downsample)."""
        return F.avg_pool2d(x, self.downsample) if self.downsample > 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.shrink(x))


@dataclass(frozen=True)
class TrainSettings:
    """Settings of ``cellbatch classifier train`` (recorded in the exported metadata)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    val_fraction: float = 0.2
    seed: int = 0
    width: int = 16
    downsample: int = 4


@dataclass(frozen=True)
class TrainResult:
    """A trained network and how it did on the held-out images."""

    net: ClassifierNet
    classes: list[str]
    heldout_accuracy: float | None
    per_class_accuracy: dict[str, float | None]
    n_train: int
    n_heldout: int
    history: list[dict[str, float]]


def image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """List a folder-per-class image set: files, (N,) int64 labels and the sorted class names."""
    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError(f"training set {root} does not exist: pass a folder with one sub-folder per class")
    classes, files, labels = [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in sub.rglob("*") if p.is_file() and is_image_file(p))
        if images:
            labels += [len(classes)] * len(images)
            classes.append(sub.name)
            files += images
    if len(classes) < 2:
        raise InputFormatError(
            f"training set {root} has {len(classes)} class folder(s) with images: it needs one sub-folder "
            "of images per class, at least two"
        )
    return files, np.asarray(labels, np.int64), classes


def centre_crops(files: list[Path], *, size: int = INPUT_SIZE) -> Iterator[np.ndarray]:
    """Each file decoded and centre-cropped to (size, size, 3) uint8, padded with its background colour."""
    from cellbatch.crop import background_colour, crop_window

    for path in files:
        image = read_image(path)
        h, w = image.shape[:2]
        # crop_window rounds the centre; (w - 1) / 2 is the true centre of an even or odd width.
        crop, _ = crop_window(image, (w - 1) / 2, (h - 1) / 2, size=size, fill=background_colour(image))
        yield crop


def split_heldout(labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: indices to train on and indices held out (``fraction`` of each class).

    Examples
    --------
    >>> train, held = split_heldout(np.array([0] * 10 + [1] * 10), fraction=0.2, seed=0)
    >>> len(train), len(held)
    (16, 4)
    """
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_held = int(round(fraction * len(members)))
        held += members[:n_held].tolist()
        train += members[n_held:].tolist()
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(held, np.int64))


def train_classifier(
    files: list[Path],
    labels: np.ndarray,
    *,
    classes: list[str],
    settings: TrainSettings,
    device: str = "cpu",
    log: Callable[[str], Any] | None = None,
) -> TrainResult:
    """Train :class:`ClassifierNet` on the files, holding out ``settings.val_fraction`` of each class.

    Augmentation is flips and quarter turns only: a cell has no up or left, but its colours are what
    the check must notice, so they are never jittered.
    """
    torch.manual_seed(settings.seed)
    net = ClassifierNet(len(classes), width=settings.width, downsample=settings.downsample)
    small = _shrunk_inputs(net, files)
    y = torch.from_numpy(labels)
    train_idx, held_idx = split_heldout(labels, fraction=settings.val_fraction, seed=settings.seed)
    if len(train_idx) == 0:
        raise InputFormatError("the training set is empty after holding out images: add images or lower --val-fraction")

    net.to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(train_idx) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(settings.seed)
    history = []
    for epoch in range(settings.epochs):
        net.train()
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=generator)]
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            x = _augment(small[batch], generator).to(device)
            target = y[batch].to(device)
            logits = net.features(x)
            loss = F.cross_entropy(logits, target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += len(batch)
            correct += int((logits.argmax(1) == target).sum())
            loss_sum += float(loss.detach()) * len(batch)
        record = {"epoch": epoch + 1, "loss": loss_sum / total, "train_accuracy": correct / total}
        if len(held_idx):
            record["heldout_accuracy"] = _accuracy(net, small[held_idx], y[held_idx], device)[0]
        history.append(record)
        if log is not None:
            log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    _recalibrate_batchnorm(net, small[train_idx], device)
    accuracy, per_class = None, {name: None for name in classes}
    if len(held_idx):
        accuracy, predicted = _accuracy(net, small[held_idx], y[held_idx], device)
        truth = labels[held_idx]
        for i, name in enumerate(classes):
            members = truth == i
            per_class[name] = float((predicted[members] == i).mean()) if members.any() else None
    net.eval().cpu()
    return TrainResult(
        net=net,
        classes=list(classes),
        heldout_accuracy=accuracy,
        per_class_accuracy=per_class,
        n_train=len(train_idx),
        n_heldout=len(held_idx),
        history=history,
    )


def export_classifier(
    net: ClassifierNet,
    path: str | Path,
    *,
    classes: list[str],
    extra: dict[str, Any],
    formats: Sequence[str] = ("torchscript",),
) -> dict[str, Path]:
    """Trace and freeze the network and write it in ``formats`` with the classifier contract metadata plus
    ``extra`` and a self-test (:func:`cellbatch.export.write_model_files`); returns the files by format."""
    from cellbatch.export import write_model_files
    from cellbatch.modelfile import torchscript_calls

    net = net.eval().cpu()
    with torch.no_grad(), torchscript_calls():
        traced = torch.jit.trace(net, torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
        frozen = torch.jit.freeze(traced)
    metadata = {"kind": "classifier", "classes": list(classes), "input_range": [0, 1], **extra}
    return write_model_files(frozen, path, metadata=metadata, formats=formats, example_size=INPUT_SIZE)


def _shrunk_inputs(net: ClassifierNet, files: list[Path], chunk: int = 64) -> torch.Tensor:
    """All images through the averaging stem once: (N, 3, s, s) float32, so epochs skip the 256x256 work."""
    parts, pending = [], []
    for crop in centre_crops(files):
        pending.append(crop)
        if len(pending) == chunk:
            parts.append(_shrink_chunk(net, pending))
            pending = []
    if pending:
        parts.append(_shrink_chunk(net, pending))
    return torch.cat(parts)


def _shrink_chunk(net: ClassifierNet, crops: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return net.shrink(x).contiguous()


def _recalibrate_batchnorm(net: ClassifierNet, x: torch.Tensor, device: str, chunk: int = 256) -> None:
    """Set batch-norm statistics to the exact mean and variance of the final network on the training set.

    The running averages trail the weights; after a short training they describe an earlier network
    and cost held-out accuracy (a few epochs on a small set can lose a third).
    """
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch below
    net.train()
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            net.features(x[start : start + chunk].to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    net.eval()


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # One of the 8 flips/quarter turns per image: the dihedral group of the square.
    code = torch.randint(8, (len(x),), generator=generator)
    out = torch.empty_like(x)
    for c in range(8):
        chosen = code == c
        if chosen.any():
            view = x[chosen].flip(3) if c >= 4 else x[chosen]
            out[chosen] = torch.rot90(view, c % 4, dims=(2, 3))
    return out


def _accuracy(net: ClassifierNet, x: torch.Tensor, y: torch.Tensor, device: str) -> tuple[float, np.ndarray]:
    net.eval()
    with torch.inference_mode():
        predicted = torch.cat([net.features(x[i : i + 256].to(device)).argmax(1).cpu() for i in range(0, len(x), 256)])
    return float((predicted == y).float().mean()), predicted.numpy()
