"""The four training setups of the thesis (sections 3.2-3.5, appendix A).

Each setup owns its networks and optimisers and makes one optimisation step from a :class:`Batch`:

- ``l1net``: generator G alone, l1 loss (eq. 23).
- ``l1gan``: G and a conditional PatchGAN D on ``cat([x, y])`` (Pix2Pix): GAN (eq. 18) + paired l1.
- ``ccgan``: G (source->target), F (target->source) and two PatchGANs: GAN + cycle + identity + paired
  (eq. 25).
- ``pcnet``: G and F, no discriminators: cycle + identity + paired + VGG-16 Gram feature loss (eq. 26).

G is the network that ``cellbatch model export`` writes.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cellbatch.errors import ConfigError
from cellbatch.models import PatchDiscriminator, UNetGenerator, feature_loss
from cellbatch.models.vgg import VGG16Features
from cellbatch.train import losses

# Appendix A: loss weights and batch sizes of the thesis.
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "l1net": {"l1": 10.0},
    "l1gan": {"disc": 1.0, "paired": 10.0},
    "ccgan": {"disc": 1.0, "cycle": 10.0, "identity": 10.0, "paired": 10.0},
    "pcnet": {"cycle": 10.0, "identity": 10.0, "paired": 10.0, "feat": 10.0},
}
DEFAULT_BATCH: dict[str, int] = {"l1net": 8, "l1gan": 4, "ccgan": 4, "pcnet": 2}
SETUPS = tuple(DEFAULT_WEIGHTS)
# Setups that also learn from unpaired images (cycle and identity terms).
CYCLIC = frozenset({"ccgan", "pcnet"})
ADAM_BETAS = (0.5, 0.999)  # Pix2Pix and CycleGAN use beta1 = 0.5 for GAN stability


@dataclass
class Batch:
    """One step's images on the training device, float (N, 3, Y, X) in [-1, 1].

    ``x_p, y_p`` are aligned source/target pairs; ``x, y`` independent source and target images
    (unpaired folders, or the pairs drawn independently) for the cycle and identity terms.
    """

    x_p: torch.Tensor
    y_p: torch.Tensor
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None


def _detached(terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in terms.items()}


def resolve_weights(setup: str, overrides: Mapping[str, float]) -> dict[str, float]:
    """The setup's default weights with ``overrides`` applied; unknown names are a ConfigError."""
    weights = dict(DEFAULT_WEIGHTS[setup])
    for name, value in overrides.items():
        if name not in weights:
            raise ConfigError(
                f"--weight {name}= does not apply to {setup}: its weights are {', '.join(sorted(weights))}"
            )
        weights[name] = float(value)
    return weights


