"""scaling: a JAX framework for scaling-law experiments.

Heavy submodules (models, train, fit) are imported lazily so that ``import scaling`` and the
CLI's ``--help`` stay fast.
"""

__version__ = "0.1.0"

import importlib

_LAZY = {"config", "flops", "fit", "store", "models", "data", "train", "sweep", "sharding"}


def __getattr__(name):
    if name == "store":
        return importlib.import_module("scaling.sweep.store")
    if name in _LAZY:
        return importlib.import_module(f"scaling.{name}")
    raise AttributeError(name)
