"""The U-Net generator of the thesis (section 3.6.1).

Seven encoder blocks halve the image (5x5 convolution, stride 2, batch norm, LeakyReLU); seven decoder
blocks double it again (nearest 2x upsampling, then a stride-1 5x5 transposed convolution, batch norm,
ReLU), each decoder block after the first reading the matching encoder output through a skip
connection. Upsampling and convolution are separate operations because a stride-2 transposed
convolution leaves checkerboard artefacts (thesis 3.6.1). The last block ends in ``tanh``: input and
output are float RGB (N, 3, H, W) in [-1, 1], with H and W multiples of 2**7 = 128.

A decoder block computes "nearest 2x upsampling, then 5x5 transposed convolution" without building
the upsampled image: each of the four output phases (even/odd row, even/odd column) sees only a 3x3
neighbourhood of the input, with the 5x5 taps that land on the same input pixel summed, so the
block is one 3x3 convolution with four times the output channels followed by a pixel shuffle
(:func:`phase_weights`). The result is the same function, with the same parameters (the transposed
convolution's weight stays where checkpoints expect it), at 36 % of the multiply-adds and without
the upsampled copy: a thesis-size generator runs 2.7x faster in bf16 on a 2-core CPU (eager, 2
threads: 12.5 ms a crop instead of 34), and trains 1.4-2.1x faster. In eval mode the batch
norm is folded into that convolution, so an exported graph is convolutions, shuffles and
activations only.
"""

from __future__ import annotations

