"""The loss terms of the thesis, equations 12 and 18 (GAN), 21 (cycle), 22 (identity), 23 (l1) and 24
(paired); the feature loss (eq. 11) is :func:`cellbatch.models.vgg.feature_loss`.

Norms are means over pixels and channels rather than sums, so loss weights do not depend on the
image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 23: mean absolute difference."""
    return F.l1_loss(output, target)


def generator_gan(fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 18, per patch: ``-mean log D(G(x))`` (flipped targets: the fakes should be judged real)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_gan(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 12, per patch: ``-1/2 mean log D(y) - 1/2 mean log(1 - D(G(x)))``."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)


def cycle(x: torch.Tensor, x_cycled: torch.Tensor, y: torch.Tensor, y_cycled: torch.Tensor) -> torch.Tensor:
    """Eq. 21: ``|y - G(F(y))| + |x - F(G(x))|``."""
    return F.l1_loss(y_cycled, y) + F.l1_loss(x_cycled, x)


def identity(x: torch.Tensor, f_of_x: torch.Tensor, y: torch.Tensor, g_of_y: torch.Tensor) -> torch.Tensor:
    """Eq. 22: ``|y - G(y)| + |x - F(x)|``: each generator leaves images already in its target look alone."""
    return F.l1_loss(g_of_y, y) + F.l1_loss(f_of_x, x)


def paired(
    x_p: torch.Tensor, f_of_y_p: torch.Tensor, y_p: torch.Tensor, g_of_x_p: torch.Tensor
) -> torch.Tensor:
    """Eq. 24: ``|y_p - G(x_p)| + |x_p - F(y_p)|``."""
    return F.l1_loss(g_of_x_p, y_p) + F.l1_loss(f_of_y_p, x_p)
