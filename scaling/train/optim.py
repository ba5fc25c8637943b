"""Optimiser: optax AdamW with a learning-rate schedule that ends exactly at the run's last step.

Schedules (step ``s`` is the index of the update, ``0 .. total_steps - 1``; ``W`` warmup steps):

- warmup: ``lr(s) = peak * (s + 1) / W`` for ``s < W`` (the first update is not wasted at lr 0);
- ``constant``: ``peak`` after warmup;
- ``cosine``: from ``peak`` at ``s = W`` to ``final_lr_fraction * peak`` at ``s = total - 1``;
- ``linear``: the same end points, straight line;
- ``wsd`` (warmup-stable-decay, Hägele et al. 2024): ``peak`` until the last
  ``wsd_decay_fraction`` of the steps, then a linear (or ``1-sqrt``) cooldown that reaches
  ``final_lr_fraction * peak`` at ``s = total - 1``. With a fixed ``warmup_steps`` the LR before
  the cooldown does not depend on the run length, so a short run can branch off a long one.

``warmup_steps`` overrides ``warmup_fraction``. Weight decay (decoupled, multiplied by the LR as
in optax/PyTorch AdamW) applies only to matrices: parameters with ``ndim >= 2`` that are not
embedding tables. Norm scales and biases (1-D) and token embeddings are not decayed, the usual
practice (GPT-2/Chinchilla-style) since decaying them shrinks features without regularising
capacity. Gradients are clipped by global norm before Adam when ``grad_clip > 0``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from scaling.config import OptimConfig

# Path keys that mark an embedding table (excluded from weight decay). A tied output head is the
# embedding itself; an untied head ("lm_head", "unembed", ...) is an ordinary matrix and decays.
EMBEDDING_KEYS = ("embed", "embedding", "tok_embed", "token_embed", "token_embedding", "wte", "wpe")


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Number of warmup updates; never more than ``total_steps - 1`` so the run reaches its decay."""
    w = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_fraction * total_steps))
    return max(0, min(int(w), total_steps - 1))


def wsd_decay_start(cfg: OptimConfig, total_steps: int) -> int:
    """First step of the WSD cooldown (at least one cooldown step, never inside warmup)."""
    n_decay = max(1, int(round(cfg.wsd_decay_fraction * total_steps)))
    return max(warmup_steps(cfg, total_steps), total_steps - n_decay)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate (float) as a function of the update index; jittable."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    peak = float(cfg.lr)
    final = peak * float(cfg.final_lr_fraction)
    w = warmup_steps(cfg, total_steps)
    last = total_steps - 1
    cooldown = getattr(cfg, "wsd_cooldown", "linear")
    decay_start = wsd_decay_start(cfg, total_steps)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = peak * (s + 1.0) / max(w, 1)
        if cfg.schedule == "constant":
            after = jnp.full_like(s, peak)
        elif cfg.schedule in ("cosine", "linear"):
            span = max(last - w, 1)
            p = jnp.clip((s - w) / span, 0.0, 1.0)
            if cfg.schedule == "cosine":
                after = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * p))
            else:
                after = peak + (final - peak) * p
        elif cfg.schedule == "wsd":
            n_decay = max(last - decay_start + 1, 1)
            # p reaches 1 exactly at the last step; the first cooldown step is already below peak
            p = jnp.clip((s - decay_start + 1.0) / n_decay, 0.0, 1.0)
            shape = jnp.sqrt(p) if cooldown == "1-sqrt" else p
            after = jnp.where(s < decay_start, peak, peak + (final - peak) * shape)
        else:  # validated by OptimConfig; kept for safety
            raise ValueError(f"unknown schedule {cfg.schedule!r}")
        return jnp.where(s < w, warm, after)

    return schedule


def decay_mask(params):
    """Pytree of bools: True for parameters that get weight decay (matrices, not embeddings)."""

    def is_decayed(path, leaf) -> bool:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))).lower() for k in path]
        if any(k in EMBEDDING_KEYS for k in keys):
            return False
        return getattr(leaf, "ndim", 0) >= 2

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (+ global-norm clipping) driven by ``make_schedule(cfg, total_steps)``."""
    adamw = optax.adamw(
        learning_rate=make_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
