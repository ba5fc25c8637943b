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

from scaling.config import TRACED_OPTIM_FIELDS, OptimConfig
from scaling.models import mup

# Path keys that mark an embedding table (excluded from weight decay). A tied output head is the
# embedding itself; an untied head ("lm_head", "unembed", ...) is an ordinary matrix and decays.
EMBEDDING_KEYS = ("embed", "embedding", "tok_embed", "token_embed", "token_embedding", "wte", "wpe")


def _round(x):
    return jnp.floor(x + 0.5)  # half away from zero for x >= 0, same in Python and traced code


# Hyperparameters that enter the compiled train step as values (``hparams``), so one compilation
# serves a whole grid of them at one shape (and trials differing in them stack). The schedule kind,
# the WSD cooldown shape and whether gradients are clipped at all stay static: they change the
# program, not a number in it.
HPARAMS = TRACED_OPTIM_FIELDS


AUX_HPARAMS = ("moe_aux_loss_weight", "moe_z_loss_weight", "mod_aux_loss_weight")


def hparams(cfg: OptimConfig, model_cfg=None) -> dict:
    """The traced hyperparameters of ``cfg`` as float32 scalars (``warmup_steps`` -1 = unset:
    ``warmup_fraction`` of the run applies); given ``model_cfg``, also ``AUX_HPARAMS``, the
    weights of the MoE load-balance and router z-losses and of the MoD causal BCE (0 when the
    model has no such layer, or ``causal_aux="none"``)."""
    import numpy as np

    values = {name: getattr(cfg, name) for name in HPARAMS}
    values["warmup_steps"] = -1.0 if cfg.warmup_steps is None else cfg.warmup_steps
    if model_cfg is not None:
        moe, mod = model_cfg.moe, model_cfg.mod
        values["moe_aux_loss_weight"] = moe.aux_loss_weight if moe is not None else 0.0
        values["moe_z_loss_weight"] = moe.z_loss_weight if moe is not None else 0.0
        values["mod_aux_loss_weight"] = mod.aux_loss_weight if mod is not None and mod.causal_aux != "none" else 0.0
    return {k: np.float32(v) for k, v in values.items()}


def _h(cfg: OptimConfig, hp, name: str):
    return hp[name] if hp is not None else getattr(cfg, name)


def _warmup(cfg: OptimConfig, total, hp=None):
    if hp is None:
        w = jnp.float32(cfg.warmup_steps) if cfg.warmup_steps is not None else _round(cfg.warmup_fraction * total)
    else:
        w = jnp.where(hp["warmup_steps"] >= 0, hp["warmup_steps"], _round(hp["warmup_fraction"] * total))
    return jnp.clip(w, 0.0, jnp.maximum(total - 1.0, 0.0))


def _decay_start(cfg: OptimConfig, total, hp=None):
    n_decay = jnp.maximum(1.0, _round(_h(cfg, hp, "wsd_decay_fraction") * total))
    return jnp.maximum(_warmup(cfg, total, hp), total - n_decay)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Number of warmup updates; never more than ``total_steps - 1`` so the run reaches its decay."""
    return int(_warmup(cfg, jnp.float32(total_steps)))


def wsd_decay_start(cfg: OptimConfig, total_steps: int) -> int:
    """First step of the WSD cooldown (at least one cooldown step, never inside warmup)."""
    return int(_decay_start(cfg, jnp.float32(total_steps)))


def learning_rate(cfg: OptimConfig, step, total_steps, hp=None):
    """LR of update ``step`` (0-based) in a run of ``total_steps`` updates. Both may be traced
    arrays, so one compiled train step serves every budget (the total is part of the train
    state, not a compile-time constant: sweeps and resumes reuse the compilation cache). With
    ``hp`` (``hparams(cfg)``, possibly traced) the peak, warmup, decay fractions come from it."""
    s = jnp.asarray(step, jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    peak = jnp.asarray(_h(cfg, hp, "lr"), jnp.float32)
    final = peak * jnp.asarray(_h(cfg, hp, "final_lr_fraction"), jnp.float32)
    w = _warmup(cfg, total, hp)
    last = total - 1.0
    warm = peak * (s + 1.0) / jnp.maximum(w, 1.0)
    if cfg.schedule == "constant":
        after = jnp.full_like(s, peak)
    elif cfg.schedule in ("cosine", "linear"):
        p = jnp.clip((s - w) / jnp.maximum(last - w, 1.0), 0.0, 1.0)
        if cfg.schedule == "cosine":
            after = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * p))
        else:
            after = peak + (final - peak) * p
    elif cfg.schedule == "wsd":
        start = _decay_start(cfg, total, hp)
        n_decay = jnp.maximum(last - start + 1.0, 1.0)
        # p reaches 1 exactly at the last step; the first cooldown step is already below peak
        p = jnp.clip((s - start + 1.0) / n_decay, 0.0, 1.0)
        shape = jnp.sqrt(p) if getattr(cfg, "wsd_cooldown", "linear") == "1-sqrt" else p
        after = jnp.where(s < start, peak, peak + (final - peak) * shape)
    else:  # validated by OptimConfig
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    return jnp.where(s < w, warm, after)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """``learning_rate`` with the total fixed: a plain optax schedule of the update index."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return lambda step: learning_rate(cfg, step, total_steps)