class Setup(abc.ABC):
    """Networks, optimisers and the step of one training setup."""

    name = ""

    def __init__(
        self,
        *,
        weights: Mapping[str, float],
        base_filters: int,
        disc_base_filters: int,
        lr: float,
        device: torch.device,
        bf16: bool,
        vgg: VGG16Features | None = None,
        residual: bool = False,
        ema: float = 0.0,
    ) -> None:
        self.weights = dict(weights)
        self.device = device
        self.bf16 = bf16
        self.residual = residual
        self.networks: dict[str, torch.nn.Module] = {"G": UNetGenerator(base_filters=base_filters, residual=residual)}
        self.build(base_filters=base_filters, disc_base_filters=disc_base_filters, vgg=vgg)
        for name, net in self.networks.items():
            net.to(device).train(name != "VGG")
        # fused: one kernel updates every parameter; torch's default on a CPU loops over the tensors,
        # 14 % of a CPU-recipe step (the update itself is the same Adam)
        self.optimizers = {
            name: torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, fused=True)
            for name, params in self.param_groups().items()
        }
        # A moving average of G's weights and batch-norm statistics over the last ~1 / (1 - ema) steps:
        # the running statistics alone average ~10 batches (momentum 0.1), so the exported generator
        # otherwise depends on which few augmented batches came last.
        self.average = None
        if ema:
            self.average = AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True)

    def build(self, *, base_filters: int, disc_base_filters: int, vgg: VGG16Features | None) -> None:  # noqa: B027
        """Add the networks beyond G (none for L1Net)."""

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"G": list(self.networks["G"].parameters())}

    def set_lr(self, factor: float) -> None:
        """Scale every optimiser's learning rate to ``factor`` times its initial rate (schedules)."""
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @property
    def generator(self) -> UNetGenerator:
        return self.networks["G"]  # type: ignore[return-value]

    @property
    def result(self) -> UNetGenerator:
        """The generator a checkpoint exports and validation measures: G, or its moving average."""
        return self.generator if self.average is None else self.average.module  # type: ignore[return-value]

    @abc.abstractmethod
    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimisation step; returns the loss terms (unweighted) and the weighted total.

        The values are detached tensors on the training device, so a step never waits for the GPU.
        """

    def _update(self, name: str, loss: torch.Tensor) -> None:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if name == "G" and self.average is not None:
            self.average.update_parameters(self.generator)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "models": {k: v.state_dict() for k, v in self.networks.items() if k != "VGG"},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
        }
        if self.average is not None:
            state["average"] = {"G": self.average.module.state_dict(), "n_averaged": self.average.n_averaged}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, net in self.networks.items():
            if name != "VGG":
                net.load_state_dict(state["models"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        # A checkpoint written without an average (an older cellbatch, or --ema 0 before) starts one here.
        if self.average is not None and "average" in state:
            self.average.module.load_state_dict(state["average"]["G"])
            self.average.n_averaged.copy_(state["average"]["n_averaged"])


class L1Net(Setup):
    """Section 3.2: the generator trained with the l1 loss alone."""

    name = "l1net"

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        with self.autocast():
            term = losses.l1(self.generator(batch.x_p), batch.y_p)
        total = self.weights["l1"] * term
        self._update("G", total)
        return _detached({"l1": term, "total": total})


class L1GAN(Setup):
    """Section 3.3: Pix2Pix-style conditional GAN with a paired l1 loss."""

    name = "l1gan"

    def build(self, *, base_filters: int, disc_base_filters: int, vgg: VGG16Features | None) -> None:
        self.networks["D"] = PatchDiscriminator(in_channels=6, base_filters=disc_base_filters)

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {**super().param_groups(), "D": list(self.networks["D"].parameters())}

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        disc = self.networks["D"]
        x, y = batch.x_p, batch.y_p
        with self.autocast():
            fake = self.generator(x)
            d_loss = losses.discriminator_gan(
                disc.patch_logits(torch.cat([x, y], 1)), disc.patch_logits(torch.cat([x, fake.detach()], 1))
            )
        self._update("D", d_loss)
        with self.autocast():
            gan = losses.generator_gan(disc.patch_logits(torch.cat([x, fake], 1)))
            pair = losses.l1(fake, y)
        total = self.weights["disc"] * gan + self.weights["paired"] * pair
        self._update("G", total)
        return _detached({"disc": gan, "paired": pair, "d_loss": d_loss, "total": total})


class _Cyclic(Setup):
    """Shared part of ccGAN and pcNET: the second generator F and the cycle, identity and paired terms."""

    def build(self, *, base_filters: int, disc_base_filters: int, vgg: VGG16Features | None) -> None:
        self.networks["F"] = UNetGenerator(base_filters=base_filters, residual=self.residual)

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        # G and F share one optimiser: the cycle terms couple them.
        return {"G": [*self.networks["G"].parameters(), *self.networks["F"].parameters()]}

    def _cycle_terms(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        g, f = self.networks["G"], self.networks["F"]
        x, y = batch.x, batch.y
        assert x is not None and y is not None
        out = {"g_x": g(x), "f_y": f(y), "g_xp": g(batch.x_p), "f_yp": f(batch.y_p)}
        terms = {
            "cycle": losses.cycle(x, f(out["g_x"]), y, g(out["f_y"])),
            "identity": losses.identity(x, f(x), y, g(y)),
            "paired": losses.paired(batch.x_p, out["f_yp"], batch.y_p, out["g_xp"]),
        }
        return out, terms


class CCGAN(_Cyclic):
    """Section 3.4: conditional CycleGAN, eq. 25 (GAN + cycle + identity + paired) for G and F."""

    name = "ccgan"

    def build(self, *, base_filters: int, disc_base_filters: int, vgg: VGG16Features | None) -> None:
        super().build(base_filters=base_filters, disc_base_filters=disc_base_filters, vgg=vgg)
        self.networks["D_Y"] = PatchDiscriminator(in_channels=3, base_filters=disc_base_filters)
        self.networks["D_X"] = PatchDiscriminator(in_channels=3, base_filters=disc_base_filters)

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {
            **super().param_groups(),
            "D": [*self.networks["D_Y"].parameters(), *self.networks["D_X"].parameters()],
        }

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        d_y, d_x = self.networks["D_Y"], self.networks["D_X"]
        with self.autocast():
            out, terms = self._cycle_terms(batch)
            terms["disc"] = losses.generator_gan(d_y.patch_logits(out["g_x"])) + losses.generator_gan(
                d_x.patch_logits(out["f_y"])
            )
            total = sum(self.weights[k] * v for k, v in terms.items())
        self._update("G", total)
        with self.autocast():
            d_loss = losses.discriminator_gan(
                d_y.patch_logits(batch.y), d_y.patch_logits(out["g_x"].detach())
            ) + losses.discriminator_gan(d_x.patch_logits(batch.x), d_x.patch_logits(out["f_y"].detach()))
        self._update("D", d_loss)
        return _detached({**terms, "d_loss": d_loss, "total": total})


class PCNet(_Cyclic):
    """Section 3.5: perceptual cycle network, eq. 26 (cycle + identity + paired + Gram feature loss)."""

    name = "pcnet"

    def build(self, *, base_filters: int, disc_base_filters: int, vgg: VGG16Features | None) -> None:
        super().build(base_filters=base_filters, disc_base_filters=disc_base_filters, vgg=vgg)
        if vgg is None:
            raise ConfigError("pcnet needs VGG-16 weights: pass --vgg-weights FILE")
        self.networks["VGG"] = vgg.eval()

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        vgg = self.networks["VGG"]
        with self.autocast():
            out, terms = self._cycle_terms(batch)
            terms["feat"] = feature_loss(vgg, out["g_xp"], batch.y_p) + feature_loss(
                vgg, out["f_yp"], batch.x_p
            )
            total = sum(self.weights[k] * v for k, v in terms.items())
        self._update("G", total)
        return _detached({**terms, "total": total})


SETUP_CLASSES: dict[str, type[Setup]] = {cls.name: cls for cls in (L1Net, L1GAN, CCGAN, PCNet)}
