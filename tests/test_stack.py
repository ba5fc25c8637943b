"""Stacked trials (``scaling.train.stack``): each lane trains as its solo run does, a diverging
lane is frozen alone, and trials that compile different steps are refused."""

import dataclasses
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# the sweep runner trains stacks: per-trial directories, exact resume, divergence alone
# ---------------------------------------------------------------------------------------------

SWEEP_SET = {"data.seq_len": 32, "data.batch_size": 16, "data.eval_tokens": 1024, "model.d_model": 32,
             "model.n_layers": 1, "model.n_heads": 2, "log_every": 4, "eval_every": 12, "checkpoint_every": 8}


def _sweep(tmp_path, grid_lr, seeds, steps=(24,)):
    import yaml

    from scaling import flops
    from scaling.config import ModelConfig

    per_step = flops.train_flops_per_token(ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2), 32) * 16 * 32
    raw = {"name": "stk", "experiment": "dense", "set": SWEEP_SET, "buckets": [n * per_step for n in steps],
           "grid": {"lr": grid_lr}, "seeds": seeds}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _run_sweep(spec, out, *extra, env=None):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "scaling.cli", "sweep", str(spec), "--out", str(out), "--quiet", *extra]
    env = {k: v for k, v in dict(os.environ, **(env or {})).items() if v is not None}  # None: unset
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def _rows(d):
    from scaling.files import read_jsonl
    from scaling.train.loop import WALL_FIELDS

    return [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in read_jsonl(d / "metrics.jsonl")]


@pytest.mark.slow
def test_a_stacked_sweep_matches_solo_runs_resumes_bitwise_after_sigkill_and_diverges_alone(tmp_path):
    import json

    from scaling.sweep import launch, store
    from scaling.train import loop

    # an absurd LR (first, so its lanes leave from the front), 2 LRs x 2 seeds, at 24 and 21 steps:
    # one stack of 12; the 21-step lanes end after the others' last checkpoint before the kill (16)
    spec = _sweep(tmp_path, [1e4, 1e-3, 3e-3], [0, 1], steps=(24, 21))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    r = _run_sweep(spec, killed, "--stack", "12", env={"SCALING_KILL_AT": "train_step:22"})
    assert r.returncode == 1 and "12 trials in 1 stack (12)" in r.stderr, r.stderr[-2000:]
    df = store.load(killed)
    assert sorted(df.loc[df["lr"] == 1e4, "state"]) == ["diverged"] * 4
    assert sorted(df.loc[df["lr"] != 1e4, "state"]) == ["done"] * 4 + ["failed"] * 4  # killed at step 22
    assert _run_sweep(spec, killed, "--stack", "12").returncode == 0
    logs = "".join(p.read_text() for p in killed.glob("*/log.txt"))
    assert logs.count("resuming from checkpoint step 16/24") == 4  # the live lanes, from their last save
    # the same stack, never interrupted, with wandb on (offline: one live run per lane in one process)
    r = _run_sweep(spec, whole, "--stack", "12", env={"WANDB_MODE": None})
    assert r.returncode == 0, r.stderr[-2000:]

    df = store.load(whole)
    assert sorted(df["state"]) == ["diverged"] * 4 + ["done"] * 8
    assert set(df.loc[df["state"] == "diverged", "lr"]) == {1e4}  # the absurd LR diverged alone
    for tid, lr, steps in zip(df["trial_id"], df["lr"], df["steps"]):
        summary = json.loads((whole / tid / "summary.json").read_text())
        assert summary["stacked"] == 12
        assert len(list((whole / tid / "wandb").glob("offline-run-*"))) == 1
        # SIGKILL mid-run and resume (finished lanes riding along as ghosts): every row bit for bit
        assert _rows(killed / tid) == _rows(whole / tid)
        again = json.loads((killed / tid / "summary.json").read_text())
        assert (again["final_eval_loss"], again["final_train_loss"]) == (summary["final_eval_loss"], summary["final_train_loss"])
        if lr == 1e4 or steps != 24:
            continue
        # the same trial trained alone: every row at the same steps with the same fields, and the
        # numbers equal to float rounding (vmapped matmuls sum in another order; measured ~2e-7)
        solo = loop.run(launch.trial_config(whole, json.loads((whole / tid / "trial.json").read_text())),
                        tmp_path / "solo" / tid)
        stacked_rows, solo_rows = _rows(whole / tid), _rows(tmp_path / "solo" / tid)
        assert [sorted(r) for r in stacked_rows] == [sorted(r) for r in solo_rows]
        assert [r["step"] for r in stacked_rows] == list(range(4, 25, 4))
        for a, b in zip(stacked_rows, solo_rows):
            for k in ("loss", "grad_norm", "lr", "eval_loss", "gns_g_big_sq"):
                if k in b:
                    assert a[k] == pytest.approx(b[k], rel=1e-5), (tid, a["step"], k)
        assert summary["final_eval_loss"] == pytest.approx(solo["final_eval_loss"], rel=1e-5)
        assert summary["final_eval_loss"] < 5.0  # it learned (the unigram entropy is ~5.3 nats)


