"""Configs from text: JSON/YAML mappings and ``--set a.b=value`` overrides -> validated configs.

``apply_overrides(cfg, ["model.d_model=256", ...])`` and ``build(TrainConfig, mapping)`` parse
each value against its field's type (``"1e-3"`` -> 0.001, ``"1e4"`` -> 10000 for an integer,
``on``/``none`` for optional sections, ``a,b`` for lists) and fail with one line naming the
field (``optim.lr: must be a number, got 'abc'``); the dataclasses in ``scaling.config``
validate the values. ``model.blocks.NAME`` sections come from the block registry.

Why no library: pydantic (installed with wandb) was measured on the command-line grammar:
in lax mode it takes ``true`` as the integer 1 and the number 1.0, refuses ``1e3`` for an
integer, ``none`` for an optional value and ``a,b`` for a list; strict mode refuses ``"10"``
for an integer. Each rule would need a pre-pass of its own plus a map from its error types to
these messages, no shorter than the coercion here (dacite coerces nothing from strings).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Optional

from scaling.config import BlockSections, BudgetConfig, ConfigError, TrainConfig, _fail


def as_dict(cfg) -> dict:
    """``dataclasses.asdict`` of a config (or a ``BlockSections``) with ``model.blocks``
    written as ``{name: {field: value}}``."""
    def plain(x):
        if isinstance(x, BlockSections):
            return {name: plain(sec) for name, sec in x.as_dict().items()}
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def _block_section_class(path: str, name: str):
    from scaling import blocks

    return blocks.own_kind(name, path).section


def _coerce_blocks(path: str, value: Any) -> "BlockSections":
    if isinstance(value, BlockSections):
        return value
    if isinstance(value, str) and value.strip().lower() in ("", "{}", "on", "none", "null"):
        return BlockSections()  # "on": a YAML spec's empty mapping
    if isinstance(value, (list, tuple)):  # ((name, section), ...) as asdict leaves it
        value = dict(value)
    if not isinstance(value, dict):
        _fail(path, f"expects a mapping of block kind -> settings, got {value!r}")
    out = {}
    for name, sec in value.items():
        cls = _block_section_class(path, str(name))
        out[str(name)] = _coerce(f"{path}.{name}", cls, sec)
    return BlockSections(out)


def _is_model(cls) -> bool:
    from scaling.config import ModelConfig

    return cls is ModelConfig


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(path: str, tp, value: Any) -> Any:
    """Check/convert ``value`` (possibly a string from the command line) to type ``tp``."""
    inner, optional = _strip_optional(tp)
    if inner is BlockSections:
        return _coerce_blocks(path, value)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        _fail(path, "may not be empty")
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if isinstance(value, dict):
            return build(inner, value, path + ".")
        if isinstance(value, str) and value.lower() in ("default", "on", "true", "{}"):
            return inner()
        _fail(path, f"expects a section of settings, got {value!r}")
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            _fail(path, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        _fail(path, f"must be true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            _fail(path, f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            _fail(path, f"must be an integer, got {value!r}")
        if not math.isfinite(f) or f != int(f):
            _fail(path, f"must be an integer, got {value!r}")
        return int(f)
    if inner is float:
        if isinstance(value, bool):
            _fail(path, f"must be a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            _fail(path, f"must be a number, got {value!r}")
        if not math.isfinite(f):
            _fail(path, f"must be a finite number, got {value!r}")
        return f
    if typing.get_origin(inner) is tuple:
        (elem, *_rest) = typing.get_args(inner) or (str,)
        if isinstance(value, dict) and elem is str:  # {source: weight} written as a mapping (YAML)
            value = [f"{k}={v}" for k, v in value.items()]
        if isinstance(value, str):
            if elem is str:  # globs may hold ( ): only a pair around the whole list is dropped
                text = value.strip()
                text = text[1:-1] if text.startswith("(") and text.endswith(")") else text
            else:
                text = value.replace("(", "").replace(")", "")
            value = [v.strip() for v in text.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)) and elem is str:
            value = [v.strip() if isinstance(v, str) else v for v in value]
        if not isinstance(value, (list, tuple)):
            _fail(path, f"must be a list, got {value!r}")
        return tuple(_coerce(f"{path}[{i}]", elem, v) for i, v in enumerate(value))
    if inner is str:
        if not isinstance(value, str):
            _fail(path, f"must be a string, got {value!r}")
        return value
    return value


def build(cls, d: dict, prefix: str = ""):
    """Dataclass ``cls`` from mapping ``d`` (unknown fields and bad values: ConfigError naming
    the field under ``prefix``)."""
    if not isinstance(d, dict):
        _fail(prefix.rstrip(".") or cls.__name__, f"expects a mapping, got {type(d).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if "ffn" in d and "ffn" not in names and _is_model(cls):  # model.ffn: a shorthand, not a field
        from scaling import blocks

        d = dict(d)
        value = d.pop("ffn")
        d = blocks.select_ffn(d, value, prefix + "ffn")
    unknown = sorted(set(d) - names)
    if unknown:
        _fail(prefix + unknown[0], f"unknown field; known fields: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(prefix + k, hints[k], v) for k, v in d.items()}
    return cls(**kwargs)


def _walk(cls, key: str):
    """Yield ``(path, part, hint, section_class_or_None, is_last)`` along the dotted ``key`` of
    dataclass ``cls``, raising ConfigError for an unknown field or a value used as a section.
    Under ``model.blocks`` the next part names a registered block kind, whose section follows."""
    parts = key.split(".")
    kind_next = False
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if kind_next:  # model.blocks.NAME: the kind's section (optional: absent until set)
            kind_next = False
            section = _block_section_class(path.rsplit(".", 1)[0], part)
            yield path, part, Optional[section], None, (None if last else section)
            cls = section
            continue
        hints = _hints(cls)
        if part not in hints:
            known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
            raise ConfigError(f"{path}: unknown field; known fields: {known}")
        tp, _ = _strip_optional(hints[part])
        if tp is BlockSections and not last:
            kind_next = True
            yield path, part, hints[part], cls, BlockSections
            continue
        if not last and not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{path}: is a value, not a section; use {path}=VALUE")
        yield path, part, hints[part], cls, (None if last else tp)
        if not last:
            cls = tp


def coerce_field(path: str, value: Any, cls=None) -> Any:
    """``value`` converted to the type of the dotted field ``path`` of ``cls`` (TrainConfig by
    default), as ``--set`` would: ``"1e-3"`` -> ``0.001`` for ``optim.lr``. ConfigError naming
    the field for an unknown path or a value of the wrong type."""
    for here, _, hint, _, section in _walk(cls or TrainConfig, path):
        if section is None:
            return _coerce(here, hint, value)
    raise ConfigError(f"{path}: empty field name")


def _parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. model.d_model=256")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item}: empty key; expected key=value")
    return key, value.strip()


def apply_overrides(cfg, overrides: list[str] | dict[str, Any]):
    """Return a copy of dataclass ``cfg`` with dotted-path overrides applied and validated.

    Setting one budget field (``budget.tokens=...``) clears the others, since a budget has
    exactly one kind. A whole optional section can be switched on with ``model.moe=on`` and
    off with ``model.moe=none``.
    """
    items = list(overrides.items()) if isinstance(overrides, dict) else [_parse_override(s) for s in overrides]
    d = as_dict(cfg)
    for key, value in items:
        if key.endswith("data.eval_batches") and value is not None and str(value).lower() not in ("none", "null"):
            raise ConfigError("data.eval_batches: replaced by data.eval_tokens, one held-out set for every batch size "
                              "(e.g. data.eval_tokens=65536)")
        if key == "model.ffn" or (key == "ffn" and _is_model(type(cfg))):
            from scaling import blocks

            if key == "ffn":
                d = blocks.select_ffn(d, value, key)
            else:
                d["model"] = blocks.select_ffn(d["model"], value, key)
            continue
        node = d
        for path, part, hint, cls, section in _walk(type(cfg), key):
            if section is None:
                coerced = _coerce(path, hint, value)
                if dataclasses.is_dataclass(coerced) or isinstance(coerced, BlockSections):
                    coerced = as_dict(coerced)
                if cls is BudgetConfig and coerced is not None:
                    for f in dataclasses.fields(BudgetConfig):
                        node[f.name] = None
                if coerced is None and cls is None:  # model.blocks.NAME=none: the kind is off
                    node.pop(part, None)
                    continue
                node[part] = coerced
            else:
                if node.get(part) is None:
                    node[part] = {} if section is BlockSections else dataclasses.asdict(section())
                node = node[part]
    return build(type(cfg), d, "")
