"""Measurements a fit can trust: hyperparameters traced into the compiled step (no recompiles
across a grid), causal evaluation for every model kind, the held-out standard error and the
seed-to-seed spread, the measured-noise bootstrap, and ``scaling eval`` re-scoring old runs."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

import experiments
from scaling import fit, runs, schema
from scaling.cli import main
from scaling.config import MoDConfig, ModelConfig, MoEConfig, OptimConfig
from scaling.errors import UsageError
from scaling.files import write_json_atomic
from scaling.models.transformer import Transformer
from scaling.train import loop, optim
from scaling.train import step as step_lib

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "data.batch_size=16",
        "data.eval_tokens=1024", "log_every=5", "eval_every=20", "progress=false"]


# ---------------------------------------------------------------------------------------------
# traced hyperparameters
# ---------------------------------------------------------------------------------------------


def test_other_learning_rates_and_warmups_reuse_one_compilation():
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = step_lib.split_model(model)
    base = OptimConfig(lr=1e-3, warmup_steps=4)
    state = step_lib.init_state(params, rest, optim.make_optimizer(base), total_steps=50)
    tok = np.random.default_rng(0).integers(0, 256, (8, 17), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
    first = step_lib.make_traced_train_step(graphdef, base, donate=False)
    grid = [base, dataclasses.replace(base, lr=3e-3), dataclasses.replace(base, warmup_steps=10),
            dataclasses.replace(base, lr=2e-2, warmup_steps=None, warmup_fraction=0.3, weight_decay=0.3, b2=0.99,
                                z_loss=1e-3, grad_clip=0.5)]
    losses = []
    for ocfg in grid:
        _, m = first.with_hparams(ocfg)(state, batch)
        assert float(m["lr"]) == pytest.approx(float(optim.learning_rate(ocfg, 0, 50)), rel=1e-6)
        losses.append(float(m["loss_total"]))
    assert first._jitted._cache_size() == 1  # one program for every point of the grid
    # and it is the same update as the step with those numbers compiled in
    ocfg = grid[-1]
    static = step_lib.make_train_step(graphdef, optim.make_optimizer(ocfg), z_loss_weight=ocfg.z_loss,
                                      lr_fn=optim.make_lr_fn(ocfg), donate=False)
    s_static, m_static = static(state, batch)
    s_traced, m_traced = first.with_hparams(ocfg)(state, batch)
    assert float(m_static["loss_total"]) == pytest.approx(float(m_traced["loss_total"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(s_static["params"]), jax.tree.leaves(s_traced["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_moe_and_mod_aux_weights_are_traced_too():
    def model_cfg(w_lb, w_z, w_mod):
        return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                           moe=MoEConfig(n_experts=4, top_k=2, aux_loss_weight=w_lb, z_loss_weight=w_z),
                           mod=MoDConfig(capacity=0.5, every=2, aux_loss_weight=w_mod))

    a_cfg, b_cfg = model_cfg(1e-2, 1e-3, 1e-2), model_cfg(0.3, 0.05, 0.7)
    model = Transformer(a_cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = step_lib.split_model(model)
    ocfg = OptimConfig(lr=1e-3)
    state = step_lib.init_state(params, rest, optim.make_optimizer(ocfg), total_steps=20)
    tok = np.random.default_rng(0).integers(0, 64, (8, 17), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
    traced = step_lib.make_traced_train_step(graphdef, ocfg, a_cfg, donate=False)
    for mcfg in (a_cfg, b_cfg):
        # the reference: a model whose layers compile those weights in
        g_ref, p_ref, r_ref = step_lib.split_model(Transformer(mcfg, rngs=nnx.Rngs(0)))
        static = step_lib.make_train_step(g_ref, optim.make_optimizer(ocfg), z_loss_weight=ocfg.z_loss,
                                          lr_fn=optim.make_lr_fn(ocfg), donate=False)
        _, m_ref = static(state, batch)
        _, m = traced.with_hparams(ocfg, mcfg)(state, batch)
        assert float(m["loss_total"]) == pytest.approx(float(m_ref["loss_total"]), rel=1e-6)
    assert traced._jitted._cache_size() == 1


def test_a_traced_step_refuses_settings_it_compiled_in():
    model = Transformer(ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2), rngs=nnx.Rngs(0))
    graphdef, _, _ = step_lib.split_model(model)
    base = OptimConfig(schedule="cosine", grad_clip=1.0)
    traced = step_lib.make_traced_train_step(graphdef, base)
    traced.with_hparams(dataclasses.replace(base, lr=0.1, grad_clip=0.5))  # numbers: fine
    for other in (dataclasses.replace(base, schedule="wsd"), dataclasses.replace(base, grad_clip=0.0)):
        with pytest.raises(ValueError, match="build a new step"):
            traced.with_hparams(other)


def test_runs_of_older_schema_are_not_resumed_and_branches_group_by_seed(tmp_path):
    from scaling.config import ConfigError

    cfg = experiments.get("dense").with_overrides([*TINY, "budget.steps=4"])
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**cfg.to_dict(), "schema_version": 2}))
    with pytest.raises(ConfigError, match="written under schema version 2"):
        loop.run(cfg, d)
    trials = []
    for seed in range(3):  # WSD branches of three seeds' main runs, all branching at step 40
        tid = f"b{seed}"
        trials.append({"trial_id": tid, "seed": seed, "config": {"seed": seed, "init_from": f"main{seed}@40"}})
        write_json_atomic(tmp_path / "s" / tid / "summary.json", {"state": "done", "final_eval_loss": 2.0 + 0.01 * seed,
                                                                "schema_version": schema.SCHEMA_VERSION})
    write_json_atomic(tmp_path / "s" / "manifest.json", {"name": "s", "strategy": "wsd_branch", "trials": trials})
    df = runs.load(tmp_path / "s")
    assert list(df["n_seeds"]) == [3, 3, 3] and df["loss_seed_std"].iloc[0] == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------
# causality of the evaluated model
# ---------------------------------------------------------------------------------------------

CAUSAL_KINDS = {
    "dense": {},
    "moe_token_choice_capacity": {"moe": MoEConfig(n_experts=4, top_k=2, capacity_factor=0.5)},
    "moe_token_choice_top1": {"moe": MoEConfig(n_experts=4, top_k=1, capacity_factor=0.5)},
    "moe_dropless": {"moe": MoEConfig(n_experts=4, top_k=2, router="dropless", backend="einsum")},
    "moe_fine_grained_shared": {"moe": MoEConfig(n_experts=4, top_k=1, granularity=2, n_shared_experts=1,
                                                 capacity_factor=0.5)},
    "mod": {"mod": MoDConfig(capacity=0.25, every=1)},
    "mod_predictor": {"mod": MoDConfig(capacity=0.25, every=1, causal_aux="predictor")},
}


def _logits(model, tokens, **kw):
    return np.asarray(model(jnp.asarray(tokens), **kw)[0])


@pytest.mark.parametrize("kind", sorted(CAUSAL_KINDS))
def test_evaluation_never_looks_at_later_tokens(kind):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, init_std=0.5, **CAUSAL_KINDS[kind])
    assert cfg.causal_eval
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, (4, 32), dtype=np.int32)
    t = 11
    y = x.copy()
    y[:, t + 1:] = rng.integers(0, 64, (4, 32 - t - 1))
    routing = {"mod_routing": "causal"} if cfg.mod is not None else {}
    a, b = _logits(model, x, train=False, **routing), _logits(model, y, train=False, **routing)
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)
    if kind in ("moe_token_choice_capacity", "mod"):  # the training path does look ahead: the test can fail
        train_kw = {"mod_routing": "topk"} if cfg.mod is not None else {}
        a, b = _logits(model, x, train=True, **train_kw), _logits(model, y, train=True, **train_kw)
        assert np.abs(a[:, : t + 1] - b[:, : t + 1]).max() > 1e-4


def test_expert_choice_is_marked_non_causal_and_left_out_of_fits(tmp_path, capsys):
    assert not ModelConfig(moe=MoEConfig(router="expert_choice")).causal_eval
    assert not ModelConfig(mod=MoDConfig(causal_aux="none")).causal_eval
    trials = []
    for i, causal in enumerate([True, True, True, True, False]):
        tid = f"t{i}"
        trials.append({"trial_id": tid})
        write_json_atomic(tmp_path / tid / "summary.json", {"state": "done", "N": 1e3 * 2**i, "C": 1e10 * 3**i,
                                                           "final_eval_loss": 3.0 - 0.2 * i, "causal": causal,
                                                           "schema_version": schema.SCHEMA_VERSION})
    write_json_atomic(tmp_path / "manifest.json", {"name": "s", "strategy": "independent", "trials": trials})
    from scaling.fit import io

    df, notes = io.load_table(tmp_path)
    assert len(df) == 4 and any("not causal" in n for n in notes)
    assert len(io.load_table(io.Source(tmp_path, allow_noncausal=True))[0]) == 5


# ---------------------------------------------------------------------------------------------
# measured noise
# ---------------------------------------------------------------------------------------------


def test_chunk_standard_error_is_the_standard_error_of_the_mean():
    rng = np.random.default_rng(0)
    per_token = [rng.normal(2.0, 0.5, n) for n in (32 * 8,) * 9 + (7 * 8,)]

    def fake_step(params, rest, chunk):
        return chunk["sum"], chunk["n"]

    chunks = [{"sum": float(v.sum()), "n": float(v.size)} for v in per_token]
    mean, se = step_lib.evaluate_chunks(fake_step, None, None, chunks, put=lambda c: c)
    allv = np.concatenate(per_token)
    assert mean == pytest.approx(allv.mean(), rel=1e-12)
    w = np.array([v.size for v in per_token], float)
    m = np.array([v.mean() for v in per_token])
    want = math.sqrt(len(w) / (len(w) - 1) * np.sum(w**2 * (m - mean) ** 2)) / w.sum()
    assert se == pytest.approx(want, rel=1e-12)
    assert se == pytest.approx(0.5 / math.sqrt(allv.size), rel=0.6)  # i.i.d. tokens: sigma / sqrt(n)


def test_seed_spread_per_configuration_and_the_measured_noise_bootstrap(tmp_path):
    trials = []
    rng = np.random.default_rng(0)
    for size in range(6):
        for seed in range(3):
            tid = f"s{size}_{seed}"
            cfg = {"model": {"d_model": 8 * (size + 1)}, "seed": seed}
            trials.append({"trial_id": tid, "seed": seed, "config": cfg})
            n, d = 1e4 * 2**size, 1e7 / 2**size * 4
            loss = (1.7 + 400 / n**0.34 + 2000 / d**0.28) * math.exp(rng.normal(0, 0.01))
            write_json_atomic(tmp_path / tid / "summary.json",
                              {"state": "done", "N": n, "D": d, "C": 6 * n * d, "final_eval_loss": loss,
                               "final_eval_loss_se": 0.004, "schema_version": schema.SCHEMA_VERSION})
    write_json_atomic(tmp_path / "manifest.json", {"name": "s", "strategy": "independent", "trials": trials})
    df = runs.load(tmp_path)
    assert set(df["n_seeds"]) == {3}
    for _, g in df.groupby("seed_group"):
        assert g["loss_seed_std"].iloc[0] == pytest.approx(np.std(g["loss"], ddof=1), rel=1e-12)
    res = fit.powerlaw(df, x="N", bootstrap=50, seed_noise="measured") if hasattr(fit, "powerlaw") else None
    assert res is not None and res.n_boot == 50
    with pytest.raises(UsageError, match="measured"):
        fit.powerlaw(df.drop(columns=["loss_se", "loss_seed_std"]), x="N", bootstrap=10, seed_noise="measured")


# ---------------------------------------------------------------------------------------------
# scaling eval
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_scaling_eval_rescores_an_old_run_beside_its_figures(tmp_path, capsys):
    run = tmp_path / "run"
    summary = loop.run(experiments.get("dense").with_overrides([*TINY, "budget.steps=10"]), run)
    # make it look like a first-wave run: no schema version, a loss measured another way
    old = {k: v for k, v in summary.items() if k != "schema_version"}
    old["final_eval_loss"] = 9.99
    write_json_atomic(run / "summary.json", old)
    before = (run / "summary.json").read_text()
    assert main(["eval", str(run), "--tokens", "1024"]) == 0
    assert (run / "summary.json").read_text() == before  # the old figures stay as they were
    r = json.loads((run / "rescored.json").read_text())
    assert r["final_eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    assert r["eval_sha256"] == summary["eval_sha256"] and r["schema_version"] == schema.SCHEMA_VERSION
    df = runs.load(run)
    assert df.loc[0, "loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6) and bool(df.loc[0, "rescored"])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert main(["eval", str(run), "--tokens", str(10**9)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no config.json" in err[0] and err[1].startswith("scaling eval: error: data.eval_tokens:")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((run / "config.json").read_text())
    assert main(["eval", str(tmp_path / "empty")]) == 2
    assert "has no checkpoint yet" in capsys.readouterr().err