import copy

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
        # training normalises by the batch statistics of the shuffled image; eval folds the norm in
        batch_norm = self.training and isinstance(self.norm, nn.BatchNorm2d)
        weight, bias = self.phase_convolution(fold_norm=not batch_norm)
        y = F.pixel_shuffle(F.conv2d(x, weight, bias, padding=1), 2)
        return self.act(self.norm(y) if batch_norm else y)

    def phase_convolution(self, *, fold_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias of this block's 3x3 phase convolution, with the eval-mode batch norm folded in."""
        weight = phase_weights(self.conv.weight)
        bias = None if self.conv.bias is None else self.conv.bias.repeat_interleave(4)
        if fold_norm and isinstance(self.norm, nn.BatchNorm2d):
            weight, bias = _fold_batch_norm(weight, bias, self.norm)
        return weight, bias


class FrozenDecoderBlock(nn.Module):
    """An eval-mode :class:`DecoderBlock` with its phase convolution computed once (for export).

    The exported graph reorders the block for speed without changing its function: the convolution's
    output channels are phase-major (channel ``(2a + b) * out + c``, see :func:`phase_major`), the
    activation runs before the shuffle (an elementwise function commutes with moving pixels), and the
    shuffle is :func:`shuffle_phase_major`. In the channels_last layout a run uses, that shuffle moves
    whole runs of ``out`` channels where ``pixel_shuffle`` gathers them one value at a time. The
    output block's ``tanh`` runs in float32: torch's bf16 ``tanh`` took 5.2-5.5 ms for a batch's
    output against 2.9-3.8 for the cast and the float32 one, and the run converts the output to
    float32 anyway. Together: a thesis-size
    generator in bf16 with its pre- and post-processing, 9.5-10.1 against 10.3-10.9 ms a crop on one
    core (batch 16, the 2-core development machine with AMX; docs/devices.md).
    """

    def __init__(self, block: DecoderBlock) -> None:
        super().__init__()
        with torch.no_grad():
            weight, bias = block.phase_convolution()
            weight, bias = phase_major(weight), None if bias is None else phase_major(bias)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.act = block.act
        self.float_output = isinstance(block.act, nn.Tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, padding=1)
        if self.float_output:  # a Python bool: tracing keeps only the branch taken
            y = y.float()
        return shuffle_phase_major(self.act(y))


def phase_major(t: torch.Tensor) -> torch.Tensor:
    """Reorder a phase convolution's output channels (dim 0) from ``4c + 2a + b`` to ``(2a + b) * C + c``."""
    c = t.shape[0] // 4
    return t.reshape(c, 4, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def shuffle_phase_major(y: torch.Tensor) -> torch.Tensor:
    """(N, 4C, H, W) with phase-major channels -> (N, C, 2H, 2W): ``pixel_shuffle`` for that channel order.

    Output pixel (2i + a, 2j + b) takes channels ``(2a + b) * C`` up to ``(2a + b) * C + C - 1`` of input
    pixel (i, j): ONNX's DepthToSpace in its default (DCR) mode. Written as reshapes of the
    channels-last view, so in that layout it is one copy of contiguous runs of C values, and its
    result is channels_last again.
    """
    # no sizes read from the tensor: a traced graph stays free of shape arithmetic
    pixels = y.permute(0, 2, 3, 1).unflatten(3, (2, 2, -1))  # (N, H, W, a, b, C)
    return pixels.permute(0, 1, 3, 2, 4, 5).flatten(3, 4).flatten(1, 2).permute(0, 3, 1, 2)


# Which of the 5 taps of a 5x5 kernel, applied to a nearest-2x-upsampled image, read input row
# i-1, i and i+1 for an output row of even (0) and odd (1) phase.
_PHASE_TAPS = torch.tensor([
    [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
    [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]],
], dtype=torch.float32)
# The same as one linear map from a kernel's 25 taps to its (row phase, column phase, 3, 3) taps.
_PHASE_MAP = torch.einsum("aik,bjl->abijkl", _PHASE_TAPS, _PHASE_TAPS).reshape(36, 25)


def phase_weights(transposed: torch.Tensor) -> torch.Tensor:
    """The 3x3 convolution weight equal to nearest 2x upsampling then a 5x5 transposed convolution.

    ``transposed`` is a stride-1, padding-2 ``ConvTranspose2d`` weight (in, out, 5, 5); the result
    (4 * out, in, 3, 3), applied with padding 1 and followed by ``pixel_shuffle(2)``, gives the same
    output. A stride-1 transposed convolution is the convolution with the kernel flipped and its
    channel axes swapped; output channel ``4c + 2a + b`` is channel c at row phase a, column phase b.
    Training recomputes this every step: one matrix product (forward and backward) costs half of
    what the equivalent two-sided einsum did, 22 % of a step of the CPU recipe.
    """
    kernel = transposed.flip(2, 3).transpose(0, 1)  # as a plain convolution: (out, in, 5, 5)
    out_ch, in_ch = kernel.shape[:2]
    phase_map = _PHASE_MAP.to(device=kernel.device, dtype=kernel.dtype)
    phased = (kernel.reshape(out_ch * in_ch, 25) @ phase_map.T).reshape(out_ch, in_ch, 2, 2, 3, 3)
    return phased.permute(0, 2, 3, 1, 4, 5).reshape(4 * out_ch, in_ch, 3, 3)


def _fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a phase convolution with the eval-mode batch norm after its shuffle folded in."""
    assert norm.running_var is not None and norm.running_mean is not None
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    scale, shift = scale.repeat_interleave(4), shift.repeat_interleave(4)
    folded_bias = shift if bias is None else bias * scale + shift
    return weight * scale.view(-1, 1, 1, 1), folded_bias


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

    def for_inference(self) -> UNetGenerator:
        """An eval-mode copy whose decoders hold their phase convolutions as constants.

        The same function as ``self.eval()``; a traced graph of it has no weight arithmetic left
        for every call to redo (tracing records operations, it does not fold them).
        """
        frozen = copy.deepcopy(self).eval()
        for i, block in enumerate(frozen.decoders):
            frozen.decoders[i] = FrozenDecoderBlock(block)
        frozen.output = FrozenDecoderBlock(frozen.output)
        return frozen

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
