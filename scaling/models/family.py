"""The dense size rule: a target non-embedding parameter count -> a transformer shape.

Rule (documented so sweeps are reproducible):

1. **Aspect ratio.** The target ``d_model / n_layers`` grows slowly with size,
   ``A(N) = clip(32 * (N / 1e6) ** 0.15, 16, 128)``: about 32 for the CPU grids (5K-2M
   parameters, the shapes measured in ARCHITECTURE.md: d64 L2, d128 L4), about 90 at 1B
   (GPT-3 XL is d2048 L24, A = 85; Pythia-1B A = 128). Kaplan et al. (2020) find the loss flat
   within a few percent for A between ~20 and ~200, so the rule only has to stay in that range.
2. **Heads.** ``head_dim`` is fixed by width: ``d_model / 2`` below 64 (two heads, so tiny
   widths step by 4), 16 below 128, 32 below 512, 64 below 2048, then 128; ``d_model`` is a
   multiple of it.
   A grouped-query ratio ``n_heads / n_kv_heads`` in ``base`` is kept where it divides.
3. **Search.** Every ``n_layers`` from 1 to 128 with the two widths bracketing the target in
   parameters is a candidate (stopping once shapes are 16x thinner than ``A(N)``); counts are
   exact (``scaling.flops.param_counts``, so activation, ffn_ratio, qk-norm, grouped-query
   heads, MoE and MoD of ``base`` are honoured). The winner
   minimises ``|log(N / target)| + 0.1 * |log(A / A(N))|``: a shape 2x off the aspect ratio
   costs as much as one ~7% off in parameters. Widths are quantised to the head dimension, so
   the result typically lands within a few percent of the target (at most ~12% from 20K up;
   below that a one-layer model cannot be finer: up to ~25%).

Everything else (vocabulary, activation, ffn_ratio, norms, MoE/MoD settings) comes from ``base``;
``base.d_ff`` and ``base.head_dim`` are reset so the FFN follows ``ffn_ratio``. Under μP the
base model's head dimension (``mup_base_head_dim``) is the rule's at ``mup_base_width``.
"""

from __future__ import annotations

import dataclasses
import math

from scaling.config import ConfigError, ModelConfig
from scaling.flops import param_counts

_ASPECT_WEIGHT = 0.1  # cost of log aspect-ratio mismatch relative to log parameter miss
_MAX_LAYERS = 128


def target_aspect_ratio(n_params: float) -> float:
    """Target ``d_model / n_layers`` for ``n_params`` non-embedding parameters."""
    return min(128.0, max(16.0, 32.0 * (n_params / 1e6) ** 0.15))


def head_dim_for(d_model: int) -> int:
    """Head dimension used at width ``d_model`` (step 2 of the rule)."""
    if d_model < 64:
        return d_model // 2
    for limit, hd in ((128, 16), (512, 32), (2048, 64)):
        if d_model < limit:
            return hd
    return 128


def _valid_widths():
    """All widths the rule allows, ascending: multiples of their own head_dim (even head_dim)."""
    d = 4
    while d < 1 << 16:
        hd = head_dim_for(d)
        if d % hd == 0 and hd % 2 == 0:
            yield d
        d += 4


_WIDTHS = list(_valid_widths())


def shape(base: ModelConfig, n_layers: int, d_model: int) -> ModelConfig:
    """``base`` at the given depth and width with the rule's heads."""
    hd = head_dim_for(d_model)
    n_heads = d_model // hd
    n_kv = None
    if base.n_kv_heads is not None:
        group = base.n_heads // base.resolved_n_kv_heads
        n_kv = n_heads // group if n_heads % group == 0 else None
    extra = {}
    if base.parametrization == "mup" and base.mup_base_head_dim is None:
        # heads and head dimension both grow with width here: μP's attention scale needs the
        # head dimension this rule gives the base width, not base width / this shape's heads
        extra["mup_base_head_dim"] = head_dim_for(base.mup_base_width)
    return dataclasses.replace(base, n_layers=n_layers, d_model=d_model, n_heads=n_heads, head_dim=None, n_kv_heads=n_kv,
                               d_ff=None, **extra)


def _valid(base: ModelConfig, d_model: int) -> bool:
    try:
        shape(base, 1, d_model)
    except ConfigError:
        return False
    return True


def _count(cfg: ModelConfig, which: str) -> int:
    return getattr(param_counts(cfg), which)


def model_for_params(n_non_embedding: float, base: ModelConfig, *, count: str = "non_embedding") -> ModelConfig:
    """A shape of ``base`` with about ``n_non_embedding`` parameters (see the module rule).

    ``count`` selects which count is matched: ``non_embedding`` (default) or
    ``active_non_embedding`` (for sparse families sized by their active parameters)."""
    if not (n_non_embedding > 0) or not math.isfinite(n_non_embedding):
        raise ConfigError(f"model_for_params: target parameter count must be a positive number, got {n_non_embedding!r}")
    if count not in ("non_embedding", "active_non_embedding"):
        raise ValueError(f"count must be non_embedding or active_non_embedding, got {count!r}")
    target = float(n_non_embedding)
    aspect = target_aspect_ratio(target)
    widths = [w for w in _WIDTHS if _valid(base, w)]  # e.g. MoE granularity must divide d_ff
    if not widths:
        raise ConfigError("model: no width fits this base model's constraints (check model.moe.granularity)")
    candidates: list[tuple[ModelConfig, int]] = []
    for n_layers in range(1, _MAX_LAYERS + 1):
        # parameters grow monotonically with width: bisect for the widths bracketing the target
        lo, hi = 0, len(widths) - 1
        if _count(shape(base, n_layers, widths[0]), count) > 2 * target and n_layers > 1:
            break  # even the narrowest width is too big at this depth, and deeper only grows
        while lo < hi:
            mid = (lo + hi) // 2
            if _count(shape(base, n_layers, widths[mid]), count) < target:
                lo = mid + 1
            else:
                hi = mid
        for j in {max(lo - 1, 0), lo}:
            cfg = shape(base, n_layers, widths[j])
            candidates.append((cfg, _count(cfg, count)))
        if widths[lo] / n_layers < aspect / 16:
            break  # deeper shapes only get thinner: a 16x aspect miss never wins the score

    def score(cn: tuple[ModelConfig, int]) -> float:
        cfg, n = cn
        return abs(math.log(n / target)) + _ASPECT_WEIGHT * abs(math.log(cfg.d_model / cfg.n_layers / aspect))

    return min(candidates, key=score)[0]
