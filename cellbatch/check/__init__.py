"""The classifier-agreement check: does a converted cell keep its reference's class?

``agreement`` classifies and counts, ``reference`` finds the paired reference cell, ``confusion``
writes the confusion matrix as CSV and PNG.
"""

from cellbatch.check.agreement import (
    AgreementCheck,
    CheckSettings,
    SlideState,
    classify,
    load_classifier,
    summarise_run,
)
from cellbatch.check.reference import ReferenceSource

__all__ = [
    "AgreementCheck",
    "CheckSettings",
    "ReferenceSource",
    "SlideState",
    "classify",
    "load_classifier",
    "summarise_run",
]
