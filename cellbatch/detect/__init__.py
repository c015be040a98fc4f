"""Find white (nucleated) cells in a capture and segment it.

A detector is any callable object built from keyword settings that maps one RGB capture to a
:class:`Detection`. Built-ins and plugins are listed in :data:`cellbatch.registry.detectors`.
"""

from cellbatch.detect.base import Cell, Detection, Detector, DetectSettings

__all__ = ["Cell", "Detection", "Detector", "DetectSettings"]
