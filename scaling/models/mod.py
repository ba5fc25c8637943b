"""Mixture-of-depths (Raposo et al. 2024): only the top-k tokens of each sequence enter a block.

``MoDBlock(cfg, block)`` wraps a pre-norm residual block ``block(x, positions=...) -> (x', aux)``.
Per sequence of ``L`` tokens a linear router scores every token (float32); the
``k = ceil(capacity * L)`` best are *gathered* into ``[B, k, d]`` (kept in their original
order, so causal attention among them is causal in the original positions, and RoPE gets the
original positions), run through the block, and the block's residual update is scattered back;
the other tokens ride the residual stream unchanged. Attention and MLP therefore really run on
``k`` tokens: FLOPs fall to about ``capacity`` of the block's (attention scores to
``capacity^2``).

Router scaling: with ``router_scale`` the update of a selected token is multiplied by
``sigmoid(r)`` of its router logit ``r``, which puts the router on the gradient path (the top-k
choice itself is not differentiable). Sigmoid rather than the raw logit (the paper's ``r``)
keeps the scale in (0, 1) and at 1/2 for a freshly initialised router, so a routed block starts
as a damped dense block instead of a dead one; the top-k choice is the same either way. With
``router_scale=False`` the update is added unscaled (capacity 1.0 then equals the dense block).

Causality for sampling: top-k over a sequence looks at future tokens. ``causal_aux`` trains a
per-token decision that does not: ``aux_loss`` adds a binary cross-entropy of the router logits
against top-k membership (so ``r > 0`` predicts selection), ``predictor`` trains a small MLP on
the stop-gradient residual stream for the same target (no gradient into the model). The
decision's accuracy is logged as ``mod/causal_accuracy``; training always uses top-k.
Called with ``mod_routing="causal"`` (evaluation and ``scaling.models.sample``) the block
uses that decision instead of top-k: a token is processed when its causal logit is > 0, and
attends only to earlier processed tokens, exactly as in the gathered computation. That path
runs the block on every token and masks (no FLOP saving: it exists to measure the loss a
sampler would see, ``eval_loss_causal``, and to sample), and the number of processed tokens
per sequence is whatever the decisions give, not ``k``.

Metrics: ``mod/selected_fraction`` (k / L), ``mod/router_weight_mean`` and
``mod/router_weight_std`` (the scales applied to the selected tokens), ``mod/causal_bce`` and
``mod/causal_accuracy``. ``aux["aux_loss"]`` includes the weighted causal BCE and the inner
block's own aux loss (MoD over an MoE block = MoDE).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config import ModelConfig
from scaling.blocks.mod import n_selected  # noqa: F401  (the counted work)
from scaling.models.layers import param


def _bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.mean(jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits))))


class MoDBlock(nnx.Module):
    """A routed block: ``(x_BxLxD, **kw) -> (x_BxLxD, aux)`` with only top-k tokens processed."""

    def __init__(self, cfg: ModelConfig, block: nnx.Module, *, rngs: nnx.Rngs):
        if cfg.mod is None:
            raise ValueError("MoDBlock needs cfg.mod")
        self.cfg = cfg
        self.block = block
        d = cfg.d_model
        self.router = param(rngs, (d,), ("embed",), cfg.init_std)
        if cfg.mod.causal_aux == "predictor":
            h = max(8, d // 8)
            self.pred_in = param(rngs, (d, h), ("embed", None), 1.0 / math.sqrt(d))
            self.pred_out = param(rngs, (h,), (None,), 1.0 / math.sqrt(h))
        else:
            self.pred_in = self.pred_out = None

    def router_logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """float32[B, L] router logits."""
        return jnp.einsum("bld,d->bl", x_BxLxD.astype(jnp.float32), self.router[...])

    def causal_logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """float32[B, L] per-token logits of "this token is in the top-k", computed from each
        token's own residual stream (causal): the router logits (``aux_loss``) or the predictor."""
        if self.pred_in is None:
            return self.router_logits(x_BxLxD)
        xs = jax.lax.stop_gradient(x_BxLxD).astype(jnp.float32)
        return jax.nn.gelu(xs @ self.pred_in[...]) @ self.pred_out[...]

    def __call__(self, x_BxLxD: jax.Array, positions: jax.Array | None = None, mod_routing: str = "topk",
                 **kw) -> tuple[jax.Array, dict]:
        if mod_routing not in ("topk", "causal"):
            raise ValueError(f"mod_routing must be 'topk' or 'causal', got {mod_routing!r}")
        mod = self.cfg.mod
        B, L, D = x_BxLxD.shape
        k = n_selected(mod.capacity, L)
        logits_BxL = self.router_logits(x_BxLxD)
        _, idx_BxT = jax.lax.top_k(logits_BxL, k)
        idx_BxT = jnp.sort(idx_BxT, axis=-1)  # original order: causal masks and RoPE stay right
        rows = jnp.arange(B)[:, None]
        member_BxL = jnp.zeros((B, L), jnp.float32).at[rows, idx_BxT].set(1.0)
        causal_logits = self.causal_logits(x_BxLxD)

        if mod_routing == "topk":
            pos_BxT = idx_BxT if positions is None else jnp.take_along_axis(positions, idx_BxT, axis=1)
            x_sel = jnp.take_along_axis(x_BxLxD, idx_BxT[..., None], axis=1)
            out_sel, aux = self.block(x_sel, positions=pos_BxT, **kw)
            delta = out_sel - x_sel
            r_BxT = jnp.take_along_axis(logits_BxL, idx_BxT, axis=1)
            w_BxT = jax.nn.sigmoid(r_BxT) if mod.router_scale else jnp.ones_like(r_BxT)
            y = x_BxLxD.at[rows, idx_BxT].add((w_BxT[..., None] * delta).astype(x_BxLxD.dtype))
            fraction, w_mean, w_std = jnp.asarray(k / L, jnp.float32), jnp.mean(w_BxT), jnp.std(w_BxT)
        else:
            sel_BxL = causal_logits > 0
            out, aux = self.block(x_BxLxD, positions=positions, key_mask=sel_BxL, **kw)
            w_BxL = jax.nn.sigmoid(logits_BxL) if mod.router_scale else jnp.ones_like(logits_BxL)
            y = jnp.where(sel_BxL[..., None], x_BxLxD + (w_BxL[..., None] * (out - x_BxLxD)).astype(x_BxLxD.dtype),
                          x_BxLxD)
            n_sel = jnp.maximum(jnp.sum(sel_BxL), 1)
            fraction = jnp.mean(sel_BxL.astype(jnp.float32))
            w_mean = jnp.sum(jnp.where(sel_BxL, w_BxL, 0.0)) / n_sel
            w_std = jnp.sqrt(jnp.maximum(jnp.sum(jnp.where(sel_BxL, w_BxL**2, 0.0)) / n_sel - w_mean**2, 0.0))

        bce = _bce_with_logits(causal_logits, member_BxL)
        accuracy = jnp.mean(((causal_logits > 0) == (member_BxL > 0)).astype(jnp.float32))

        aux = dict(aux or {})
        inner = aux.pop("aux_loss", jnp.zeros((), jnp.float32))
        weight = 0.0 if mod.causal_aux == "none" else mod.aux_loss_weight
        aux["aux_loss"] = inner + weight * bce
        aux["mod/selected_fraction"] = fraction
        aux["mod/router_weight_mean"] = w_mean
        aux["mod/router_weight_std"] = w_std
        aux["mod/causal_bce"] = bce
        aux["mod/causal_accuracy"] = accuracy
        return y, aux
