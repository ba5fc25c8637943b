"""Mixture-of-depths transformer: the dense experiment with routed blocks every other layer.

``config()``: the dense experiment (d_model 64, seq 128 x batch 32, lr 3e-3, 1e12 FLOPs on the
stdlib corpus) with 4 layers instead of 2, every second block routed (Raposo et al. 2024) at
12.5% capacity (16 of 128 tokens per sequence), sigmoid router scaling of the block output, and
the router-BCE auxiliary loss (weight 1e-2) that makes routing decisions predictable causally.
Routed blocks cost about 1/8 of a dense block, so this model spends about as many FLOPs per
token as a 2.25-layer dense model while holding 4 layers of parameters.
``model_for_params(n)`` is the dense size rule with the MoD settings carried over.
"""

from __future__ import annotations

import dataclasses

from scaling.config import MoDConfig, ModelConfig, TrainConfig

from experiments import dense

MOD = MoDConfig(capacity=0.125, every=2, router_scale=True, causal_aux="aux_loss", aux_loss_weight=1e-2)


def config() -> TrainConfig:
    base = dense.config()
    return dataclasses.replace(base, experiment="mod", model=dataclasses.replace(base.model, n_layers=4, mod=MOD))


def model_for_params(n_params: float, base: ModelConfig | None = None) -> ModelConfig:
    """A MoD shape with about ``n_params`` non-embedding parameters (dense size rule)."""
    base = base if base is not None else config().model
    shape = dense.model_for_params(n_params, dataclasses.replace(base, mod=None))
    return dataclasses.replace(shape, mod=base.mod or MOD)