def test_each_lane_keeps_its_own_moe_aux_weights():
    from scaling.config import MoEConfig, ModelConfig

    models = [ModelConfig(moe=MoEConfig(aux_loss_weight=w, z_loss_weight=z)) for w, z in ((1e-2, 1e-3), (3e-2, 0.0))]
    hp = stack.stacked_hparams([CFG.optim, dataclasses.replace(CFG.optim, lr=1e-2)], models)
    np.testing.assert_array_equal(hp["moe_aux_loss_weight"], np.float32([1e-2, 3e-2]))
    np.testing.assert_array_equal(hp["moe_z_loss_weight"], np.float32([1e-3, 0.0]))
    np.testing.assert_array_equal(hp["lr"], np.float32([CFG.optim.lr, 1e-2]))


def test_stack_groups_same_compiled_step_only_and_stack_0_is_a_usage_error(tmp_path):
    import experiments
    from scaling import stacking

    base = experiments.get("dense").with_overrides(["model.d_model=32", "model.n_layers=1", "model.n_heads=2"])
    same = [base.with_overrides([f"seed={s}", f"optim.lr={lr}", f"budget.flops={b}", "optim.warmup_steps=3",
                                 f"log_every={le}"])
            for s, lr, b, le in ((0, 1e-3, 1e10, 5), (1, 3e-3, 2e10, 10), (2, 1e-2, 1e10, 5))]
    other_shape = base.with_overrides(["model.d_model=48"])
    other_program = base.with_overrides(["optim.schedule=wsd"])
    no_clip = base.with_overrides(["optim.grad_clip=0"])
    seconds = base.with_overrides(["budget.seconds=5"])
    trials = [("a", same[0]), ("b", other_shape), ("c", same[1]), ("d", other_program), ("e", same[2]),
              ("f", no_clip), ("g", seconds), ("h", base)]
    assert stacking.groups(trials, 8) == [["a", "c", "e", "h"], ["b"], ["d"], ["f"], ["g"]]
    assert stacking.groups(trials, 2) == [["a", "c"], ["e", "h"], ["b"], ["d"], ["f"], ["g"]]
    assert stacking.groups(trials, 1) == [[t] for t, _ in trials]
    assert stacking.refusal(seconds).startswith("budget.seconds")

    spec = _sweep(tmp_path, [1e-3], [0])
    r = _run_sweep(spec, tmp_path / "out", "--stack", "0", "--plan")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "scaling sweep: error: --stack: must be at least 1 trial per stack (1 or off: one at a time), got 0")
    r = _run_sweep(spec, tmp_path / "out", "--stack", "many", "--plan")
    assert r.returncode == 2 and "--stack: expected auto, off or a number" in r.stderr
