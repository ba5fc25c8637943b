"""Decoder-only transformer: embedding -> blocks (dense | MoE | MoD | MoD over MoE) -> norm -> head.

``Transformer(cfg, rngs=...)(tokens_BxL, train=True) -> (logits_BxLxV float32, aux)``.

``aux["aux_loss"]`` is the sum of every block's weighted auxiliary loss (0 for a dense model),
to be added to the training loss; every other entry is a scalar metric, prefixed with its layer
(``l3/moe/drop_fraction``). Sparse blocks are built by ``scaling.models.moe`` / ``mod``, imported
only when the config asks for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config import ModelConfig
from scaling.models import mup
from scaling.models.remat import remat_policy
from scaling.models.layers import Block, Embed, RMSNorm, compute_dtype, one_draw_init, param


def make_block(cfg: ModelConfig, i: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """Block ``i``: MoE MLP where ``cfg.is_moe_layer(i)``, wrapped in mixture-of-depths routing
    where ``cfg.is_mod_layer(i)``. Every block is called ``block(x, positions=...) -> (x, aux)``."""
    mlp = None
    if cfg.is_moe_layer(i):
        from scaling.models.moe import MoELayer

        mlp = MoELayer
    block = Block(cfg, mlp=mlp, rngs=rngs)
    if cfg.is_mod_layer(i):
        from scaling.models.mod import MoDBlock

        block = MoDBlock(cfg, block, rngs=rngs)
    return block


class Transformer(nnx.Module):
    """Pre-LN decoder-only language model (see module docstring for the call contract)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        with one_draw_init(rngs):  # one random draw for all dense parameters (fast to compile)
            self.embed = Embed(cfg, rngs=rngs)
            self.blocks = nnx.List([make_block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
            self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, axis_name="embed", rngs=rngs)
            if cfg.tie_embeddings:
                self.head = None
            else:
                self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), mup.init_std(cfg, "head"))

    def __call__(self, tokens_BxL: jax.Array, *, train: bool = True, mod_routing: str = "topk") -> tuple[jax.Array, dict]:
        """tokens int32[B, L] -> (logits float32[B, L, V], aux dict of float32 scalars).

        ``mod_routing``: how mixture-of-depths blocks pick tokens: ``"topk"`` (training; looks
        at the whole sequence) or ``"causal"`` (each token's own decision; for evaluation as a
        sampler would see it and for sampling). Ignored by models without MoD blocks."""
        B, L = tokens_BxL.shape
        positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        x_BxLxD = self.embed(tokens_BxL)
        aux_loss = jnp.zeros((), jnp.float32)
        metrics: dict[str, jax.Array] = {}
        def run_block(block, x_BxLxD, positions_BxL):
            return block(x_BxLxD, positions=positions_BxL, train=train, mod_routing=mod_routing)

        policy = remat_policy(self.cfg.remat)
        if policy is not False:  # recompute the block's activations in the backward pass
            run_block = nnx.remat(run_block, policy=policy)
        for i, block in enumerate(self.blocks):
            x_BxLxD, block_aux = run_block(block, x_BxLxD, positions_BxL)
            for name, value in (block_aux or {}).items():
                if name == "aux_loss":
                    aux_loss = aux_loss + value
                else:
                    metrics[f"l{i}/{name}"] = value
        x_BxLxD = self.final_norm(x_BxLxD)
        if self.head is None:
            logits_BxLxV = self.embed.attend(x_BxLxD)
        else:
            w_DxV = self.head[...].astype(compute_dtype(self.cfg))
            logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, w_DxV, preferred_element_type=jnp.float32)
        logits_BxLxV = logits_BxLxV.astype(jnp.float32)
        if mup.is_mup(self.cfg):  # μP readout: logits x 1/m (exactly SP's at the base width)
            logits_BxLxV = logits_BxLxV * mup.readout_multiplier(self.cfg)
        return logits_BxLxV, {"aux_loss": aux_loss, **metrics}
