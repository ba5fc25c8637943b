"""Parameters and FLOPs of every architecture: the single source of truth.

Conventions
-----------
* A multiply-accumulate is 2 FLOPs. Only matmuls are counted (the element-wise work of norms,
  activations, softmax, RoPE and the optimizer is left out, as in Kaplan et al. and Chinchilla);
  XLA's count of a compiled step includes that work, so it sits a few percent above ours.
* Model FLOPs (the budget ``C``, the ``flops`` column, MFU) count causal attention as the
  literature does: ``QK^T`` and ``softmax(.) V`` over the unmasked keys only, ``(L + 1) / 2``
  per query on average, i.e. ``2 * (L + 1) * H * E`` FLOPs per token per layer (MaxText halves
  to ``L / 2``: a ``1 / L`` difference in that term; Kaplan's ``2 * n_ctx * d_attn`` per layer
  is the same number; PaLM's MFU counts the full square). One number per architecture,
  whatever kernel runs it, so a budget buys the same model on every backend.
* Hardware FLOPs (``hardware_train_flops_per_token``: HFU, ``hardware_flops`` in summaries)
  are what the chosen kernel and ``model.remat`` compute: XLA's attention computes the full
  ``L x L`` matrix (the mask skips no work); a fused causal kernel (cuDNN, splash) skips the
  masked half and recomputes score-sized matmuls in its backward pass; rematerialisation recomputes a block's
  forward matmuls (``full``) or its batched attention matmuls
  (``dots_with_no_batch_dims_saveable``). ``tests/test_flops.py`` checks this count against
  XLA's own count of the compiled train step (the XLA kernel; the fused kernels' counts follow
  their published backward passes and have not been measured here).
* Training = forward + backward = ``3 x forward`` (the backward pass computes a gradient for
  both operands of every matmul). The embedding lookup is a gather, not a matmul: 0 FLOPs.
* Embedding parameters are the vocabulary matrices: the input embedding ``[V, D]`` and, when
  untied, the output head ``[D, V]`` (tied embeddings are counted once). Everything else,
  norms included, is non-embedding. ``6N`` uses active non-embedding parameters (Kaplan).
* Active parameters are those a token touches (routed experts: only its ``top_k * G``).

Structure: per-layer functions take the layer index so each block kind adds its own terms;
sparse blocks (MoE, MoD) live in the marked section at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scaling.config import ConfigError, ModelConfig, TrainConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (elements). ``active`` counts what one token touches."""

    total: int
    embedding: int
    non_embedding: int
    active: int
    active_non_embedding: int


@dataclass(frozen=True)
class _Count:
    total: int
    active: int

    def __add__(self, other: "_Count") -> "_Count":
        return _Count(self.total + other.total, self.active + other.active)


def _dense(n: int) -> _Count:
    return _Count(n, n)


# --------------------------------------------------------------------------------------------
# Dense pieces (shapes exactly as in scaling/models/layers.py)
# --------------------------------------------------------------------------------------------


def _n_mlp_matrices(model: ModelConfig) -> int:
    return 3 if model.activation == "swiglu" else 2


def _dense_mlp_params(model: ModelConfig, d_ff: int) -> int:
    return _n_mlp_matrices(model) * model.d_model * d_ff


def _attention_params(model: ModelConfig) -> int:
    D, H, K, E = model.d_model, model.n_heads, model.resolved_n_kv_heads, model.resolved_head_dim
    qk_norm = 2 * E if model.qk_norm else 0
    return D * H * E + 2 * D * K * E + H * E * D + qk_norm


def _block_params(model: ModelConfig, i: int) -> _Count:
    norms = 2 * model.d_model
    count = _dense(norms + _attention_params(model)) + _mlp_params(model, i)
    if model.is_mod_layer(i):
        count = count + _mod_router_params(model, i)
    return count


def _mlp_params(model: ModelConfig, i: int) -> _Count:
    if model.is_moe_layer(i):
        return _moe_mlp_params(model, i)
    return _dense(_dense_mlp_params(model, model.resolved_d_ff))


def param_counts(model: ModelConfig) -> ParamCounts:
    """Parameter counts of ``Transformer(model)``; equal to the sizes of its ``nnx.Param`` state."""
    V, D = model.vocab_size, model.d_model
    embedding = V * D * (1 if model.tie_embeddings else 2)
    body = _dense(D)  # final norm
    for i in range(model.n_layers):
        body = body + _block_params(model, i)
    return ParamCounts(
        total=embedding + body.total,
        embedding=embedding,
        non_embedding=body.total,
        active=embedding + body.active,
        active_non_embedding=body.active,
    )


