"""The block registry: every block type the transformer can hold, declared in one place each.

A block type (``BlockKind``) is one module that declares

* its **config section**, a frozen dataclass validated at construction: ``model.moe`` and
  ``model.mod`` for the built-in kinds (``attr``), ``model.blocks.<name>`` for any other;
* where it applies (``applies``; default: every ``section.every``-th layer when the section has
  an ``every`` field, else every layer);
* its **parameter and FLOP counts** per layer, written with ``scaling.flops``'s helpers
  (``flops.mm``, ``flops.dense_mlp_params``, ``flops.Count``), which ``scaling.flops`` sums with
  the attention and head terms (so ``param_counts``, ``train_flops_per_token``, budgets, MFU
  and the family size rule all see the new kind with no other edit);
* what the mesh needs of it (``shard_needs``: ``(field, value, logical axis)`` triples that
  ``scaling.sharding.validate`` checks divide; ``mesh_axes``: mesh axes only it uses);
* its **call**: ``module``, an ``nnx.Module`` class or ``"package.module:Class"`` (imported when
  a model is built, so counting imports no jax).

Two roles:

* ``"mlp"`` replaces the dense MLP of the layers it applies to: ``Cls(cfg, layer, rngs=rngs)``,
  called ``mlp(x_BxLxD, train=bool) -> (y_BxLxD, aux)`` (``aux["aux_loss"]``: a weighted loss
  added to training; other entries are logged as ``l{layer}/{name}``). ``params(model, i)``
  counts its parameters (a ``flops.Count``: total and active per token) and
  ``flops_per_token(model, i, n_tokens)`` its forward FLOPs per token when it runs on
  ``n_tokens``-token sequences.
* ``"router"`` wraps the whole block and sends only some tokens through it (mixture-of-depths):
  ``Cls(cfg, block, rngs=rngs)``, called like a block (``x, positions=, train=, mod_routing=``).
  ``token_fraction(model, i, seq_len)`` is the fraction of tokens entering; ``params`` and
  ``flops_per_token`` count the router alone (it runs on every token).

A layer holds at most one kind of each role. Registering a kind: ``scaling.blocks.register``
at import of its module; modules named in ``$SCALING_BLOCK_MODULES`` (comma-separated) are
imported on the first lookup, so sweep workers in other processes know them too.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from scaling.errors import ConfigError

ROLES = ("mlp", "router")
BUILTIN_MODULES = ("scaling.blocks.moe", "scaling.blocks.mod", "scaling.blocks.peer")
_REGISTRY: dict[str, "BlockKind"] = {}
_loaded = False


@dataclass(frozen=True)
class BlockKind:
    """One block type (see the module docstring for the contract of each field)."""

    name: str
    role: str
    section: type
    params: Callable[[Any, int], Any]
    flops_per_token: Callable[[Any, int, int], float]
    module: Any
    attr: str | None = None
    applies: Callable[[Any, int], bool] | None = None
    token_fraction: Callable[[Any, int, int], float] | None = None
    shard_needs: Callable[[Any], Iterable[tuple[str, int, str]]] | None = None
    mesh_axes: tuple[str, ...] = ()
    # MLP hidden units per token kept for the backward pass (memory estimate); default d_ff
    hidden_width: Callable[[Any, int], float] | None = None
    # (forward FLOPs per token the hardware computes, of which recomputed under remat
    # dots_saveable, under dots_with_no_batch_dims_saveable) given (model, i, n_tokens, moe_backend);
    # default: the model count, nothing recomputed
    hardware: Callable[[Any, int, int, str], tuple[float, float, float]] | None = None
    # extra checks of the whole model (ConfigError naming the field)
    validate: Callable[[Any], None] | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"BlockKind {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if not dataclasses.is_dataclass(self.section) or not self.section.__dataclass_params__.frozen:
            raise ValueError(f"BlockKind {self.name!r}: section must be a frozen dataclass (configs are hashed)")
        if self.role == "router" and self.token_fraction is None:
            raise ValueError(f"BlockKind {self.name!r}: a router needs token_fraction")

    @property
    def field(self) -> str:
        """The config path of the section (``model.moe``, ``model.blocks.toy``)."""
        return f"model.{self.attr}" if self.attr else f"model.blocks.{self.name}"

    def section_of(self, model) -> Any:
        """The model's section for this kind, or None when the model does not use it."""
        if self.attr:
            return getattr(model, self.attr)
        return dict(model.blocks).get(self.name)

    def in_layer(self, model, i: int) -> bool:
        sec = self.section_of(model)
        if sec is None:
            return False
        if self.applies is not None:
            return bool(self.applies(model, i))
        return (i + 1) % getattr(sec, "every", 1) == 0

    def module_class(self):
        """The nnx module class (imported on first use)."""
        if isinstance(self.module, str):
            mod, _, name = self.module.partition(":")
            return getattr(importlib.import_module(mod), name)
        return self.module


def register(kind: BlockKind, *, replace: bool = False) -> BlockKind:
    """Add ``kind`` to the registry (``replace=True`` to redefine a name, e.g. in tests)."""
    _load()
    if kind.name in _REGISTRY and not replace and _REGISTRY[kind.name] is not kind:
        raise ValueError(f"block kind {kind.name!r} is registered already (pass replace=True to redefine it)")
    _REGISTRY[kind.name] = kind
    return kind


_loading = False


