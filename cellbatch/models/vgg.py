"""VGG-16 convolutional features and the Gram-matrix feature loss (thesis 2.3.8, eq. 11; 3.5).

The layer layout is torchvision's ``vgg16().features`` so that a torchvision state dict
(``features.0.weight`` ... ``features.28.bias``) loads as it is; torchvision itself is not needed.
The weights come from a file the user supplies (ImageNet-trained weights are not shipped).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cellbatch.errors import InputNotFoundError, ModelError

# Output channels per convolution, "M" a 2x2 max pool (VGG-16, configuration D of Simonyan & Zisserman).
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG16Features(nn.Module):
    """VGG-16 up to the fifth max pool, frozen, taking RGB in [-1, 1].

    The input is mapped to [0, 1] and standardised with the ImageNet statistics the published
    weights were trained with. The parameters never train (the network is only a loss).
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = int(item)
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1.0) / 2.0 - self.mean) / self.std
        return self.features(x)


def load_vgg16(path: str | Path | None, *, seed: int = 0) -> VGG16Features:
    """VGG-16 features with weights from a torchvision-layout state dict, or random weights.

    Parameters
    ----------
    path : str, Path or None
        A file saved with ``torch.save(state_dict)``: a whole torchvision ``vgg16`` state dict
        (``features.N.*`` keys; ``classifier.*`` keys are ignored) or ``vgg16().features`` alone
        (``N.*`` keys). ``None`` gives random weights from ``seed`` (tests only: a random VGG
        measures nothing perceptual).
    seed : int
        Seed of the random initialisation when ``path`` is ``None``.
    """
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return VGG16Features().eval()
    net = VGG16Features()
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"VGG-16 weights {path} do not exist: pass a torchvision vgg16 state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for foreign files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{path} is not a torch state dict ({reason}): save one with torch.save(model.state_dict())"
        ) from exc
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict: save model.state_dict()")
    features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        missing, unexpected = net.features.load_state_dict(features, strict=False)
    except RuntimeError as exc:  # a key of the right name with the wrong shape
        problem = str(exc).splitlines()[-1].strip()
    else:
        problem = ""
        if missing or unexpected:
            problem = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
    if problem:
        raise ModelError(
            f"{path} does not fit the torchvision VGG-16 layout ({problem}): "
            "pass a torchvision vgg16 or vgg16().features state dict"
        )
    return net.eval()


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrices (N, C, C) of features (N, C, H, W), divided by C*H*W (thesis eq. 11)."""
    n, c, h, w = features.shape
    psi = features.reshape(n, c, h * w)
    return psi @ psi.transpose(1, 2) / (c * h * w)


def feature_loss(vgg: VGG16Features, generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius distance of the Gram matrices after the fifth max pool, mean over the batch."""
    g_gen = gram_matrix(vgg(generated).float())
    with torch.no_grad():
        g_tgt = gram_matrix(vgg(target).float())
    return ((g_gen - g_tgt) ** 2).sum(dim=(1, 2)).mean()
