"""Data references: ``fashion-mnist[:DIR][:val]``, ``digits[:val]``, ``text:FILE``, ``pydoc-sentences[:calib|eval|val|fit]``."""

from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.data.resolve import DATA_HELP, resolve_data

__all__ = ["DATA_HELP", "ClassificationData", "TextData", "resolve_data"]
