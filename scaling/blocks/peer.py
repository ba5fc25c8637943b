"""Product-key layers as block kinds: PEER (``model.blocks.peer``) and product-key memory
(``model.blocks.pkm``), each replacing the dense MLP of every ``every``-th layer.

Both retrieve, per token and per retrieval head, the ``top_k`` best of ``n_experts`` slots
addressed by product keys: a query of two halves scored against two sub-key tables of
``sqrt(n_experts)`` keys each; the top-k of the ``sqrt(n) x sqrt(n)`` sums is found from the
top-k of each table (``scaling.models.peer.product_top_k``) without scoring all ``n``.

* **PEER** ("Mixture of A Million Experts", He 2024): slot ``i`` is a one-neuron expert
  ``act(x . u_i) v_i``; a head's output is its experts' outputs weighted by the softmax of
  their scores, and the heads' outputs add up.
* **PKM** ("Large Memory Layers with Product Keys", Lample et al. 2019): slot ``i`` is a value
  vector ``v_i``; a head's output is the softmax-weighted sum of its values.

The query is normalised per token (RMS or layer norm over each half): a batch norm over the
sequence, as in the PKM paper, would let later tokens change earlier outputs.

Counts (per layer, per token; elementwise work, the top-k selections and the softmax are not
counted, as for attention's softmax): queries ``2 D (2 Q Z)``, sub-key scores ``2 (2 Q W Z)``,
candidate sums ``Q U^2``, and per picked slot ``4 D`` (PEER: ``x . u`` and ``h v``) or ``2 D``
(PKM). A token touches the query weights, every sub-key and its ``Q U`` slots (counted as
distinct, an upper bound when heads pick the same slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from scaling import blocks, flops
from scaling.errors import ConfigError

NORMS = ("rms", "layer", "none")


def _check(name: str, sec) -> None:
    where = f"model.blocks.{name}"
    for f in ("n_experts", "top_k", "heads", "every"):
        v = getattr(sec, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}.{f}: must be a positive integer, got {v!r}")
    w = math.isqrt(sec.n_experts)
    if w * w != sec.n_experts:
        lo, hi = w * w, (w + 1) ** 2
        raise ConfigError(f"{where}.n_experts: must be a perfect square (product keys split it into two tables of "
                          f"sqrt(n) keys), got {sec.n_experts}; use {lo} or {hi}")
    if sec.top_k > w:
        raise ConfigError(f"{where}.top_k: {sec.top_k} is larger than a sub-key table (sqrt({sec.n_experts}) = {w} "
                          f"keys); use at most {w}")
    if sec.d_key is not None and (not isinstance(sec.d_key, int) or isinstance(sec.d_key, bool) or sec.d_key < 1):
        raise ConfigError(f"{where}.d_key: must be a positive integer (or none: d_model / 2), got {sec.d_key!r}")
    if sec.query_norm not in NORMS:
        raise ConfigError(f"{where}.query_norm: must be one of {', '.join(NORMS)} (per token), got {sec.query_norm!r}")


@dataclass(frozen=True)
class PEERConfig:
    """``n_experts`` one-neuron experts (a perfect square), ``top_k`` picked per head (at most
    ``sqrt(n_experts)``), ``heads`` retrieval heads, ``d_key`` the width of each query half
    (None: ``d_model / 2``), in every ``every``-th layer."""

    n_experts: int = 1024
    top_k: int = 8
    heads: int = 4
    d_key: Optional[int] = None
    query_norm: Literal["rms", "layer", "none"] = "rms"
    activation: Literal["gelu", "relu"] = "gelu"
    every: int = 1

    def __post_init__(self):
        _check("peer", self)
        if self.activation not in ("gelu", "relu"):
            raise ConfigError(f"model.blocks.peer.activation: must be gelu or relu, got {self.activation!r}")


@dataclass(frozen=True)
class PKMConfig:
    """``n_experts`` memory values (a perfect square), ``top_k`` read per head (at most
    ``sqrt(n_experts)``), ``heads`` retrieval heads, ``d_key`` the width of each query half
    (None: ``d_model / 2``), in every ``every``-th layer."""

    n_experts: int = 1024
    top_k: int = 8
    heads: int = 4
    d_key: Optional[int] = None
    query_norm: Literal["rms", "layer", "none"] = "rms"
    every: int = 1

    def __post_init__(self):
        _check("pkm", self)


def section(model, name: str):
    return dict(model.blocks)[name]


def d_key(model, sec) -> int:
    """Width ``Z`` of each query half (and of each sub-key)."""
    return sec.d_key if sec.d_key is not None else max(1, model.d_model // 2)


def sub_keys(sec) -> int:
    """Keys ``W`` per sub-key table: ``sqrt(n_experts)``."""
    return math.isqrt(sec.n_experts)


def _norm_params(sec, Z: int) -> int:
    per = {"rms": 1, "layer": 2, "none": 0}[sec.query_norm]
    return per * 2 * sec.heads * Z


def _retrieval(model, sec) -> tuple[int, float]:
    """(parameters, forward FLOPs per token) of the query network, the norm and the sub-keys."""
    D, Q, Z, W, U = model.d_model, sec.heads, d_key(model, sec), sub_keys(sec), sec.top_k
    params = D * 2 * Q * Z + _norm_params(sec, Z) + 2 * Q * W * Z
    fl = flops.mm(D, 2 * Q * Z) + 2 * Q * flops.mm(Z, W) + Q * U * U
    return params, fl


def _slot_params(name: str, model) -> int:
    return (2 if name == "peer" else 1) * model.d_model


def _counts(name: str):
    def params(model, i: int) -> flops.Count:
        sec = section(model, name)
        retrieval, _ = _retrieval(model, sec)
        slot = _slot_params(name, model)
        return flops.Count(retrieval + sec.n_experts * slot, retrieval + sec.heads * sec.top_k * slot)

    def flops_per_token(model, i: int, n_tokens: int) -> float:
        sec = section(model, name)
        _, fl = _retrieval(model, sec)
        return fl + sec.heads * sec.top_k * 2 * _slot_params(name, model)

    def hidden_width(model, i: int) -> float:  # kept per token for the backward pass: the picked slots
        sec = section(model, name)
        return sec.heads * sec.top_k * (model.d_model + 2) if name == "peer" else sec.heads * sec.top_k * model.d_model

    return params, flops_per_token, hidden_width


def _sp_only(name: str):
    def validate(model) -> None:
        if model.parametrization != "sp":
            raise ConfigError(f"model.parametrization: {model.parametrization} is not derived for "
                              f"model.blocks.{name} (its initial scales follow SP); use parametrization=sp")
    return validate


for _name, _section, _cls in (("peer", PEERConfig, "PEERLayer"), ("pkm", PKMConfig, "PKMLayer")):
    _params, _flops, _hidden = _counts(_name)
    blocks.register(blocks.BlockKind(
        name=_name, role="mlp", section=_section, params=_params, flops_per_token=_flops,
        module=f"scaling.models.peer:{_cls}", hidden_width=_hidden, validate=_sp_only(_name)))
