"""The networks of the thesis: U-Net generator, PatchGAN discriminator, VGG-16 feature loss."""

from cellbatch.models.discriminator import PatchDiscriminator
from cellbatch.models.generator import ARCHITECTURE, TILE_MULTIPLE, UNetGenerator, count_parameters
from cellbatch.models.vgg import VGG16Features, feature_loss, gram_matrix, load_vgg16

__all__ = [
    "ARCHITECTURE",
    "TILE_MULTIPLE",
    "PatchDiscriminator",
    "UNetGenerator",
    "VGG16Features",
    "count_parameters",
    "feature_loss",
    "gram_matrix",
    "load_vgg16",
]
