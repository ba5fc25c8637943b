"""Named experiment families. ``experiments.get("dense")`` returns the family's default
``TrainConfig``; each module ``experiments/<name>.py`` defines ``config() -> TrainConfig`` and
may define ``model_for_params(n_params: float) -> ModelConfig`` (the family's size rule)."""

from __future__ import annotations

import importlib
import pkgutil

from scaling.config import ConfigError, TrainConfig


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str):
    if name not in names():
        raise ConfigError(f"experiment: unknown experiment {name!r}; choose one of {', '.join(names())}")
    return importlib.import_module(f"experiments.{name}")


def get(name: str) -> TrainConfig:
    """Default TrainConfig of the named family."""
    return load(name).config()
