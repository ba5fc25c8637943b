"""Autoregressive sampling from a ``Transformer`` (no KV cache: each new token re-runs the model
on the fixed-length buffer, which is cheap at the sizes trained here and keeps one code path).

Mixture-of-depths models sample with ``mod_routing="causal"``: top-k routing over a sequence
looks at future tokens and cannot be used token by token, so each routed block processes a token
when that token's own causal decision (router logit or predictor, trained by ``causal_aux``)
says so. Capacity-mode and expert-choice MoE are not causal either (which tokens are dropped, or
chosen, depends on the whole batch); dropless top-k MoE is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def generate(model: nnx.Module, prompt_BxP: jax.Array, n_new: int, *, key: jax.Array, temperature: float = 1.0,
             mod_routing: str = "causal") -> jax.Array:
    """Extend int32 ``prompt_BxP`` by ``n_new`` tokens; returns int32 ``[B, P + n_new]``.

    ``temperature`` 0 is greedy (argmax); otherwise tokens are drawn from softmax(logits / T).
    Every sequence must fit the model's training context only in the sense of RoPE (positions
    beyond it extrapolate); nothing enforces it.
    """
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    B, P = prompt_BxP.shape
    if P < 1:
        raise ValueError("the prompt needs at least one token")
    buf = jnp.zeros((B, P + n_new), jnp.int32).at[:, :P].set(prompt_BxP.astype(jnp.int32))

    @nnx.jit
    def step(model, buf, t, key):
        logits_BxLxV, _ = model(buf, train=False, mod_routing=mod_routing)
        last_BxV = jax.lax.dynamic_index_in_dim(logits_BxLxV, t - 1, axis=1, keepdims=False)
        if temperature == 0:
            tok = jnp.argmax(last_BxV, axis=-1)
        else:
            tok = jax.random.categorical(key, last_BxV / temperature, axis=-1)
        return jax.lax.dynamic_update_index_in_dim(buf, tok.astype(jnp.int32)[:, None], t, axis=1)

    for t in range(P, P + n_new):
        key, sub = jax.random.split(key)
        buf = step(model, buf, jnp.int32(t), sub)
    return buf
