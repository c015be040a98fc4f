"""The U-Net generator of the thesis (section 3.6.1).

Seven encoder blocks halve the image (5x5 convolution, stride 2, batch norm, LeakyReLU); seven decoder
blocks double it again (nearest 2x upsampling, then a stride-1 5x5 transposed convolution, batch norm,
ReLU), each decoder block after the first reading the matching encoder output through a skip
connection. Upsampling and convolution are separate operations because a stride-2 transposed
convolution leaves checkerboard artefacts (thesis 3.6.1). The last block ends in ``tanh``: input and
output are float RGB (N, 3, H, W) in [-1, 1], with H and W multiples of 2**7 = 128.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TILE_MULTIPLE = 128
ARCHITECTURE = "unet7-k5-nearest"
# Channel multipliers of the encoder blocks, pix2pix style: widen to 8x the base width, then hold.
ENCODER_WIDTHS = (1, 2, 4, 8, 8, 8, 8)
KERNEL = 5


class EncoderBlock(nn.Module):
    """Halve the image: 5x5 convolution with stride 2, batch norm, LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # No bias: the batch norm that follows has its own shift.
        self.conv = nn.Conv2d(in_channels, out_channels, KERNEL, stride=2, padding=KERNEL // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class DecoderBlock(nn.Module):
    """Double the image: nearest 2x upsampling, stride-1 5x5 transposed convolution, batch norm, ReLU.

    ``last=True`` drops the batch norm and ends in ``tanh`` (the output block).
    """

    def __init__(self, in_channels: int, out_channels: int, *, last: bool = False) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(
            in_channels, out_channels, KERNEL, stride=1, padding=KERNEL // 2, bias=last
        )
        self.norm: nn.Module = nn.Identity() if last else nn.BatchNorm2d(out_channels)
        self.act: nn.Module = nn.Tanh() if last else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # By scale factor, not by size: a traced graph then stays valid for every input size.
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.act(self.norm(self.conv(x)))


class UNetGenerator(nn.Module):
    """Encoder-decoder with skip connections mapping (N, 3, H, W) in [-1, 1] to the same shape.

    Parameters
    ----------
    base_filters : int
        Width of the first encoder block; later blocks use up to 8x this. 32 gives about 16 M
        parameters (nearest to the thesis's 20 M), 64 about 65 M, 8 about 1 M (demo and tests).
    residual : bool
        Not in the thesis (``cellbatch train --predict residual``): the network's tanh output is a
        correction added to the input (clipped to [-1, 1]), and the output block starts at zero, so an
        untrained network is the identity and training starts from the input's error rather than
        from a random image. Same layers and parameters as the thesis network.

    Examples
    --------
    >>> g = UNetGenerator(base_filters=4).eval()
    >>> g(torch.zeros(1, 3, 128, 128)).shape
    torch.Size([1, 3, 128, 128])
    """

    def __init__(self, *, base_filters: int = 32, residual: bool = False) -> None:
        super().__init__()
        if base_filters < 1:
            raise ValueError(f"base_filters must be at least 1, not {base_filters}")
        self.base_filters = base_filters
        self.residual = residual
        widths = [base_filters * m for m in ENCODER_WIDTHS]
        self.encoders = nn.ModuleList()
        in_ch = 3
        for w in widths:
            self.encoders.append(EncoderBlock(in_ch, w))
            in_ch = w
        self.decoders = nn.ModuleList()
        # Decoder k produces the width of encoder level (6 - k) and is then concatenated with it.
        for level in range(len(widths) - 2, -1, -1):
            self.decoders.append(DecoderBlock(in_ch, widths[level]))
            in_ch = 2 * widths[level]
        self.output = DecoderBlock(in_ch, 3, last=True)
        if residual:
            nn.init.zeros_(self.output.conv.weight)
            nn.init.zeros_(self.output.conv.bias)

    @property
    def architecture(self) -> str:
        return ARCHITECTURE + ("-residual" if self.residual else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            x = torch.cat([decoder(x), skip], dim=1)
        out = self.output(x)
        return (image + out.to(image.dtype)).clamp(-1.0, 1.0) if self.residual else out


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
