"""Mixture-of-depths routing (``model.mod``): its counts and call, as a block kind.

``n_selected`` defines the routed block's work; ``scaling.models.mod`` imports it. The routing
itself is documented in ``scaling/models/mod.py``.
"""

from __future__ import annotations

import math

from scaling import blocks, flops
from scaling.config import MoDConfig, ModelConfig


def n_selected(capacity: float, seq_len: int) -> int:
    """MoD: tokens per sequence that enter a routed block: ``ceil(capacity * L)`` (at least 1)."""
    return max(1, min(seq_len, math.ceil(capacity * seq_len - 1e-9)))


def _predictor_width(model: ModelConfig) -> int:
    return max(8, model.d_model // 8)


def params(model: ModelConfig, i: int) -> flops.Count:
    """The router vector ``[D]`` (+ the optional causal predictor MLP, trained on a
    stop-gradient copy and not on the token's forward path, so not active)."""
    D = model.d_model
    count = flops.Count(D, D)
    if model.mod.causal_aux == "predictor":
        h = _predictor_width(model)
        count = count + flops.Count(D * h + h, 0)
    return count


def flops_per_token(model: ModelConfig, i: int, seq_len: int) -> float:
    """The router (``D`` MACs, + the predictor) on every token."""
    out = flops.mm(model.d_model, 1)
    if model.mod.causal_aux == "predictor":
        h = _predictor_width(model)
        out += flops.mm(model.d_model, h) + flops.mm(h, 1)
    return out


def token_fraction(model: ModelConfig, i: int, seq_len: int) -> float:
    return n_selected(model.mod.capacity, seq_len) / seq_len


KIND = blocks.register(blocks.BlockKind(
    name="mod", role="router", section=MoDConfig, attr="mod", params=params, flops_per_token=flops_per_token,
    token_fraction=token_fraction, module="scaling.models.mod:MoDBlock"))
