"""Parameters and FLOPs of every architecture: the single source of truth.

Conventions
-----------
* A multiply-accumulate is 2 FLOPs. Only matmuls are counted (the element-wise work of norms,
  activations, softmax, RoPE and the optimizer is left out, as in Kaplan et al. and Chinchilla);
  XLA's count of a compiled step includes that work, so it sits a few percent above ours.
* Model FLOPs (the budget ``C``, the ``flops`` column, MFU) count causal attention: ``QK^T``
  and ``softmax(.) V`` over the unmasked keys only, ``(L + 1) / 2`` per query on average, i.e.
  ``2 * (L + 1) * H * A`` FLOPs per token per layer. MaxText halves to ``L / 2`` (a ``1 / L``
  difference in that term) and Kaplan's ``2 * n_ctx * d_attn`` per layer is the same number;
  Chinchilla's appendix (Table A4) and PaLM's MFU count the full square. One number per
  architecture, whatever kernel runs it, so a budget buys the same model on every backend.
* Hardware FLOPs (``hardware_train_flops_per_token``: HFU, ``hardware_flops`` in summaries)
  are what the chosen kernels and ``model.remat`` compute: XLA's attention computes the full
  ``L x L`` matrix (the mask skips no work); a fused causal kernel (cuDNN, splash) skips the
  masked tiles and recomputes score-sized matmuls in its backward pass; rematerialisation
  recomputes what its policy does not save (see ``hardware_train_flops_per_token``). Tests
  check this count against XLA's own count of the compiled train step for the XLA kernel and
  the einsum MoE backend, every remat policy (dense, MoE, MoD); the fused kernels' and
  ``ragged_dot``'s counts follow their published algorithms and have not been measured here
  (no accelerator; XLA's CPU ``ragged_dot`` computes every group densely).
* Training = forward + backward = ``3 x forward`` (the backward pass computes a gradient for
  both operands of every matmul). The embedding lookup is a gather, not a matmul: 0 FLOPs.
* Embedding parameters are the vocabulary matrices: the input embedding ``[V, D]`` and, when
  untied, the output head ``[D, V]`` (tied embeddings are counted once). Everything else,
  norms included, is non-embedding. ``6N`` uses active non-embedding parameters (Kaplan).
* Active parameters are those a token touches (routed experts: only its ``top_k * G``).

Structure: per-layer functions take the layer index; what a layer holds beyond attention and
the dense MLP (MoE MLPs, mixture-of-depths routers, any registered kind) is counted by its
block kind (``scaling.blocks``), written with the public helpers here (``Count``, ``mm``,
``dense_mlp_params``, ``dense_mlp_flops_per_token``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scaling import blocks
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
class Count:
    """Parameters of one piece of a layer (elements): all of them and those a token touches."""

    total: int
    active: int

    def __add__(self, other: "Count") -> "Count":
        return Count(self.total + other.total, self.active + other.active)


def _dense(n: int) -> Count:
    return Count(n, n)


# --------------------------------------------------------------------------------------------
# Dense pieces (shapes exactly as in scaling/models/layers.py)
# --------------------------------------------------------------------------------------------


def _n_mlp_matrices(model: ModelConfig) -> int:
    return 3 if model.activation == "swiglu" else 2


def dense_mlp_params(model: ModelConfig, d_ff: int) -> int:
    """Parameters of a dense MLP of hidden size ``d_ff`` (GELU: 2 matrices, SwiGLU: 3)."""
    return _n_mlp_matrices(model) * model.d_model * d_ff


def _attention_params(model: ModelConfig) -> int:
    D, H, K, A = model.d_model, model.n_heads, model.resolved_n_kv_heads, model.resolved_head_dim
    qk_norm = 2 * A if model.qk_norm else 0
    return D * H * A + 2 * D * K * A + H * A * D + qk_norm


def _block_params(model: ModelConfig, i: int) -> Count:
    norms = 2 * model.d_model
    count = _dense(norms + _attention_params(model)) + _mlp_params(model, i)
    router = blocks.layer_kind(model, i, "router")
    if router is not None:
        count = count + router.params(model, i)
    return count


def _mlp_params(model: ModelConfig, i: int) -> Count:
    kind = blocks.layer_kind(model, i, "mlp")
    if kind is not None:
        return kind.params(model, i)
    return _dense(dense_mlp_params(model, model.resolved_d_ff))


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


def mm(m_in: int, n_out: int) -> float:
    """FLOPs per token of a ``[.., m_in] x [m_in, n_out]`` matmul."""
    return 2.0 * m_in * n_out


def _attention_projection_flops_per_token(model: ModelConfig) -> float:
    D, H, K, A = model.d_model, model.n_heads, model.resolved_n_kv_heads, model.resolved_head_dim
    return mm(D, H * A) + 2 * mm(D, K * A) + mm(H * A, D)


def _attention_score_flops_per_token(model: ModelConfig, seq_len: int, scores: str = "causal") -> float:
    """``QK^T`` and ``PV`` per token: over the unmasked keys (``scores="causal"``, ``(L + 1) / 2``
    per query on average), the full ``L x L`` matrix (``"full"``, what XLA's kernel computes)
    or whole causal tiles (``"splash"``, ``(L + tile) / 2``)."""
    keys = {"causal": (seq_len + 1) / 2, "full": seq_len,
            "splash": (seq_len + splash_tile(seq_len)) / 2 if scores == "splash" else 0}[scores]
    return 2 * mm(model.n_heads * model.resolved_head_dim, 1) * keys


def dense_mlp_flops_per_token(model: ModelConfig, d_ff: int) -> float:
    """Forward FLOPs per token of a dense MLP of hidden size ``d_ff``."""
    return _n_mlp_matrices(model) * mm(model.d_model, d_ff)


def _attention_flops_per_token(model: ModelConfig, i: int, seq_len: int, scores: str = "causal") -> float:
    return _attention_projection_flops_per_token(model) + _attention_score_flops_per_token(model, seq_len, scores)


def _mlp_flops_per_token(model: ModelConfig, i: int, seq_len: int) -> float:
    kind = blocks.layer_kind(model, i, "mlp")
    if kind is not None:
        return kind.flops_per_token(model, i, seq_len)
    return dense_mlp_flops_per_token(model, model.resolved_d_ff)


def _routed_tokens(model: ModelConfig, i: int, seq_len: int) -> int:
    """Tokens per sequence block ``i`` runs on (``seq_len`` unless a router picks fewer)."""
    return round(blocks.token_fraction(model, i, seq_len) * seq_len)


def _block_flops_per_token(model: ModelConfig, i: int, seq_len: int, scores: str = "causal") -> float:
    """Forward FLOPs per token of block ``i``. Under a router (mixture-of-depths) the block runs
    on ``k`` of ``L`` tokens (causal attention over ``k`` keys, the MLP on ``k`` tokens) and the
    router on every token, averaged per token."""
    router = blocks.layer_kind(model, i, "router")
    if router is None:
        return _attention_flops_per_token(model, i, seq_len, scores) + _mlp_flops_per_token(model, i, seq_len)
    k = _routed_tokens(model, i, seq_len)
    inner = _attention_flops_per_token(model, i, k, scores) + _mlp_flops_per_token(model, i, k)
    return k / seq_len * inner + router.flops_per_token(model, i, seq_len)


def _head_flops_per_token(model: ModelConfig) -> float:
    return mm(model.d_model, model.vocab_size)


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
    H_A = model.n_heads * model.resolved_head_dim
    total = 0.0
    for i in range(model.n_layers):
        frac = blocks.token_fraction(model, i, seq_len)
        keys = (frac * seq_len + 1) / 2
        total += frac * 2 * mm(H_A, 1) * keys
    return total


HARDWARE_ATTENTION = ("xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # the splash kernel's smallest tile: sequences and head dims it takes are multiples
# extra ``L x L``-sized matmuls a fused kernel's backward pass runs beyond the standard four
# (dP, dV, dQ, dK): cuDNN's recomputes QK^T; splash's separate dq and dkv kernels each
# recompute QK^T and dP = dO V^T, one of the dP being the standard one
_BACKWARD_RECOMPUTE = {"cudnn": 1, "splash": 3}


def splash_tile(seq_len: int) -> int:
    """The splash kernel's query/key tile for sequences of ``seq_len`` tokens (the layers use
    it; FLOPs count its whole diagonal tiles): 512, or the largest divisor of ``seq_len`` it has."""
    return math.gcd(seq_len, 512)


def _kernel_scores(attention: str, n_tokens: int) -> str:
    """What a layer attending over ``n_tokens`` computes with kernel ``attention``: splash
    needs a multiple of its tile (else the layer runs XLA's), cuDNN takes any length."""
    if attention == "splash" and n_tokens % SPLASH_BLOCK:
        return "full"
    return {"xla": "full", "cudnn": "causal", "splash": "splash"}[attention]


def hardware_train_flops_per_token(model: ModelConfig, seq_len: int, attention: str = "xla",
                                   moe_backend: str = "ragged_dot") -> float:
    """Training FLOPs per token the hardware computes with attention kernel ``attention`` (as
    resolved by ``scaling.models.layers.attention_implementation``: ``"xla"``, ``"cudnn"`` or
    ``"splash"``), MoE backend ``moe_backend`` (``scaling.models.moe.resolve_backend``) and
    ``model.remat``: the numerator of HFU per token.

    * Attention: ``"xla"`` computes the full ``L x L`` scores. cuDNN computes the unmasked half
      (its tile is not public: the masked half of its diagonal tiles is not counted) and
      ``QK^T`` again in its backward pass. Splash computes whole diagonal tiles
      (``(L + tile) / 2`` keys per query, ``splash_tile``) and ``QK^T`` twice and ``dO V^T``
      once more in its backward pass. A mixture-of-depths block attends over its ``k`` routed
      tokens with the same kernel (splash only when ``k`` is a multiple of 128).
    * MoE: dropless routing on the ``"einsum"`` backend computes all ``n_routed`` experts'
      slots per token, not ``k``; capacity routing its padded slots (as the model count).
    * Rematerialisation recomputes in the backward pass what its policy does not save:
      ``full`` a block's forward matmuls (a dense MLP's down projection excepted: no gradient
      reads its output); ``dots_saveable`` saves plain matmul outputs, so it recomputes the
      fused attention kernels and ``ragged_dot`` experts; ``dots_with_no_batch_dims_saveable``
      also the batched matmuls: XLA's attention scores and the einsum experts."""
    if attention not in HARDWARE_ATTENTION:
        raise ValueError(f"attention: one of {', '.join(HARDWARE_ATTENTION)} (a resolved kernel), got {attention!r}")
    total = 3.0 * _head_flops_per_token(model)
    for i in range(model.n_layers):
        frac = blocks.token_fraction(model, i, seq_len)
        k = round(frac * seq_len)  # tokens the block attends over (L unless a router picks fewer)
        scores = _kernel_scores(attention, k)
        block = _block_flops_per_token(model, i, seq_len, scores)
        score_fwd = frac * _attention_score_flops_per_token(model, k, scores)
        mlp_kind = blocks.layer_kind(model, i, "mlp")
        dots_recompute = nobatch_recompute = 0.0
        if mlp_kind is not None and mlp_kind.hardware is not None:
            fwd, dots_recompute, nobatch_recompute = mlp_kind.hardware(model, i, k, moe_backend)
            block += frac * (fwd - mlp_kind.flops_per_token(model, i, k))
            dots_recompute, nobatch_recompute = frac * dots_recompute, frac * nobatch_recompute
        total += 3.0 * block
        if scores != "full":  # one causal L x L matmul is half the score forward (QK^T and PV)
            total += _BACKWARD_RECOMPUTE[attention] * score_fwd / 2
        if model.remat == "full":
            dense_mlp = mlp_kind is None and blocks.layer_kind(model, i, "router") is None
            total += block - (mm(model.resolved_d_ff, model.d_model) if dense_mlp else 0.0)
        elif model.remat == "dots_saveable":
            total += (score_fwd if scores != "full" else 0.0) + dots_recompute
        elif model.remat == "dots_with_no_batch_dims_saveable":
            total += score_fwd + nobatch_recompute
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
