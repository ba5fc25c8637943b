"""Decoder-only transformer: embedding -> blocks (dense | MoE | MoD | MoD over MoE) -> norm -> head.

``Transformer(cfg, rngs=...)(tokens_BxL, train=True) -> (logits_BxLxV float32, aux)``.

``aux["aux_loss"]`` is the sum of every block's weighted auxiliary loss (0 for a dense model),
to be added to the training loss; every other entry is a scalar metric, prefixed with its layer
(``l3/moe/drop_fraction``). What each layer holds beyond attention and the dense MLP comes from
the block registry (``scaling.blocks``: MoE, MoD, any registered kind), imported only when the
config asks for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config import ModelConfig
from scaling.models import mup
from scaling.models.remat import remat_policy
from scaling.models.layers import Block, Embed, RMSNorm, compute_dtype, one_draw_init, param


STACKED_AXIS = "layers"  # the logical name of a stacked parameter's leading axis (replicated)


def stack_blocks(blocks: list, period: int) -> nnx.List:
    """``n_layers`` blocks -> one group of ``period`` blocks whose every variable holds the
    ``n_layers / period`` groups' values stacked on a new leading axis (logical axis
    ``layers``). Layer ``g * period + j`` is group ``g``'s block ``j``."""
    groups = [nnx.List(blocks[g:g + period]) for g in range(0, len(blocks), period)]
    graphdef, *_ = nnx.split(groups[0])
    states = [nnx.split(g)[1] for g in groups]
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def stack(*vs):
        meta = dict(vs[0].get_metadata())
        names = meta.get("out_sharding")
        if names is not None:
            meta["out_sharding"] = (STACKED_AXIS, *names)
        return type(vs[0])(jnp.stack([v.get_value() for v in vs]), **meta)

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=is_var))


def run_stacked(stack: nnx.List, run_block, x_BxLxD: jax.Array, positions_BxL: jax.Array):
    """Run the stacked groups in order with one ``lax.scan`` (the group's blocks traced once);
    returns ``(x, [aux of layer 0, 1, ...])``."""
    graphdef, state = nnx.split(stack)

    def body(x, group_state):
        group = nnx.merge(graphdef, group_state)
        auxes = []
        for block in group:
            x, aux = run_block(block, x, positions_BxL)
            auxes.append(aux or {})
        return x, auxes

    x_BxLxD, auxes = jax.lax.scan(body, x_BxLxD, state)
    n_groups = jax.tree.leaves(state)[0].shape[0]
    per_layer = [{k: v[g] for k, v in auxes[j].items()} for g in range(n_groups) for j in range(len(auxes))]
    return x_BxLxD, per_layer


def make_block(cfg: ModelConfig, i: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """Block ``i`` as the block registry (``scaling.blocks``) lays it out: attention and the
    layer's MLP kind (the dense MLP when none applies), wrapped in the layer's router kind
    (mixture-of-depths) when one applies. Every block is called
    ``block(x, positions=..., train=..., mod_routing=...) -> (x, aux)``."""
    from scaling import blocks

    mlp_kind, router_kind = blocks.layer_kind(cfg, i, "mlp"), blocks.layer_kind(cfg, i, "router")
    mlp = None
    if mlp_kind is not None:
        cls = mlp_kind.module_class()
        mlp = lambda cfg, *, rngs: cls(cfg, i, rngs=rngs)  # noqa: E731
    block = Block(cfg, mlp=mlp, rngs=rngs)
    if router_kind is not None:
        block = router_kind.module_class()(cfg, block, rngs=rngs)
    return block


class Transformer(nnx.Module):
    """Pre-LN decoder-only language model (see module docstring for the call contract)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        with one_draw_init(rngs):  # one random draw for all dense parameters (fast to compile)
            self.embed = Embed(cfg, rngs=rngs)
            blocks = [make_block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)]
            self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, axis_name="embed", rngs=rngs)
            if cfg.tie_embeddings:
                self.head = None
            else:
                self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), mup.init_std(cfg, "head"))
        # the blocks are drawn one by one either way, so a scanned model starts from the very
        # parameters of the loop model (stacked after the draw has filled them)
        if cfg.scan_layers:
            self.blocks = None
            self.stack = stack_blocks(blocks, cfg.layer_period())
        else:
            self.blocks = nnx.List(blocks)
            self.stack = None

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
            # under scan the loop boundary already keeps XLA from merging the recomputation
            # with the forward (jax's advice: prevent_cse=False inside scan)
            run_block = nnx.remat(run_block, policy=policy, prevent_cse=self.stack is None)
        if self.stack is not None:
            x_BxLxD, per_layer = run_stacked(self.stack, run_block, x_BxLxD, positions_BxL)
        else:
            per_layer = []
            for block in self.blocks:
                x_BxLxD, block_aux = run_block(block, x_BxLxD, positions_BxL)
                per_layer.append(block_aux or {})
        for i, block_aux in enumerate(per_layer):
            for name, value in block_aux.items():
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
