"""The thesis networks: shapes, ranges, parameter counts, and the VGG-16 torchvision layout."""

from __future__ import annotations

import pytest
import torch

from cellbatch.errors import ModelError
from cellbatch.models import (
    PatchDiscriminator,
    UNetGenerator,
    VGG16Features,
    count_parameters,
    feature_loss,
    gram_matrix,
    load_vgg16,
)
from cellbatch.models.generator import FrozenDecoderBlock, phase_major, shuffle_phase_major

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("size", [(128, 128), (256, 128), (256, 384)])
def test_generator_keeps_shape_and_stays_in_tanh_range(size: tuple[int, int]) -> None:
    g = UNetGenerator(base_filters=4).eval()
    x = torch.rand(2, 3, *size) * 2 - 1
    with torch.no_grad():
        y = g(x)
    assert y.shape == x.shape
    assert y.min() >= -1 and y.max() <= 1


def test_generator_has_seven_halving_encoders_and_uses_every_skip() -> None:
    g = UNetGenerator(base_filters=4).eval()
    assert len(g.encoders) == 7 and len(g.decoders) == 6
    # A change in any 2x2 block of the input reaches the output through the shallowest skip.
    x = torch.zeros(1, 3, 128, 128, requires_grad=True)
    g(x)[0, :, 64, 64].sum().backward()
    assert x.grad is not None and x.grad[0, :, 62:67, 62:67].abs().sum() > 0


def _thesis_decoder_forward(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A decoder block as the thesis writes it: upsample, then the 5x5 transposed convolution."""
    x = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    return block.act(block.norm(block.conv(x)))


def _with_random_batch_norm(g: UNetGenerator, seed: int) -> UNetGenerator:
    gen = torch.Generator().manual_seed(seed)
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight.data, 0.5, 1.5),
                              (m.bias.data, -0.2, 0.2)):
                t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return g


@pytest.mark.parametrize("training", [True, False])
def test_phase_decoder_is_upsample_then_transposed_convolution(training: bool) -> None:
    # Same function and same gradients as the thesis's formulation, in training (batch statistics)
    # and in eval mode (batch norm folded into the phase convolution).
    torch.manual_seed(0)
    g = _with_random_batch_norm(UNetGenerator(base_filters=4), seed=1).train(training)
    for block in [*g.decoders, g.output]:
        x = torch.randn(2, block.conv.in_channels, 8, 12, requires_grad=True)
        want = _thesis_decoder_forward(block, x)
        (grad_want,) = torch.autograd.grad(want.square().sum(), x)
        got = block(x)
        (grad_got,) = torch.autograd.grad(got.square().sum(), x)
        assert got.shape == want.shape == (2, block.conv.out_channels, 16, 24)
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
        assert torch.allclose(grad_got, grad_want, atol=1e-4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_exported_decoder_block_is_the_eval_block_with_its_channels_reordered(layout: torch.memory_format) -> None:
    # The export form (phase-major channels, activation before the shuffle, tanh in float32) is the
    # same function in either layout a caller passes, and hands channels_last on to the next block.
    torch.manual_seed(0)
    g = _with_random_batch_norm(UNetGenerator(base_filters=4), seed=2).eval()
    for block in [*g.decoders, g.output]:
        x = torch.randn(2, block.conv.in_channels, 8, 12).contiguous(memory_format=layout)
        with torch.no_grad():
            want, got = block(x), FrozenDecoderBlock(block)(x)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_phase_major_shuffle_is_pixel_shuffle_of_the_reordered_channels() -> None:
    y = torch.randn(2, 4 * 5, 3, 4)
    # phase_major reorders dim 0 (a weight's output channels); here the channels are dim 1
    reordered = phase_major(y.transpose(0, 1)).transpose(0, 1)
    assert torch.equal(shuffle_phase_major(reordered), torch.nn.functional.pixel_shuffle(y, 2))


def test_generator_width_sets_parameter_count() -> None:
    # 5x5 kernels throughout, widths base x (1, 2, 4, 8, 8, 8, 8): count grows with the square of the width.
    assert count_parameters(UNetGenerator(base_filters=8)) == 1_023_723
    assert count_parameters(UNetGenerator(base_filters=32)) == 16_344_483


def test_discriminator_outputs_mean_patch_probability() -> None:
    d = PatchDiscriminator(in_channels=6, base_filters=8).eval()
    x = torch.rand(3, 6, 128, 128)
    p = d(x)
    assert p.shape == (3,)
    assert torch.allclose(p, torch.sigmoid(d.patch_logits(x)).mean(dim=(1, 2, 3)))
    assert d.patch_logits(x).shape == (3, 1, 14, 14)


def test_discriminator_matches_thesis_parameter_count() -> None:
    # The thesis counts 11,047,809 in Keras: conv biases everywhere and batch-norm running statistics.
    d = PatchDiscriminator(in_channels=6, base_filters=128)
    norms = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    missing_biases = sum(m.num_features for m in norms)
    running_stats = 2 * missing_biases
    assert count_parameters(d) + missing_biases + running_stats == 11_047_809


def test_vgg_loads_torchvision_state_dict_and_ignores_classifier(tmp_path) -> None:
    reference = VGG16Features()
    state = {f"features.{k}": torch.randn_like(v) for k, v in reference.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4096, 25088 // 512)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    net = load_vgg16(path)
    assert torch.equal(net.features[28].weight, state["features.28.weight"])
    assert not any(p.requires_grad for p in net.parameters())
    assert net(torch.zeros(1, 3, 128, 128)).shape == (1, 512, 4, 4)


def test_vgg_rejects_a_state_dict_of_another_layout(tmp_path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(ModelError, match="torchvision VGG-16 layout"):
        load_vgg16(path)


def test_gram_matrix_is_normalised_outer_product() -> None:
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2)
    expected = torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4
    assert torch.allclose(gram_matrix(f), expected)


def test_feature_loss_is_zero_for_equal_images_and_positive_otherwise() -> None:
    vgg = load_vgg16(None, seed=1)
    a = torch.rand(2, 3, 64, 64) * 2 - 1
    assert float(feature_loss(vgg, a, a)) == pytest.approx(0.0, abs=1e-12)
    assert float(feature_loss(vgg, a, -a)) > 0
