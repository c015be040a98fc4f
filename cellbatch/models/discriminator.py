"""The PatchGAN discriminator of the thesis (section 3.6.2).

Five 4x4 convolution blocks (stride 2 for the first three, 1 for the last two), batch norm on all but
the first and the last, LeakyReLU between them, a sigmoid per patch and the mean over patches. Each
output patch sees a 70x70 window of the input, so the discriminator judges local texture only; the
l1, cycle and feature losses carry the low frequencies.
"""

from __future__ import annotations

import torch
from torch import nn

KERNEL = 4


class PatchDiscriminator(nn.Module):
    """Probability that an image (or an image pair, stacked on channels) is real.

    Parameters
    ----------
    in_channels : int
        3 for an image alone (ccGAN), 6 for a conditional pair ``cat([x, y], 1)`` (L1GAN).
    base_filters : int
        Width of the first block; later blocks use 2x, 4x and 8x. The thesis's 11,047,809
        parameters (a Keras count: convolution biases everywhere and the batch-norm running
        statistics included) correspond to ``in_channels=6, base_filters=128``.

    Notes
    -----
    ``forward`` returns the mean patch probability (N,) as in the thesis; training uses
    :meth:`patch_logits` so that the cross-entropy is computed per patch from logits, which is
    numerically stable where ``log(sigmoid(.))`` underflows.
    """

    def __init__(self, *, in_channels: int = 3, base_filters: int = 64) -> None:
        super().__init__()
        f = base_filters
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, f, KERNEL, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(f, 2 * f, KERNEL, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * f),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * f, 4 * f, KERNEL, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(4 * f),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * f, 8 * f, KERNEL, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(8 * f),
            nn.LeakyReLU(0.2),
            nn.Conv2d(8 * f, 1, KERNEL, stride=1, padding=1),
        )

    def patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch logits (N, 1, h, w)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x)).mean(dim=(1, 2, 3))
