"""pytest-mnn-parity: backend x precision parity checks for MNN models.

The engine (load, run, compare, judge) works without pytest; the pytest plugin
(``plugin.py``) is a thin layer over it.
"""
from .parity import ParityEngine, ParityResult, ParitySettings
from .runner import LoadedModel, RunConfig
from .verdict import Category

__all__ = ["Category", "LoadedModel", "ParityEngine", "ParityResult", "ParitySettings", "RunConfig"]
__version__ = "0.1.0"