def _mm(m_in: int, n_out: int) -> float:
    """FLOPs per token of a ``[.., m_in] x [m_in, n_out]`` matmul."""
    return 2.0 * m_in * n_out


def _attention_projection_flops_per_token(model: ModelConfig) -> float:
    D, H, K, E = model.d_model, model.n_heads, model.resolved_n_kv_heads, model.resolved_head_dim
    return _mm(D, H * E) + 2 * _mm(D, K * E) + _mm(H * E, D)


def _attention_score_flops_per_token(model: ModelConfig, seq_len: int, scores: str = "causal") -> float:
    """``QK^T`` and ``PV`` per token: over the unmasked keys (``scores="causal"``, ``(L + 1) / 2``
    per query on average) or the full ``L x L`` matrix (``"full"``, what XLA's kernel computes)."""
    keys = (seq_len + 1) / 2 if scores == "causal" else seq_len
    return 2 * _mm(model.n_heads * model.resolved_head_dim, 1) * keys


def _dense_mlp_flops_per_token(model: ModelConfig, d_ff: int) -> float:
    return _n_mlp_matrices(model) * _mm(model.d_model, d_ff)


def _attention_flops_per_token(model: ModelConfig, i: int, seq_len: int, scores: str = "causal") -> float:
    return _attention_projection_flops_per_token(model) + _attention_score_flops_per_token(model, seq_len, scores)


def _mlp_flops_per_token(model: ModelConfig, i: int, seq_len: int) -> float:
    if model.is_moe_layer(i):
        return _moe_mlp_flops_per_token(model, i, seq_len)
    return _dense_mlp_flops_per_token(model, model.resolved_d_ff)


def _block_flops_per_token(model: ModelConfig, i: int, seq_len: int, scores: str = "causal") -> float:
    if model.is_mod_layer(i):
        return _mod_block_flops_per_token(model, i, seq_len, scores)
    return _attention_flops_per_token(model, i, seq_len, scores) + _mlp_flops_per_token(model, i, seq_len)


def _head_flops_per_token(model: ModelConfig) -> float:
    return _mm(model.d_model, model.vocab_size)


def forward_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Forward-pass model FLOPs per token for sequences of ``seq_len`` tokens: every matmul
    (attention projections, causal scores and values, MLP, output head), 2 FLOPs per MAC."""
    return sum(_block_flops_per_token(model, i, seq_len) for i in range(model.n_layers)) + _head_flops_per_token(model)


def train_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training model FLOPs per token (forward + backward = 3 x forward): what a budget
    (``budget.flops``), the ``flops`` / ``C`` columns and MFU count."""
    return 3.0 * forward_flops_per_token(model, seq_len)


def six_n_flops_per_token(model: ModelConfig) -> float:
    """Kaplan's approximation: ``6 * N`` with N the active non-embedding parameters."""
    return 6.0 * param_counts(model).active_non_embedding


