import numpy as np
import pytest
import torch

from cellbatch.errors import InputNotFoundError, ModelError
from cellbatch.generate import Generator, from_range, to_range
from tests.models import HalvesSize, Identity, NeedsTileMultiple, Negate, ReturnsNaN, save_generator


@pytest.fixture
def crops():
    return np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)


def test_negating_generator_gives_255_minus_crop(tmp_path, crops):
    gen = Generator.load(save_generator(Negate(), tmp_path / "neg.pt"))
    assert np.array_equal(gen.generate(crops), 255 - crops)


def test_range_round_trip_is_exact():
    x = torch.from_numpy(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3))
    assert torch.equal(from_range(to_range(x, (-1, 1)), (-1, 1)), x)
    assert torch.equal(from_range(to_range(x, (0, 1)), (0, 1)), x)
    assert to_range(x, (-1, 1)).shape == (1, 3, 16, 16)


def test_crops_are_padded_to_the_tile_multiple_and_cropped_back(tmp_path):
    gen = Generator.load(save_generator(NeedsTileMultiple(), tmp_path / "tile.pt"))
    crops = np.random.default_rng(1).integers(0, 256, (2, 100, 150, 3), dtype=np.uint8)
    assert np.array_equal(gen.generate(crops), crops)


def test_nan_output_is_a_model_error(tmp_path, crops):
    gen = Generator.load(save_generator(ReturnsNaN(), tmp_path / "nan.pt"))
    with pytest.raises(ModelError, match="NaN"):
        gen.generate(crops)


def test_wrong_output_shape_is_a_model_error(tmp_path, crops):
    gen = Generator.load(save_generator(HalvesSize(), tmp_path / "half.pt"))
    with pytest.raises(ModelError, match="shape"):
        gen.generate(crops)


def test_a_state_dict_is_not_a_model(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelError, match="not a TorchScript archive"):
        Generator.load(path)


def test_missing_model_file_names_the_path(tmp_path):
    with pytest.raises(InputNotFoundError, match="nope.pt"):
        Generator.load(tmp_path / "nope.pt")


def test_sha256_mismatch_is_refused(tmp_path):
    path = save_generator(Identity(), tmp_path / "id.pt")
    with pytest.raises(ModelError, match="sha256"):
        Generator.load(path, expected_sha256="0" * 64)


def test_a_classifier_is_not_a_generator(tmp_path):
    from cellbatch.modelfile import save_model

    path = save_model(torch.jit.script(Identity()), tmp_path / "clf.pt", {"kind": "classifier", "classes": ["a"]})
    with pytest.raises(ModelError, match="classifier"):
        Generator.load(path)


@pytest.mark.gpu
def test_generator_on_cuda_gives_the_cpu_result(tmp_path, crops):
    from cellbatch.export import export_generator, generator_metadata, untrained_generator

    net = untrained_generator(base_filters=8, seed=0)
    path = export_generator(net, tmp_path / "g.pt", metadata=generator_metadata(net, trained=False))["torchscript"]
    on_cpu = Generator.load(path, device="cpu").generate(crops)
    on_gpu = Generator.load(path, device="cuda").generate(crops)
    assert np.abs(on_cpu.astype(int) - on_gpu.astype(int)).max() <= 2  # TF32/cuDNN rounding, not bugs


@pytest.mark.gpu
def test_negating_generator_on_cuda_is_exact(tmp_path, crops):
    gen = Generator.load(save_generator(Negate(), tmp_path / "neg.pt"), device="cuda")
    assert np.array_equal(gen.generate(crops), 255 - crops)
