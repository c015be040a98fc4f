"""``--normalise none``: leave crops as they are."""

from __future__ import annotations

from typing import Any

import numpy as np


class IdentityNormaliser:
    name = "none"

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        return crops

    def apply_tensors(self, images: Any, masks: Any) -> Any:
        return images

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name}
