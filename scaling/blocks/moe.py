"""Mixture-of-experts MLP (``model.moe``): its counts, mesh needs and call, as a block kind.

The work the layer does is defined here (``capacity``, ``expert_slots_per_token``);
``scaling.models.moe`` imports these, so the count and the computation cannot drift apart.
Routers, losses and the call itself are documented in ``scaling/models/moe.py``.
"""

from __future__ import annotations

import math

from scaling import blocks, flops
from scaling.config import MoEConfig, ModelConfig


def capacity(cfg: ModelConfig, group_size: int) -> int:
    """MoE slots per expert per routing group: ``ceil(capacity_factor * S * k / n_routed)``, at
    most ``S`` (an expert never needs more slots than the group has tokens); ``S`` for dropless."""
    moe = cfg.moe
    if moe.router == "dropless":
        return group_size
    c = math.ceil(moe.capacity_factor * group_size * moe.k_routed / moe.n_routed)
    return max(1, min(group_size, c))


def expert_slots_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Expert-MLP evaluations computed per token (the FLOP multiplier of one expert MLP).

    Capacity modes compute every padded slot: ``n_routed * C / S``. Dropless counts exactly
    ``k_routed`` (what ``ragged_dot`` does; the CPU einsum backend computes more, see
    ``scaling/models/moe.py``).
    """
    moe = cfg.moe
    if moe.router == "dropless":
        return float(moe.k_routed)
    return moe.n_routed * capacity(cfg, seq_len) / seq_len


def params(model: ModelConfig, i: int) -> flops.Count:
    """Router ``[D, n_routed]`` + routed experts + shared experts. A token touches the router,
    its ``k_routed`` experts and the shared experts."""
    moe = model.moe
    router = model.d_model * moe.n_routed
    expert = flops.dense_mlp_params(model, model.expert_d_ff)
    shared = moe.n_shared_experts * expert
    return flops.Count(router + moe.n_routed * expert + shared, router + moe.k_routed * expert + shared)


def flops_per_token(model: ModelConfig, i: int, seq_len: int) -> float:
    """Router matmul + expert MLPs over the slots actually computed (padded capacity slots
    count; dropless counts exactly ``k_routed``) + shared experts."""
    moe = model.moe
    expert = flops.dense_mlp_flops_per_token(model, model.expert_d_ff)
    router = flops.mm(model.d_model, moe.n_routed)
    # summed in this order since schema 1: another order moves C in its last bit
    return router + expert_slots_per_token(model, seq_len) * expert + moe.n_shared_experts * expert


def hardware(model: ModelConfig, i: int, seq_len: int, moe_backend: str) -> tuple[float, float, float]:
    """Dropless routing on the ``einsum`` backend computes all ``n_routed`` experts per token;
    the routed experts are batched matmuls (recomputed under ``dots_with_no_batch_dims_saveable``)
    and, on ``ragged_dot``, not plain dots (recomputed under ``dots_saveable`` too)."""
    moe = model.moe
    expert = flops.dense_mlp_flops_per_token(model, model.expert_d_ff)
    slots = expert_slots_per_token(model, seq_len)
    fwd = flops_per_token(model, i, seq_len)
    if moe.router == "dropless" and moe_backend == "einsum":
        fwd += (moe.n_routed - slots) * expert
        slots = moe.n_routed
    experts = slots * expert
    ragged = moe.router == "dropless" and moe_backend == "ragged_dot"
    return fwd, (experts if ragged else 0.0), experts


def shard_needs(model: ModelConfig):
    moe = model.moe
    yield "model.moe.n_experts", moe.n_routed, "expert"  # n_experts * granularity experts are held
    yield "model.moe.granularity", model.expert_d_ff, "mlp"  # each expert's hidden size
    if moe.n_shared_experts:
        yield "model.moe.n_shared_experts", model.expert_d_ff * moe.n_shared_experts, "mlp"


def hidden_width(model: ModelConfig, i: int) -> float:
    moe = model.moe
    return model.expert_d_ff * (moe.k_routed * moe.capacity_factor + moe.n_shared_experts)


KIND = blocks.register(blocks.BlockKind(
    name="moe", role="mlp", section=MoEConfig, attr="moe", params=params, flops_per_token=flops_per_token,
    module="scaling.models.moe:MoELayer", shard_needs=shard_needs, mesh_axes=("expert",),
    hidden_width=hidden_width, hardware=hardware))
