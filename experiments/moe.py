"""Mixture-of-experts transformer: the dense experiment with an MoE MLP in every block.

``config()``: the dense experiment's shape (d_model 64, 2 layers, 4 heads, GELU, byte vocab,
seq 128 x batch 32, AdamW + cosine at lr 3e-3, 1e12 FLOPs on the stdlib corpus) with 8 experts
of the dense MLP's size, token-choice top-2 (GShard) with capacity factor 1.25 in every block,
load-balance weight 1e-2 and router z-loss weight 1e-3 (the Switch / ST-MoE defaults). Active
parameters equal a dense model with a 2x wider MLP; training FLOPs per token are counted with
the 2.5 expert slots per token that capacity 1.25 computes (``scaling.flops``).
``model_for_params(n)`` sizes the model by its *active* non-embedding parameters.
"""

from __future__ import annotations

import dataclasses

from scaling.config import MoEConfig, ModelConfig, TrainConfig

from experiments import dense

MOE = MoEConfig(n_experts=8, top_k=2, router="token_choice", capacity_factor=1.25, granularity=1,
                every=1, aux_loss_weight=1e-2, z_loss_weight=1e-3)


def config() -> TrainConfig:
    base = dense.config()
    return dataclasses.replace(base, experiment="moe", model=dataclasses.replace(base.model, moe=MOE))


def model_for_params(n_params: float, base: ModelConfig | None = None) -> ModelConfig:
    """An MoE shape whose *active* non-embedding parameters are about ``n_params``: the dense
    size rule applied to the active count (an MoE block is active like a dense block with
    ``k_routed * expert_d_ff`` hidden units), then the MLP split back into experts."""
    base = base if base is not None else config().model
    moe = base.moe or MOE
    # dense shape with a (k / expert_size)-times wider MLP, i.e. the same active parameters
    active_ratio = base.ffn_ratio * moe.top_k * moe.expert_size
    shape = dense.model_for_params(n_params, dataclasses.replace(base, moe=None, d_ff=None, ffn_ratio=active_ratio))
    return dataclasses.replace(shape, moe=moe, ffn_ratio=base.ffn_ratio, d_ff=None)