def decay_mask(params):
    """Pytree of bools: True for parameters that get weight decay (matrices, not embeddings)."""

    def is_decayed(path, leaf) -> bool:
        keys = [k.lower() for k in mup.path_keys(path)]
        if any(k in EMBEDDING_KEYS for k in keys):
            return False
        return mup.tensor_ndim(path, leaf) >= 2

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def scale_by_parametrization(model_cfg) -> optax.GradientTransformation:
    """Multiply each tensor's Adam update by its μP learning-rate multiplier
    (``scaling.models.mup``: ``1/m`` for hidden matrices). Placed before the decoupled weight
    decay, so the decay per step stays ``lr * weight_decay`` at every width: what the ``mup``
    package's ``MuAdamW`` does (it divides the LR by ``m`` and multiplies the weight decay by
    ``m``). Stateless."""
    def scale(updates, params=None):
        def one(path, u):
            f = mup.lr_multiplier(model_cfg, mup.path_name(path), mup.tensor_ndim(path, u))
            return u if f == 1.0 else (u * f).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(one, updates)

    return optax.stateless(scale)


def make_optimizer(cfg: OptimConfig, hp=None, model_cfg=None) -> optax.GradientTransformation:
    """AdamW without its learning rate: global-norm clipping, Adam scaling, decoupled weight
    decay. The train step multiplies the result by ``-learning_rate(cfg, step, total_steps)``,
    which is exactly ``optax.adamw`` (that is the same chain followed by ``scale(-lr)``). With
    ``hp`` (traced values, inside the compiled step) the clip norm, betas, eps and weight decay
    come from it; the state's structure is the same either way. Traced, optax's ``1 - b`` is
    computed in float32 rather than rounded from float64 (a relative 1e-5 for ``b2 = 0.999``), so
    traced and compiled-in runs agree to that precision, not bit for bit; every run of this
    version uses the traced step, so its resumes stay exact. Given a μP ``model_cfg``
    (``model.parametrization = mup``) the per-tensor LR multipliers scale the Adam update before
    the decay (``scale_by_parametrization``); an SP model's chain, and so its state, is unchanged."""
    parts = [optax.clip_by_global_norm(_h(cfg, hp, "grad_clip"))] if cfg.grad_clip > 0 else []
    parts.append(optax.scale_by_adam(b1=_h(cfg, hp, "b1"), b2=_h(cfg, hp, "b2"), eps=_h(cfg, hp, "eps")))
    if model_cfg is not None and model_cfg.parametrization == "mup":
        parts.append(scale_by_parametrization(model_cfg))
    parts.append(optax.add_decayed_weights(_h(cfg, hp, "weight_decay"), mask=decay_mask))
    return optax.chain(*parts)


def make_lr_fn(cfg: OptimConfig):
    """``lr_fn(step, total_steps) -> lr`` for ``step.make_train_step``."""
    return lambda step, total: learning_rate(cfg, step, total)
