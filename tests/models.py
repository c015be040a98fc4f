"""Tiny TorchScript models for tests: they obey (or break) the model contract on purpose."""

from __future__ import annotations

from pathlib import Path

import torch

from cellbatch.modelfile import save_model


class Negate(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SwapRedBlue(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)


class ReturnsNaN(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


class HalvesSize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2, ::2]


class NeedsTileMultiple(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[2] % 128 == 0 and x.shape[3] % 128 == 0, "input not padded to 128")
        return x


def save_generator(module: torch.nn.Module, path: Path, **metadata) -> Path:
    """Script ``module`` and save it as a generator file with contract metadata."""
    meta = {"kind": "generator", "input_range": [-1, 1], "output_range": [-1, 1], "tile_multiple": 128,
            "trained": True, **metadata}
    return save_model(torch.jit.script(module), path, meta)