def causal_attention_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Forward attention-score model FLOPs per token (``QK^T`` and ``PV`` over the unmasked
    keys), summed over layers: the part of ``forward_flops_per_token`` that grows with ``L``."""
    H_E = model.n_heads * model.resolved_head_dim
    total = 0.0
    for i in range(model.n_layers):
        frac = _mod_token_fraction(model, i, seq_len)
        keys = (frac * seq_len + 1) / 2
        total += frac * 2 * _mm(H_E, 1) * keys
    return total


HARDWARE_ATTENTION = ("xla", "cudnn", "splash")
# extra ``L x L``-sized matmuls a fused kernel's backward pass runs beyond the standard four
# (dP, dV, dQ, dK): cuDNN's recomputes QK^T; splash's separate dq and dkv kernels each
# recompute QK^T and dP = dO V^T, one of the dP being the standard one
_BACKWARD_RECOMPUTE = {"cudnn": 1, "splash": 3}


def hardware_train_flops_per_token(model: ModelConfig, seq_len: int, attention: str = "xla",
                                   moe_backend: str = "ragged_dot") -> float:
    """Training FLOPs per token the hardware computes with attention kernel ``attention`` (as
    resolved by ``scaling.models.layers.attention_implementation``: ``"xla"``, ``"cudnn"`` or
    ``"splash"``) and ``model.remat``: the numerator of HFU per token. ``"xla"`` computes the
    full ``L x L`` scores; the fused causal kernels the unmasked half, plus ``L x L``-sized
    matmuls again in their backward passes (cuDNN ``QK^T``; splash ``QK^T`` twice and ``dO V^T``
    once); the diagonal tiles' masked half they also compute, at most a tile / L more, is not
    counted. MoD blocks always run XLA's masked attention. Rematerialisation adds a block's
    forward matmuls (``full``; a dense MLP's down projection is not needed again) or its batched
    attention matmuls (``dots_with_no_batch_dims_saveable``,
    which saves only unbatched matmul outputs); ``dots_saveable`` recomputes no matmul.
    ``moe_backend`` (``scaling.models.moe.resolve_backend``): dropless routing on the
    ``"einsum"`` backend computes all ``n_routed`` experts' padded slots per token, not ``k``."""
    if attention not in HARDWARE_ATTENTION:
        raise ValueError(f"attention: one of {', '.join(HARDWARE_ATTENTION)} (a resolved kernel), got {attention!r}")
    total = 3.0 * _head_flops_per_token(model)
    for i in range(model.n_layers):
        fused = attention != "xla" and not model.is_mod_layer(i)
        scores = "causal" if fused else "full"
        block = _block_flops_per_token(model, i, seq_len, scores)
        if model.is_moe_layer(i) and model.moe.router == "dropless" and moe_backend == "einsum":
            padded = model.moe.n_routed - model.moe.k_routed  # every expert runs on every token
            block += _mod_token_fraction(model, i, seq_len) * padded * _dense_mlp_flops_per_token(model, model.expert_d_ff)
        total += 3.0 * block
        if fused:  # one causal L x L matmul is half the causal score forward (QK^T and PV)
            total += _BACKWARD_RECOMPUTE[attention] * _attention_score_flops_per_token(model, seq_len, "causal") / 2
        if model.remat == "full":  # all but a dense MLP's last matmul, whose output no gradient reads
            dense_mlp = not model.is_mod_layer(i) and not model.is_moe_layer(i)
            total += block - (_mm(model.resolved_d_ff, model.d_model) if dense_mlp else 0.0)
        elif model.remat == "dots_with_no_batch_dims_saveable":
            frac = _mod_token_fraction(model, i, seq_len)
            k = round(frac * seq_len)
            total += frac * _attention_score_flops_per_token(model, k, scores)
    return total


def tokens_for_steps(cfg: TrainConfig, steps: int) -> int:
    """Training tokens the first ``steps`` steps consume (``data.batch_schedule`` aware)."""
    if not cfg.data.batch_schedule:
        return int(steps) * cfg.tokens_per_step
    from scaling.data.batch_schedule import BatchSchedule

    return BatchSchedule.of(cfg.data).tokens_before(int(steps))


def steps_for_budget(cfg: TrainConfig) -> int:
    """Training steps that spend ``cfg.budget``: model FLOPs (``train_flops_per_token``),
    tokens or steps. Wall-clock budgets (``budget.seconds``) are resolved while training and
    raise ``ValueError`` here. A budget smaller than one step raises ``ConfigError``."""
    budget = cfg.budget
    kind = budget.kind
    per_step_tokens = cfg.tokens_per_step
    if kind == "steps":
        return int(budget.steps)
    if kind == "seconds":
        raise ValueError("budget.seconds is a wall-clock budget: the number of steps is known only while training")
    if cfg.data.batch_schedule:  # the batch changes with the tokens seen
        from scaling.data.batch_schedule import BatchSchedule

        tokens = budget.tokens if kind == "tokens" else budget.flops / train_flops_per_token(cfg.model, cfg.data.seq_len)
        steps = BatchSchedule.of(cfg.data).steps_for_tokens(tokens)
        if steps < 1:
            raise ConfigError(f"budget.{kind}: {getattr(budget, kind):.3g} {kind} is less than one step of the first "
                              f"batch ({per_step_tokens} tokens); raise the budget")
        return int(steps)
    if kind == "tokens":
        steps = round(budget.tokens / per_step_tokens)
        if steps < 1:
            raise ConfigError(
                f"budget.tokens: {budget.tokens:g} tokens is less than one step ({per_step_tokens} tokens); "
                "raise budget.tokens or lower data.batch_size / data.seq_len"
            )
        return int(steps)
    per_step_flops = train_flops_per_token(cfg.model, cfg.data.seq_len) * per_step_tokens
    steps = round(budget.flops / per_step_flops)
    if steps < 1:
        raise ConfigError(
            f"budget.flops: {budget.flops:.3g} FLOPs is less than one training step ({per_step_flops:.3g} FLOPs); "
            "raise budget.flops or shrink the model / batch"
        )
    return int(steps)


# --------------------------------------------------------------------------------------------
# Sparse blocks: mixture-of-experts MLPs and mixture-of-depths routing.
# The three helpers below define the work the sparse layers do; scaling/models/moe.py and
# scaling/models/mod.py import them from here, so counts and computation cannot drift apart.
# --------------------------------------------------------------------------------------------


def capacity(cfg: ModelConfig, group_size: int) -> int:
    """MoE slots per expert per routing group: ``ceil(capacity_factor * S * k / n_routed)``, at
    most ``S`` (an expert never needs more slots than the group has tokens); ``S`` for dropless."""
    moe = cfg.moe
    if moe.router == "dropless":
        return group_size
    c = math.ceil(moe.capacity_factor * group_size * moe.k_routed / moe.n_routed)
    return max(1, min(group_size, c))


def expert_slots_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Expert-MLP evaluations computed per token (the FLOP multiplier of one expert MLP).

    Capacity modes compute every padded slot: ``n_routed * C / S``. Dropless counts exactly
    ``k_routed`` (what ``ragged_dot`` does; the CPU einsum backend computes more, see
    ``scaling/models/moe.py``).
    """
    moe = cfg.moe
    if moe.router == "dropless":
        return float(moe.k_routed)
    return moe.n_routed * capacity(cfg, seq_len) / seq_len


def n_selected(capacity: float, seq_len: int) -> int:
    """MoD: tokens per sequence that enter a routed block: ``ceil(capacity * L)`` (at least 1)."""
    return max(1, min(seq_len, math.ceil(capacity * seq_len - 1e-9)))


def _moe_mlp_params(model: ModelConfig, i: int) -> _Count:
    """Router ``[D, n_routed]`` + routed experts + shared experts. A token touches the router,
    its ``k_routed`` experts and the shared experts."""
    moe = model.moe
    D, f = model.d_model, model.expert_d_ff
    router = D * moe.n_routed
    expert = _dense_mlp_params(model, f)
    shared = moe.n_shared_experts * expert
    return _Count(router + moe.n_routed * expert + shared, router + moe.k_routed * expert + shared)


def _moe_mlp_flops_per_token(model: ModelConfig, i: int, seq_len: int) -> float:
    """Router matmul + expert MLPs over the slots actually computed (padded capacity slots
    count; dropless counts exactly ``k_routed``) + shared experts."""
    moe = model.moe
    D, f = model.d_model, model.expert_d_ff
    router = _mm(D, moe.n_routed)
    experts = expert_slots_per_token(model, seq_len) * _dense_mlp_flops_per_token(model, f)
    shared = moe.n_shared_experts * _dense_mlp_flops_per_token(model, f)
    return router + experts + shared


def _mod_router_params(model: ModelConfig, i: int) -> _Count:
    """The MoD router vector ``[D]`` (+ the optional causal predictor MLP, trained on a
    stop-gradient copy and not on the token's forward path, so not active)."""
    D = model.d_model
    router = _dense(D)
    if model.mod.causal_aux == "predictor":
        h = max(8, D // 8)
        router = router + _Count(D * h + h, 0)
    return router


def _mod_token_fraction(model: ModelConfig, i: int, seq_len: int) -> float:
    """Fraction of a sequence's tokens that enter block ``i`` (1 for unrouted blocks)."""
    if not model.is_mod_layer(i):
        return 1.0
    return n_selected(model.mod.capacity, seq_len) / seq_len


def _mod_block_flops_per_token(model: ModelConfig, i: int, seq_len: int, scores: str = "causal") -> float:
    """A routed block runs on ``k`` of ``L`` tokens: causal attention over ``k`` keys and the
    MLP on ``k`` tokens; the router (``D`` MACs) runs on every token. Averaged per token."""
    k = round(_mod_token_fraction(model, i, seq_len) * seq_len)
    frac = k / seq_len
    inner = _attention_flops_per_token(model, i, k, scores) + _mlp_flops_per_token(model, i, k)
    router = _mm(model.d_model, 1)
    if model.mod.causal_aux == "predictor":
        h = max(8, model.d_model // 8)
        router += _mm(model.d_model, h) + _mm(h, 1)
    return frac * inner + router