def _load() -> None:
    """Import the built-in kinds and ``$SCALING_BLOCK_MODULES`` once; an import that fails
    raises here (and again at the next lookup), never leaving a kind silently missing."""
    global _loaded, _loading
    if _loaded or _loading:  # _loading: a kind module's own register() call
        return
    _loading = True
    try:
        extra = [m.strip() for m in os.environ.get("SCALING_BLOCK_MODULES", "").split(",") if m.strip()]
        for mod in (*BUILTIN_MODULES, *extra):
            try:
                importlib.import_module(mod)
            except ImportError as err:
                raise ConfigError(f"SCALING_BLOCK_MODULES: cannot import {mod} ({err}); fix the module name "
                                  "or install it") from err
        _loaded = True
    finally:
        _loading = False


def kinds() -> list[BlockKind]:
    """Every registered kind, built-ins first, in registration order."""
    _load()
    return list(_REGISTRY.values())


def get(name: str, field: str = "model.blocks") -> BlockKind:
    """The kind called ``name``; ``ConfigError`` naming ``field`` when there is none."""
    _load()
    if name not in _REGISTRY:
        known = ", ".join(k for k, v in _REGISTRY.items() if v.attr is None) or "none"
        raise ConfigError(f"{field}.{name}: unknown block kind (registered: {known}); register it with "
                          "scaling.blocks.register in a module listed in $SCALING_BLOCK_MODULES")
    return _REGISTRY[name]


def own_kind(name: str, field: str = "model.blocks") -> BlockKind:
    """The kind ``name`` whose section lives under ``model.blocks`` (not moe/mod, which have
    their own); ``ConfigError`` naming ``field.name`` otherwise."""
    kind = get(name, field)
    if kind.attr is not None:
        raise ConfigError(f"{field}.{name}: {name} has its own section; use model.{kind.attr}")
    return kind


def check_sections(model) -> None:
    """``model.blocks`` names registered kinds of its own (not moe/mod) with their section class;
    ``ConfigError`` naming the field otherwise."""
    for name, sec in model.blocks:
        kind = own_kind(name)
        if not isinstance(sec, kind.section):
            raise ConfigError(f"model.blocks.{name}: expects a {kind.section.__name__}, got {type(sec).__name__}")


def ffn(model) -> str:
    """The MLP-role kind ``model`` uses (``moe``, ``peer``, ``pkm``, ...), or ``"mlp"`` for the
    dense MLP alone; several kinds (interleaved by ``every``) read ``"moe+peer"``."""
    names = [k.name for k in used(model) if k.role == "mlp"]
    return "+".join(names) if names else "mlp"


def select_ffn(model_d: dict, value: Any, field: str = "model.ffn") -> dict:
    """``model.ffn=NAME`` on a plain model mapping (as ``scaling.overrides`` holds it): switch
    every MLP-role section off but ``NAME``'s, which is switched on with its defaults unless
    already set; ``mlp`` switches them all off. ConfigError naming ``field`` for a name that is
    not ``mlp`` or a registered MLP-role kind."""
    name = str(value).strip().lower() if value is not None else ""
    choices = ["mlp"] + [k.name for k in kinds() if k.role == "mlp"]
    if name not in choices:
        raise ConfigError(f"{field}: must be one of {', '.join(choices)}; got {value!r}")
    out = dict(model_d)
    blocks = dict(out.get("blocks") or {})
    for k in kinds():
        if k.role != "mlp" or k.name == name:
            continue
        if k.attr:
            out[k.attr] = None
        else:
            blocks.pop(k.name, None)
    if name != "mlp":
        k = get(name, field)
        if k.attr:
            if out.get(k.attr) is None:
                out[k.attr] = dataclasses.asdict(k.section())
        elif blocks.get(name) is None:
            blocks[name] = dataclasses.asdict(k.section())
    out["blocks"] = blocks
    return out


def used(model) -> list[BlockKind]:
    """The kinds ``model`` has a section for."""
    return [k for k in kinds() if k.section_of(model) is not None]


def layer_kind(model, i: int, role: str) -> BlockKind | None:
    """The kind of ``role`` that layer ``i`` holds (None: the dense MLP / no router)."""
    found = [k for k in used(model) if k.role == role and k.in_layer(model, i)]
    if len(found) > 1:
        names = " and ".join(k.field for k in found)
        raise ConfigError(f"{found[1].field}: layer {i} would hold two {role} kinds ({names}); "
                          "give them different model.<kind>.every")
    return found[0] if found else None


def layer_names(model) -> list[str]:
    """Per layer ``"[router+]mlp"``: ``dense``, ``moe``, ``mod+moe``, ``mod+toy`` ..."""
    out = []
    for i in range(model.n_layers):
        mlp, router = layer_kind(model, i, "mlp"), layer_kind(model, i, "router")
        out.append((f"{router.name}+" if router else "") + (mlp.name if mlp else "dense"))
    return out


def pattern_period(model) -> int:
    """The least common multiple of the used kinds' ``every`` (1 for a dense model)."""
    return math.lcm(1, *(getattr(k.section_of(model), "every", 1) for k in used(model)))


def token_fraction(model, i: int, seq_len: int) -> float:
    """Fraction of a sequence's tokens entering block ``i`` (1 without a router)."""
    router = layer_kind(model, i, "router")
    return 1.0 if router is None else float(router.token_fraction(model, i, seq_len))
