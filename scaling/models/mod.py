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
from scaling.models.layers import param


def n_selected(capacity: float, seq_len: int) -> int:
    """Tokens per sequence that enter a routed block: ``ceil(capacity * L)`` (at least 1)."""
    return max(1, min(seq_len, math.ceil(capacity * seq_len - 1e-9)))


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

    def __call__(self, x_BxLxD: jax.Array, positions: jax.Array | None = None, **kw) -> tuple[jax.Array, dict]:
        mod = self.cfg.mod
        B, L, D = x_BxLxD.shape
        k = n_selected(mod.capacity, L)
        logits_BxL = self.router_logits(x_BxLxD)
        _, idx_BxK = jax.lax.top_k(logits_BxL, k)
        idx_BxK = jnp.sort(idx_BxK, axis=-1)  # original order: causal masks and RoPE stay right
        pos_BxK = idx_BxK if positions is None else jnp.take_along_axis(positions, idx_BxK, axis=1)
        x_sel = jnp.take_along_axis(x_BxLxD, idx_BxK[..., None], axis=1)
        out_sel, aux = self.block(x_sel, positions=pos_BxK, **kw)
        delta = out_sel - x_sel
        r_BxK = jnp.take_along_axis(logits_BxL, idx_BxK, axis=1)
        w_BxK = jax.nn.sigmoid(r_BxK) if mod.router_scale else jnp.ones_like(r_BxK)
        rows = jnp.arange(B)[:, None]
        y = x_BxLxD.at[rows, idx_BxK].add((w_BxK[..., None] * delta).astype(x_BxLxD.dtype))

        member_BxL = jnp.zeros((B, L), jnp.float32).at[rows, idx_BxK].set(1.0)
        if self.pred_in is not None:
            xs = jax.lax.stop_gradient(x_BxLxD).astype(jnp.float32)
            causal_logits = jax.nn.gelu(xs @ self.pred_in[...]) @ self.pred_out[...]
        else:
            causal_logits = logits_BxL
        bce = _bce_with_logits(causal_logits, member_BxL)
        accuracy = jnp.mean(((causal_logits > 0) == (member_BxL > 0)).astype(jnp.float32))

        aux = dict(aux or {})
        inner = aux.pop("aux_loss", jnp.zeros((), jnp.float32))
        weight = 0.0 if mod.causal_aux == "none" else mod.aux_loss_weight
        aux["aux_loss"] = inner + weight * bce
        aux["mod/selected_fraction"] = jnp.asarray(k / L, jnp.float32)
        aux["mod/router_weight_mean"] = jnp.mean(w_BxK)
        aux["mod/router_weight_std"] = jnp.std(w_BxK)
        aux["mod/causal_bce"] = bce
        aux["mod/causal_accuracy"] = accuracy
        return y, aux
