"""Colour normalisation of crops: a registry of normalisers applied in order.

A normaliser is built from the optional argument after the colon in ``--normalise NAME[:ARG]`` and
maps a batch of crops (N, 256, 256, 3) uint8 with their segmentation masks (N, 256, 256) uint8 to new
crops of the same shape and dtype.
"""

from cellbatch.normalise.base import Normaliser, parse_spec

__all__ = ["Normaliser", "parse_spec"]
