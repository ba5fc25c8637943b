"""Stacked trials: same-shape trials trained as one program.

Trials that share a model shape, sequence layout and the settings compiled into a step (schedule
kind, clipping on/off, ``scaling.train.step._static_settings``) but differ in learning rate,
warmup, weight decay, seed or budget train together: ``jax.vmap`` of the trainer's traced step
over a leading trial axis ``K`` of the train state (parameters, optimizer state, step counter,
planned steps), the batches and the hyperparameters. ``active_K`` freezes trials: a diverged
or finished trial keeps its state exactly while the others go on.

Not bitwise: under ``vmap`` each trial's matmuls become one batched ``dot_general`` whose
float summation order XLA picks for the batched shape, so a stacked trial's numbers differ from
its solo run in the last bits, and training amplifies that slowly (measured with
``scaling bench stack``). A trial's lane never reads another's values, so a NaN in one lane
stays there.

This module is the stacking primitive; ``scaling.train.stacked_run`` trains a group of trials
with it, each into its own run directory.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from scaling.errors import ConfigError


def stack_trees(trees: Sequence[Any]) -> Any:
    """``K`` pytrees of one structure -> one pytree whose leaves carry a leading ``K`` axis."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def unstack_tree(tree: Any, k: int) -> list[Any]:
    """The inverse of ``stack_trees``: lane ``i`` of every leaf, for ``i < k``."""
    return [jax.tree.map(lambda x: x[i], tree) for i in range(k)]


def stacked_hparams(optim_cfgs: Sequence, model_cfg=None) -> dict:
    """The traced hyperparameters of ``K`` optimizer configs as ``[K]`` float32 arrays; every
    setting compiled into the step must agree (else ``ConfigError`` naming it). ``model_cfg``:
    one model config for all lanes, or a sequence of ``K`` (each lane's MoE/MoD aux-loss
    weights are its own traced values)."""
    from scaling.train import optim
    from scaling.train.step import _static_settings

    models = list(model_cfg) if isinstance(model_cfg, (list, tuple)) else [model_cfg] * len(optim_cfgs)
    first = _static_settings(optim_cfgs[0], models[0])
    names = ("optim.schedule", "optim.wsd_cooldown", "optim.grad_clip (on/off)", "aux weights traced")
    for i, (cfg, model) in enumerate(zip(optim_cfgs[1:], models[1:]), start=1):
        here = _static_settings(cfg, model)
        for name, a, b in zip(names, first, here):
            if a != b:
                raise ConfigError(f"{name}: trial {i} has {b!r} and trial 0 {a!r}, which compile different steps; "
                                  "stack only trials that agree")
    return stack_trees([optim.hparams(cfg, model) for cfg, model in zip(optim_cfgs, models)])


def make_stacked_train_step(graphdef, optim_cfg, model_cfg=None, *, accum: int = 1, shards: int = 1,
                            gns_every: int = 0, donate: bool = True) -> Callable:
    """``step(state_K, batch_K, hp_K, active_K, gns=False) -> (state_K, metrics_K)``, jitted: the
    trainer's traced step (``scaling.train.step.traced_step_fn``; ``optim_cfg`` gives the
    compiled settings, ``hp_K`` from ``stacked_hparams`` the values) run per trial lane. Lanes
    with ``active_K[i]`` False keep their state bit for bit (their metrics are computed and
    meaningless). Batches are ``{"inputs", "targets"}`` of int32 ``[K, B, L]``. ``gns`` (one
    bool for all lanes; with ``gns_every`` > 0) says whether this step takes the noise-scale
    statistics: decided outside ``vmap``, the two-halves branch stays a branch instead of both
    sides computed on every step."""
    from scaling.train.step import traced_step_fn

    step = traced_step_fn(graphdef, optim_cfg, model_cfg, accum=accum, shards=shards, gns_every=gns_every)

    def lane(state, batch, hp, active, gns):
        new, metrics = step(state, batch, hp, gns)
        return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state), metrics

    jitted = jax.jit(jax.vmap(lane, in_axes=(0, 0, 0, 0, None)), donate_argnums=(0,) if donate else ())

    def stacked(state, batch, hp, active, gns=False):
        return jitted(state, batch, hp, active, jnp.asarray(gns, bool))

    return stacked
