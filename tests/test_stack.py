"""Stacked trials (``scaling.train.stack``): each lane trains as its solo run does, a diverging
lane is frozen alone, and trials that compile different steps are refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.config import ConfigError, TrainConfig
from scaling.models.transformer import Transformer
from scaling.train import optim, stack
from scaling.train import step as step_lib

CFG = TrainConfig().with_overrides({"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "data.seq_len": 32,
                                    "data.batch_size": 8, "optim.gns_every": 0, "optim.warmup_steps": 2})
STEPS = 12


def _trial(seed: int):
    graphdef, params, rest = step_lib.split_model(Transformer(CFG.model, rngs=nnx.Rngs(seed)))
    tx = optim.make_optimizer(CFG.optim, model_cfg=CFG.model)
    return graphdef, step_lib.init_state(params, rest, tx, total_steps=STEPS)


def _batches(seed: int):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 8, size=(STEPS, 8, 33), dtype=np.int32) * 3  # few symbols: the loss moves
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in toks]


def test_lanes_follow_their_solo_runs_and_a_diverging_lane_is_frozen_alone():
    # 2 seeds x 2 learning rates, and one absurd learning rate that must diverge on its own
    lanes = [(0, 1e-3), (1, 1e-3), (0, 3e-3), (1, 3e-3), (2, 1e4)]
    optims = [dataclasses.replace(CFG.optim, lr=lr) for _, lr in lanes]
    built = [_trial(seed) for seed, _ in lanes]
    graphdef = built[0][0]
    data = [_batches(seed) for seed, _ in lanes]

    solo = step_lib.make_traced_train_step(graphdef, CFG.optim, CFG.model, donate=False, gns_every=0)
    solo_losses = []
    for (_, state), o, batches in zip(built, optims, data):
        step, losses = solo.with_hparams(o, CFG.model), []
        for b in batches:
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        solo_losses.append(losses)

    stacked = stack.make_stacked_train_step(graphdef, CFG.optim, CFG.model, donate=False)
    hp = stack.stacked_hparams(optims, CFG.model)
    state = stack.stack_trees([s for _, s in built])
    active = np.ones(len(lanes), bool)
    best = np.full(len(lanes), np.inf)
    losses, frozen_at = [], {}
    for i in range(STEPS):
        batch = stack.stack_trees([d[i] for d in data])
        state, m = stacked(state, batch, hp, jnp.asarray(active))
        loss = np.asarray(m["loss"])
        losses.append(loss)
        for k in np.flatnonzero(active):  # the trainer's rule: not finite, or 3x the best so far after warmup
            if not np.isfinite(loss[k]) or (i + 1 > 2 and loss[k] > 3 * best[k]):
                active[k] = False
                frozen_at[k] = jax.tree.map(lambda x, k=k: np.asarray(x[k]), state)
            best[k] = min(best[k], loss[k]) if np.isfinite(loss[k]) else best[k]
    losses = np.array(losses).T

    assert list(frozen_at) == [4], frozen_at  # the absurd lane alone diverged
    for k in range(4):
        # vmapped matmuls sum in another order: equal to float rounding, not bitwise
        np.testing.assert_allclose(losses[k], solo_losses[k], rtol=2e-5, atol=0)
        assert losses[k][-1] < losses[k][0] - 0.3  # it learns, so the comparison means something
    assert int(state["step"][0]) == STEPS
    # the frozen lane kept its state bit for bit after it was frozen (its step counter too)
    assert int(state["step"][4]) == int(frozen_at[4]["step"]) < STEPS
    final = jax.tree.map(lambda x: np.asarray(x[4]), state)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(frozen_at[4])):
        np.testing.assert_array_equal(a, b)


def test_trials_that_compile_different_steps_are_not_stacked():
    a = CFG.optim
    b = dataclasses.replace(a, schedule="wsd" if a.schedule != "wsd" else "cosine")
    with pytest.raises(ConfigError, match=r"^optim.schedule: trial 1 has"):
        stack.stacked_hparams([a, b], CFG.model)
    hp = stack.stacked_hparams([a, dataclasses.replace(a, lr=a.lr * 2)], CFG.model)
    assert hp["lr"].shape == (2,) and float(hp["lr"][1]) == pytest.approx(2 * a.lr)
