"""Mixture-of-experts MLP: routers, fine-grained experts, load-balance and router z-loss.

One ``MoELayer`` replaces the dense MLP of a block: ``(x_BxLxD) -> (y_BxLxD, aux)``.

Routing happens per *group*; a group is one sequence (``S = L`` tokens), as in GShard. Keeping
groups inside a sequence makes the result independent of how the batch is sharded, so an
expert-parallel run computes exactly what a single device does.

Routers (``MoEConfig.router``):

* ``token_choice`` (GShard top-2 / Switch top-1): every token picks its ``k = top_k * G``
  best experts; each expert holds at most ``C = ceil(capacity_factor * S * k / n_routed)``
  tokens per group. Assignments beyond ``C`` are dropped (the token then keeps only its other
  experts and the residual); first choices get priority over second choices (GShard). Tokens
  are dispatched by index (a sort-free rank within expert, then a gather) into a padded
  ``[groups, experts, C, d]`` tensor and run through one batched einsum; padded slots are
  computed, so the FLOPs are ``n_routed * C / S`` expert-MLPs per token.
* ``dropless``: no capacity. Backend ``ragged_dot`` sorts the ``T * k`` assignments by expert
  and runs ``jax.lax.ragged_dot`` grouped matmuls (exactly ``k`` expert-MLPs per token);
  backend ``einsum`` pads every expert to the worst case ``C = S`` and runs the batched einsum
  (``n_routed`` expert-MLPs per token are computed; on CPU that is still faster than
  ``ragged_dot``, see ARCHITECTURE.md). ``auto`` picks ``einsum`` on CPU, ``ragged_dot``
  elsewhere. ``scaling.flops`` counts dropless as exactly ``k`` (the algorithm's work).
* ``expert_choice`` (Zhou et al. 2022): each expert picks its top ``C`` tokens of the group
  (same ``C`` as above); a token may be processed by 0..n_routed experts. Perfectly balanced,
  so no load-balance loss, but not causal (an expert's choice depends on later tokens).

Gates: for ``top_k == 1`` the raw router probability of each chosen expert (Switch, so the
router gets a gradient); for ``top_k > 1`` the ``k_routed`` chosen probabilities renormalised to
sum to 1 (GShard / Mixtral); with granularity G the gates are multiplied by G. The rule depends
on ``top_k``, not on ``k = top_k * G``, and the factor G keeps the output scale independent of
G: splitting every expert into G fine-grained slices (columns of ``w_in``, rows of ``w_out``)
under a replicated router reproduces the plain layer exactly (tested). Expert-choice gates are
the router probabilities (times G).

Losses (float32, added to the training loss already weighted):

* load balance (Switch): ``n_routed * sum_i f_i * P_i`` where ``f_i`` is the fraction of the
  ``T * k`` routing assignments (before dropping) that chose expert ``i`` and ``P_i`` the mean
  router probability of expert ``i``. Normalising ``f`` over assignments (``sum_i f_i = 1``)
  makes the value exactly 1 for a uniform router whatever ``k`` is, and 1 is its minimum
  under balanced assignments; a collapsed router gives up to ``n_routed``.
* router z-loss (ST-MoE): mean over tokens of ``logsumexp(router_logits)^2``.

Metrics: ``moe/lb_loss``, ``moe/z_loss``, ``moe/drop_fraction`` (fraction of the ``T * k``
assignments dropped for capacity; for expert choice, the fraction of tokens no expert took),
``moe/load_max`` / ``moe/load_min`` (largest/smallest expert load relative to uniform, 1 =
balanced) and ``moe/load_e{j}`` (fraction of assignments to expert j) when n_routed <= 16.

Expert parallelism: expert weights carry the logical axis ``expert`` (first dimension); the
dispatched ``[groups, experts, C, d]`` tensor is constrained to groups over the batch mesh
axes other than ``expert`` and experts over ``expert``, so GSPMD turns the dispatch and the
combine into all-to-alls when a mesh is active (``jax.set_mesh``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from scaling.config import ModelConfig
from scaling.blocks.moe import capacity, expert_slots_per_token  # noqa: F401  (the counted work)
from scaling.models import mup
from scaling.models.layers import activation_fn, compute_dtype, param

_MAX_LOAD_METRICS = 16  # per-expert load entries only for small expert counts


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def resolve_backend(cfg: ModelConfig) -> str:
    """Grouped-matmul backend for dropless routing: ``einsum`` on CPU, ``ragged_dot`` elsewhere."""
    b = cfg.moe.backend
    if b == "auto":
        return "einsum" if jax.default_backend() == "cpu" else "ragged_dot"
    return b


def rank_within_expert(e_N: jax.Array, n_experts: int) -> jax.Array:
    """Position of each assignment among those sent to the same expert, in order.

    ``e_N``: int[N] expert ids in priority order -> int[N] ranks (0-based)."""
    onehot_NxX = jax.nn.one_hot(e_N, n_experts, dtype=jnp.int32)
    return jnp.sum(jnp.cumsum(onehot_NxX, axis=0) * onehot_NxX, axis=-1) - 1


def _mesh_axes():
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))


def constrain_dispatch(x_GxXxCxD: jax.Array) -> jax.Array:
    """Shard the dispatch tensor as groups over the batch axes (minus ``expert``), experts over
    ``expert``; a no-op without an active mesh or when sizes do not divide."""
    sizes = _mesh_axes()
    if not sizes or sizes.get("expert", 1) == 1:
        return x_GxXxCxD
    from scaling.sharding import LOGICAL_RULES

    batch = dict(LOGICAL_RULES).get("batch")
    batch = (batch,) if isinstance(batch, str) else tuple(batch or ())
    batch = tuple(a for a in batch if a in sizes and a != "expert" and sizes[a] > 1)
    n_batch = math.prod(sizes[a] for a in batch)
    G, X = x_GxXxCxD.shape[:2]
    g_spec = batch if batch and G % n_batch == 0 else None
    e_spec = "expert" if X % sizes["expert"] == 0 else None
    return jax.lax.with_sharding_constraint(x_GxXxCxD, P(g_spec, e_spec, None, None))


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class MoELayer(nnx.Module):
    """Routed experts (+ optional always-on shared experts) in place of a dense MLP.

    Parameters: ``router`` float32[d, n_routed]; ``w_in`` [n_routed, d, f] (and ``w_gate`` for
    swiglu), ``w_out`` [n_routed, f, d] with ``f = cfg.expert_d_ff``; shared experts as one
    dense MLP of hidden ``n_shared_experts * f`` (the sum of that many experts).
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0, *, rngs: nnx.Rngs):
        if cfg.moe is None:
            raise ValueError("MoELayer needs cfg.moe")
        self.cfg = cfg
        moe = cfg.moe
        d, f, e = cfg.d_model, cfg.expert_d_ff, moe.n_routed
        std, out_std = mup.init_std(cfg, "w_in"), mup.init_std(cfg, "w_out")  # the dense MLP's initialisation
        swiglu = cfg.activation == "swiglu"
        self.router = param(rngs, (d, e), ("embed", None), mup.init_std(cfg, "router"))
        self.w_in = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std)
        self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std) if swiglu else None
        self.w_out = param(rngs, (e, f, d), ("expert", "mlp", "embed"), out_std)
        if moe.n_shared_experts:
            fs = moe.n_shared_experts * f
            self.s_in = param(rngs, (d, fs), ("embed", "mlp"), std)
            self.s_gate = param(rngs, (d, fs), ("embed", "mlp"), std) if swiglu else None
            self.s_out = param(rngs, (fs, d), ("mlp", "embed"), out_std)
        else:
            self.s_in = self.s_gate = self.s_out = None

    # ---- expert computation ----------------------------------------------------------------
    def _dtype(self):
        return compute_dtype(self.cfg)

    def _experts(self, x_GxXxCxD: jax.Array) -> jax.Array:
        """Batched expert MLPs over padded slots: [G, X, C, D] -> [G, X, C, D]."""
        dt = self._dtype()
        act = activation_fn(self.cfg)
        x = constrain_dispatch(x_GxXxCxD.astype(dt))
        h = jnp.einsum("gecd,edf->gecf", x, self.w_in[...].astype(dt))
        if self.w_gate is not None:
            h = jax.nn.silu(jnp.einsum("gecd,edf->gecf", x, self.w_gate[...].astype(dt))) * h
        else:
            h = act(h)
        y = jnp.einsum("gecf,efd->gecd", h, self.w_out[...].astype(dt))
        return constrain_dispatch(y)

    def _experts_ragged(self, x_NxD: jax.Array, group_sizes_X: jax.Array) -> jax.Array:
        """Grouped matmuls over expert-sorted rows: [N, d] -> [N, d]."""
        dt = self._dtype()
        act = activation_fn(self.cfg)
        x = x_NxD.astype(dt)
        h = jax.lax.ragged_dot(x, self.w_in[...].astype(dt), group_sizes_X)
        if self.w_gate is not None:
            h = jax.nn.silu(jax.lax.ragged_dot(x, self.w_gate[...].astype(dt), group_sizes_X)) * h
        else:
            h = act(h)
        return jax.lax.ragged_dot(h, self.w_out[...].astype(dt), group_sizes_X)

    def _shared(self, x_GxSxD: jax.Array) -> jax.Array:
        dt = self._dtype()
        x = x_GxSxD.astype(dt)
        h = x @ self.s_in[...].astype(dt)
        if self.s_gate is not None:
            h = jax.nn.silu(x @ self.s_gate[...].astype(dt)) * h
        else:
            h = activation_fn(self.cfg)(h)
        return h @ self.s_out[...].astype(dt)

    # ---- routing -----------------------------------------------------------------------------
    def router_logits(self, x_GxSxD: jax.Array) -> jax.Array:
        """float32[G, S, n_routed] router logits (the router always runs in float32)."""
        logits = jnp.einsum("gsd,de->gse", x_GxSxD.astype(jnp.float32), self.router[...])
        return logits * mup.readout_multiplier(self.cfg) if mup.is_mup(self.cfg) else logits

    def _gates(self, top_p):
        # Switch (top_k == 1): raw probability; GShard (top_k > 1): renormalised over the chosen.
        # Keyed on top_k, not k_routed, and times G, so G fine-grained slices of an expert under
        # a replicated router sum to exactly the plain expert's contribution.
        moe = self.cfg.moe
        if moe.top_k == 1:
            return top_p * moe.granularity
        return top_p * (moe.granularity / jnp.sum(top_p, axis=-1, keepdims=True))

    def _token_choice(self, x, probs, C):
        """Top-k with capacity C per expert per group; returns (y, kept mask, expert ids)."""
        G, S, D = x.shape
        X, k = self.cfg.moe.n_routed, self.cfg.moe.k_routed
        top_p, top_i = jax.lax.top_k(probs, k)  # [G, S, k]
        gates = self._gates(top_p)
        # assignment a = j * S + s: all first choices before any second choice (GShard priority)
        e_GxN = top_i.transpose(0, 2, 1).reshape(G, k * S)
        g_GxN = gates.transpose(0, 2, 1).reshape(G, k * S)
        rank = jax.vmap(rank_within_expert, in_axes=(0, None))(e_GxN, X)
        keep = rank < C
        slot = jnp.where(keep, e_GxN * C + rank, X * C)  # X*C is a discard slot
        N = k * S
        rows = jnp.arange(G)[:, None]
        # which assignment fills each slot (N = empty) -> which token (S = a zero row)
        src = jnp.full((G, X * C + 1), N, jnp.int32).at[rows, slot].set(jnp.arange(N, dtype=jnp.int32)[None])
        src = src[:, : X * C]
        tok = jnp.where(src < N, src % S, S)
        x_pad = jnp.concatenate([x, jnp.zeros((G, 1, D), x.dtype)], axis=1)
        x_in = jnp.take_along_axis(x_pad, tok[..., None], axis=1).reshape(G, X, C, D)
        y_slots = self._experts(x_in).reshape(G, X * C, D)
        y_pad = jnp.concatenate([y_slots, jnp.zeros((G, 1, D), y_slots.dtype)], axis=1)
        y_assign = jnp.take_along_axis(y_pad, slot[..., None], axis=1)  # dropped -> zeros
        y_assign = y_assign * (g_GxN * keep).astype(y_assign.dtype)[..., None]
        y = y_assign.reshape(G, k, S, D).sum(axis=1)
        return y, keep, e_GxN

    def _dropless_ragged(self, x, probs):
        G, S, D = x.shape
        X, k = self.cfg.moe.n_routed, self.cfg.moe.k_routed
        top_p, top_i = jax.lax.top_k(probs, k)
        gates = self._gates(top_p)
        e_N = top_i.reshape(-1)  # token-major: a = t * k + j
        order = jnp.argsort(e_N, stable=True)
        x_tok = x.reshape(G * S, D)
        x_sorted = x_tok[order // k]
        sizes = jnp.bincount(e_N, length=X).astype(jnp.int32)
        y_sorted = self._experts_ragged(x_sorted, sizes)
        y_assign = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
        y_assign = y_assign * gates.reshape(-1, 1).astype(y_assign.dtype)
        y = y_assign.reshape(G, S, k, D).sum(axis=2)
        keep = jnp.ones((G, k * S), bool)
        return y, keep, top_i.transpose(0, 2, 1).reshape(G, k * S)

    def _expert_choice(self, x, probs, C):
        G, S, D = x.shape
        X = self.cfg.moe.n_routed
        gate_GxXxC, tok_GxXxC = jax.lax.top_k(probs.transpose(0, 2, 1), C)
        gate_GxXxC = gate_GxXxC * self.cfg.moe.granularity  # same output scale for every granularity
        x_in = jnp.take_along_axis(x, tok_GxXxC.reshape(G, X * C)[..., None], axis=1).reshape(G, X, C, D)
        y_slots = self._experts(x_in)
        y_slots = y_slots * gate_GxXxC.astype(y_slots.dtype)[..., None]
        y = jax.vmap(lambda t, v: jnp.zeros((S, D), v.dtype).at[t].add(v))(tok_GxXxC.reshape(G, X * C), y_slots.reshape(G, X * C, D))
        taken = jax.vmap(lambda t: jnp.zeros((S,), jnp.int32).at[t].add(1))(tok_GxXxC.reshape(G, X * C))
        return y, taken

    # ---- forward -------------------------------------------------------------------------------
    def __call__(self, x_BxLxD: jax.Array, train: bool = True, **_unused) -> tuple[jax.Array, dict]:
        """x: [B, L, d] -> (y: [B, L, d] in x's dtype, aux dict of float32 scalars).

        ``train=False`` (evaluation, sampling): token choice drops nothing (every expert has
        ``C = S`` slots), so a token's output depends only on its own routing, as it does for a
        sampler that routes one new token at a time; with capacity, a token's later choices
        depend on how many later tokens chose the same expert. Expert choice stays non-causal."""
        cfg, moe = self.cfg, self.cfg.moe
        B, L, D = x_BxLxD.shape
        X = moe.n_routed
        logits = self.router_logits(x_BxLxD)
        probs = jax.nn.softmax(logits, axis=-1)
        z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
        aux: dict = {}
        if moe.router == "expert_choice":
            y, taken = self._expert_choice(x_BxLxD, probs, capacity(cfg, L))
            lb_loss = jnp.zeros((), jnp.float32)
            drop = jnp.mean((taken == 0).astype(jnp.float32))
            load = jnp.full((X,), 1.0 / X, jnp.float32)  # each expert takes exactly C tokens
        else:
            # evaluation drops nothing: on accelerators the exact grouped matmul does k expert-MLPs
            # per token; the padded C = S einsum (CPU) computes n_routed of them
            no_drop_ragged = not train and moe.router == "token_choice" and jax.default_backend() != "cpu"
            if (moe.router == "dropless" and resolve_backend(cfg) == "ragged_dot") or no_drop_ragged:
                y, keep, e_GxN = self._dropless_ragged(x_BxLxD, probs)
            else:
                y, keep, e_GxN = self._token_choice(x_BxLxD, probs, capacity(cfg, L) if train else L)
            load = jnp.mean(jax.nn.one_hot(e_GxN, X, dtype=jnp.float32), axis=(0, 1))  # f_i
            mean_prob = jnp.mean(probs, axis=(0, 1))  # P_i
            lb_loss = X * jnp.sum(load * mean_prob)
            drop = 1.0 - jnp.mean(keep.astype(jnp.float32))
        if self.s_in is not None:
            y = y + self._shared(x_BxLxD)
        aux["aux_loss"] = moe.aux_loss_weight * lb_loss + moe.z_loss_weight * z_loss
        aux["moe/lb_loss"] = lb_loss
        aux["moe/z_loss"] = z_loss
        aux["moe/drop_fraction"] = drop
        aux["moe/load_max"] = jnp.max(load) * X
        aux["moe/load_min"] = jnp.min(load) * X
        if X <= _MAX_LOAD_METRICS:
            for j in range(X):
                aux[f"moe/load_e{j}"] = load[j]
        return y.astype(x_BxLxD.dtype), aux
