"""Plugin registries, one per kind of stage.

Plugins are data before code (as in npe2): a registry maps a name to an ``"module:attr"`` string and
imports it only on first use, so listing the choices for ``--help`` imports nothing heavy. Built-ins
are listed here; third-party plugins add themselves through the entry-point group
``cellbatch.<kind>`` (see ``plugins/README.md``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from cellbatch.errors import ConfigError, UnavailableError

BUILTINS: dict[str, dict[str, str]] = {
    "detectors": {
        "threshold": "cellbatch.detect.threshold:ThresholdDetector",
    },
    "normalisers": {
        "none": "cellbatch.normalise.identity:IdentityNormaliser",
        "display": "cellbatch.normalise.display:DisplayNormaliser",
        "hm": "cellbatch.normalise.hm:HMNormaliser",
        "reinhard": "cellbatch.normalise.reinhard:ReinhardNormaliser",
        "macenko": "cellbatch.normalise.macenko:MacenkoNormaliser",
        "global": "cellbatch.normalise.global_affine:GlobalAffineNormaliser",
    },
}


class Registry:
    """Name -> lazily imported object for one plugin kind (``detectors``, ``normalisers``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, str] = dict(BUILTINS.get(kind, {}))
        for ep in entry_points(group=f"cellbatch.{kind}"):
            self._targets.setdefault(ep.name, ep.value)
        self._loaded: dict[str, Any] = {}
        self._installed = set(self._targets)  # built-ins and entry points: any process finds these

    def names(self) -> list[str]:
        return sorted(self._targets)

    def register(self, name: str, target: str | Any) -> None:
        """Add an entry at run time: a ``"module:attr"`` string or the object itself."""
        self._installed.discard(name)
        if isinstance(target, str):
            self._targets[name] = target
            self._loaded.pop(name, None)
        else:
            self._targets[name] = f"{target.__module__}:{target.__qualname__}"
            self._loaded[name] = target

    def importable_everywhere(self, name: str) -> bool:
        """Whether a fresh process (a Dask worker) finds ``name`` the same way: not registered at run time."""
        return name in self._installed

    def unknown(self, name: str) -> str:
        """The message for a name this registry does not hold."""
        return (f"unknown {self.kind[:-1]} {name!r}: choose one of {', '.join(self.names())} "
                "or install the plugin that provides it")

    def get(self, name: str) -> Any:
        if name not in self._targets:
            raise ConfigError(self.unknown(name))
        if name not in self._loaded:
            module_name, _, attr = self._targets[name].partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError) as exc:
                raise UnavailableError(
                    f"{self.kind[:-1]} {name!r} could not be loaded from {self._targets[name]}: {exc}"
                ) from exc
            self._loaded[name] = obj
        return self._loaded[name]


detectors = Registry("detectors")
normalisers = Registry("normalisers")


def make_detector(name: str, *, cell_diameter: float = 110.0) -> Any:
    """The detector registered as ``name``, built with its settings: the one way every command builds one.

    Raises
    ------
    ConfigError
        ``name`` is not registered (exit 2: a bad command line).
    UnavailableError
        Its plugin cannot be imported.
    """
    from cellbatch.detect.base import DetectSettings

    return detectors.get(name)(DetectSettings(cell_diameter=cell_diameter))
