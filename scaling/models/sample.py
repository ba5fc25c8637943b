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
             context: int | None = None, mod_routing: str = "causal") -> jax.Array:
    """Extend int32 ``prompt_BxP`` by ``n_new`` tokens; returns int32 ``[B, P + n_new]``.

    ``temperature`` 0 is greedy (argmax); otherwise tokens are drawn from softmax(logits / T).
    ``context`` (tokens): the model sees at most this many of the latest tokens (a sliding
    window; use the training ``seq_len`` so positions never exceed what the model was trained
    on); ``None`` = the whole sequence.
    """
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    B, P = prompt_BxP.shape
    if P < 1:
        raise ValueError("the prompt needs at least one token")
    total = P + n_new
    window = total if context is None else min(int(context), total)
    if window < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    buf = jnp.zeros((B, total), jnp.int32).at[:, :P].set(prompt_BxP.astype(jnp.int32))

    @nnx.jit
    def step(model, buf, t, key):
        start = jnp.maximum(t - window, 0)  # the window ends at token t-1 (or starts at 0)
        seen = jax.lax.dynamic_slice_in_dim(buf, start, window, axis=1)
        logits_BxLxV, _ = model(seen, train=False, mod_routing=mod_routing)
        last_BxV = jax.lax.dynamic_index_in_dim(logits_BxLxV, t - 1 - start, axis=1, keepdims=False)
        if temperature == 0:
            tok = jnp.argmax(last_BxV, axis=-1)
        else:
            tok = jax.random.categorical(key, last_BxV / temperature, axis=-1)
        return jax.lax.dynamic_update_index_in_dim(buf, tok.astype(jnp.int32)[:, None], t, axis=1)

    for t in range(P, P + n_new):
        key, sub = jax.random.split(key)
        buf = step(model, buf, jnp.int32(t), sub)
    return buf
