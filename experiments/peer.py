"""PEER transformer (He 2024, "Mixture of A Million Experts"): the dense experiment with a PEER
layer in place of every MLP.

``config()``: the dense experiment's shape and training (d_model 64, 2 layers, seq 128 x batch
32, AdamW + cosine at lr 3e-3, stdlib corpus) with ``PEER``: 1,024 one-neuron experts (two
sub-key tables of 32 keys), 4 retrieval heads x top-8, RMS-normalised queries of 2 x 32 per
head. ``model_for_params(n)`` sizes the model by its *active* non-embedding parameters (the
expert table is mostly idle: a token touches 32 of its 1,024 experts), like the MoE family.
"""

from __future__ import annotations

import dataclasses

from scaling.blocks.peer import PEERConfig
from scaling.config import BlockSections, ModelConfig, TrainConfig
from scaling.models import family

from experiments import dense

PEER = PEERConfig(n_experts=1024, top_k=8, heads=4, d_key=None, query_norm="rms")


def config() -> TrainConfig:
    base = dense.config()
    return dataclasses.replace(base, experiment="peer",
                               model=dataclasses.replace(base.model, blocks=BlockSections({"peer": PEER})))


def model_for_params(n_params: float, base: ModelConfig | None = None) -> ModelConfig:
    """A PEER shape with about ``n_params`` *active* non-embedding parameters."""
    base = base if base is not None else config().model
    return family.model_for_params(n_params, base, count="active_non_embedding")
