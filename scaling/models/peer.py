"""PEER and product-key memory layers (``model.blocks.peer`` / ``model.blocks.pkm``; what they
compute and how they are counted: ``scaling/blocks/peer.py``).

Shapes: ``Q`` retrieval heads, ``Z`` width of a query half (= of a sub-key), ``W`` keys per
sub-key table (``sqrt(n_experts)``), ``U`` slots picked per head (``top_k``), ``Y`` candidate
pairs (``U * U``), ``O`` slots held (``n_experts``); a literal ``2`` is the two query halves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.blocks import peer as counts
from scaling.config import ModelConfig
from scaling.models.layers import _std, param


def product_top_k(s1_xW: jax.Array, s2_xW: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest of all ``W * W`` sums ``s1[i] + s2[j]`` (over the last axis of each),
    found without forming them: the true top-k pairs lie among the top-k of each table's
    ``k x k`` combinations. Returns ``(scores_xU, index_xU)``, descending, ``index = i * W + j``;
    equal to a brute-force top-k over the ``W * W`` sums (the same additions, so bit for bit)."""
    W = s1_xW.shape[-1]
    v1_xU, i1_xU = jax.lax.top_k(s1_xW, k)
    v2_xU, i2_xU = jax.lax.top_k(s2_xW, k)
    cand_xY = (v1_xU[..., :, None] + v2_xU[..., None, :]).reshape(*v1_xU.shape[:-1], k * k)
    scores_xU, flat_xU = jax.lax.top_k(cand_xY, k)
    index_xU = jnp.take_along_axis(i1_xU, flat_xU // k, axis=-1) * W + jnp.take_along_axis(i2_xU, flat_xU % k, axis=-1)
    return scores_xU, index_xU


class _ProductKeys(nnx.Module):
    """Per-token queries (two halves per head, normalised per token) scored against two
    sub-key tables per head; ``retrieve(x) -> (weights_BxLxQxU, index_BxLxQxU)``, the weights
    the softmax of the picked slots' scores."""

    def __init__(self, cfg: ModelConfig, sec, *, rngs: nnx.Rngs):
        D, Q, Z, W = cfg.d_model, sec.heads, counts.d_key(cfg, sec), counts.sub_keys(sec)
        self.top_k, self.norm, self.eps = sec.top_k, sec.query_norm, cfg.norm_eps
        self.w_query = param(rngs, (D, 2, Q, Z), ("embed", None, None, None), _std(cfg, "w_query"))
        self.sub_keys = param(rngs, (2, Q, W, Z), (None, None, None, None), Z ** -0.5)
        self.query_scale = param(rngs, (2, Q, Z), (None, None, None), None) if sec.query_norm != "none" else None
        self.query_bias = (nnx.Param(jnp.zeros((2, Q, Z), jnp.float32), eager_sharding=False)
                           if sec.query_norm == "layer" else None)

    def _normalise(self, q_BxLx2xQxZ: jax.Array) -> jax.Array:
        """Over each query half, token by token (a batch norm would mix in later tokens)."""
        if self.norm == "none":
            return q_BxLx2xQxZ
        q = q_BxLx2xQxZ.astype(jnp.float32)
        if self.norm == "layer":
            q = q - jnp.mean(q, axis=-1, keepdims=True)
        q = q * jax.lax.rsqrt(jnp.mean(q * q, axis=-1, keepdims=True) + self.eps) * self.query_scale[...]
        if self.query_bias is not None:
            q = q + self.query_bias[...]
        return q.astype(q_BxLx2xQxZ.dtype)

    def retrieve(self, x_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        dt = x_BxLxD.dtype
        q_BxLx2xQxZ = self._normalise(jnp.einsum("bld,dpqz->blpqz", x_BxLxD, self.w_query[...].astype(dt)))
        s_BxLx2xQxW = jnp.einsum("blpqz,pqwz->blpqw", q_BxLx2xQxZ, self.sub_keys[...].astype(dt),
                                 preferred_element_type=jnp.float32)
        scores_BxLxQxU, index_BxLxQxU = product_top_k(s_BxLx2xQxW[:, :, 0], s_BxLx2xQxW[:, :, 1], self.top_k)
        return jax.nn.softmax(scores_BxLxQxU, axis=-1), index_BxLxQxU


class PEERLayer(nnx.Module):
    """PEER: ``y = sum over heads and picked experts i of w_i act(x . u_i) v_i``; experts
    ``w_down [O, D]`` (the ``u_i``) and ``w_up [O, D]`` (the ``v_i``) are shared by the heads.
    ``layer(x_BxLxD) -> (y_BxLxD, aux)`` (aux: how many distinct experts the batch used)."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        sec = counts.section(cfg, "peer")
        self.keys = _ProductKeys(cfg, sec, rngs=rngs)
        self.act = jax.nn.gelu if sec.activation == "gelu" else jax.nn.relu
        self.w_down = param(rngs, (sec.n_experts, cfg.d_model), (None, "embed"), _std(cfg, "w_in"))
        self.w_up = param(rngs, (sec.n_experts, cfg.d_model), (None, "embed"), _std(cfg, "w_out"))

    def __call__(self, x_BxLxD: jax.Array, **_unused) -> tuple[jax.Array, dict]:
        dt = x_BxLxD.dtype
        w_BxLxQxU, index_BxLxQxU = self.keys.retrieve(x_BxLxD)
        u_BxLxQxUxD = jnp.take(self.w_down[...].astype(dt), index_BxLxQxU, axis=0)
        v_BxLxQxUxD = jnp.take(self.w_up[...].astype(dt), index_BxLxQxU, axis=0)
        h_BxLxQxU = self.act(jnp.einsum("bld,blqud->blqu", x_BxLxD, u_BxLxQxUxD))
        y_BxLxD = jnp.einsum("blqu,blqud->bld", h_BxLxQxU * w_BxLxQxU.astype(dt), v_BxLxQxUxD)
        return y_BxLxD, {"peer/used_fraction": _used_fraction(index_BxLxQxU, self.w_down.shape[0])}


class PKMLayer(nnx.Module):
    """Product-key memory: ``y = sum over heads and picked slots i of w_i v_i``, values
    ``values [O, D]`` shared by the heads. ``layer(x_BxLxD) -> (y_BxLxD, aux)``."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        sec = counts.section(cfg, "pkm")
        self.keys = _ProductKeys(cfg, sec, rngs=rngs)
        self.values = param(rngs, (sec.n_experts, cfg.d_model), (None, "embed"), _std(cfg, "w_out"))

    def __call__(self, x_BxLxD: jax.Array, **_unused) -> tuple[jax.Array, dict]:
        dt = x_BxLxD.dtype
        w_BxLxQxU, index_BxLxQxU = self.keys.retrieve(x_BxLxD)
        v_BxLxQxUxD = jnp.take(self.values[...].astype(dt), index_BxLxQxU, axis=0)
        y_BxLxD = jnp.einsum("blqu,blqud->bld", w_BxLxQxU.astype(dt), v_BxLxQxUxD)
        return y_BxLxD, {"pkm/used_fraction": _used_fraction(index_BxLxQxU, self.values.shape[0])}


def _used_fraction(index: jax.Array, n: int) -> jax.Array:
    """Fraction of the ``n`` slots picked at least once in this batch (a collapse shows here)."""
    hit_O = jnp.zeros((n,), jnp.float32).at[index.reshape(-1)].max(1.0)
    return jax.lax.stop_gradient(jnp.mean(hit_O))
