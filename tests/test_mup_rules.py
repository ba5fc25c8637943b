"""μP (scaling.models.mup) and per-trial hyperparameter rules (scaling.rules, sweep specs, the
fit's best-per-(N, C) selection)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import yaml
from flax import nnx

from scaling import cli
from scaling.config import ConfigError, ModelConfig, OptimConfig, TrainConfig, config_hash
from scaling.fit import select
from scaling.models import mup
from scaling.models.transformer import Transformer
from scaling.sweep import spec
from scaling.train import coord_check, optim, step

TINY = {"data.source": "synthetic", "data.seq_len": 16, "data.batch_size": 8, "data.synthetic_vocab": 64,
        "model.vocab_size": 64, "eval_every": 1000, "data.eval_tokens": 512, "checkpoint_every": 1000}


def _losses(cfg: ModelConfig, n_steps: int = 3) -> list[float]:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    g, p, r = step.split_model(model)
    ocfg = OptimConfig(lr=1e-2)
    state = step.init_state(p, r, optim.make_optimizer(ocfg, model_cfg=cfg), total_steps=10)
    train = step.make_traced_train_step(g, ocfg, cfg)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16)), jnp.int32)
    out = []
    for _ in range(n_steps):
        state, m = train(state, {"inputs": toks, "targets": toks})
        out.append(float(m["loss"]))
    return out


def test_mup_at_its_base_width_is_sp_exactly():
    sp = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2)
    mu = dataclasses.replace(sp, parametrization="mup", mup_base_width=32)
    assert _losses(mu) == _losses(sp)  # bitwise: every multiplier is 1 and the attention scale 1/sqrt(E)


def test_mup_rules_per_tensor_match_the_paper_table():
    base = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2)
    cfg = dataclasses.replace(base, d_model=128, parametrization="mup", mup_base_width=32)  # m = 4
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    _, params, _ = step.split_model(model)
    d = mup.describe(cfg, params)
    assert d["width_multiplier"] == 4.0 and d["readout_multiplier"] == 0.25
    E, E0 = 64, 16  # head dim at width 128 and at the base width 32 (2 heads)
    assert d["attention_scale"] == pytest.approx(math.sqrt(E0) / E)
    t = d["tensors"]
    assert t["embed/embedding"] == {"role": "input", "init_std": 0.02, "lr_multiplier": 1.0}
    assert t["blocks/0/attn/wq"] == {"role": "hidden", "init_std": pytest.approx(0.01), "lr_multiplier": 0.25}
    assert t["blocks/1/mlp/w_out"]["init_std"] == pytest.approx(0.02 / math.sqrt(4) / 2)  # / sqrt(m) / sqrt(2 L)
    assert t["blocks/0/attn_norm/scale"]["role"] == "vector" and t["blocks/0/attn_norm/scale"]["lr_multiplier"] == 1.0
    # the drawn weights have the std the table says
    wq = np.asarray(model.blocks[0].attn.wq[...])
    assert np.std(wq) == pytest.approx(0.01, rel=0.05)
    # the optimizer applies the multipliers: hidden updates are 1/m of SP's at the same lr
    g, p, r = step.split_model(model)
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.0, grad_clip=0.0)
    grads = jax.tree.map(jnp.ones_like, p)
    upd_mu, _ = optim.make_optimizer(ocfg, model_cfg=cfg).update(grads, optim.make_optimizer(ocfg, model_cfg=cfg).init(p), p)
    upd_sp, _ = optim.make_optimizer(ocfg).update(grads, optim.make_optimizer(ocfg).init(p), p)
    assert float(upd_mu["blocks"][0]["attn"]["wq"][...].ravel()[0]) == pytest.approx(0.25 * float(upd_sp["blocks"][0]["attn"]["wq"][...].ravel()[0]))
    assert float(upd_mu["embed"]["embedding"][...].ravel()[0]) == float(upd_sp["embed"]["embedding"][...].ravel()[0])


def test_forward_pass_applies_the_readout_multiplier_and_the_attention_scale():
    """μP's forward = SP's on the same weights, with the logits x 1/m and q.k x (sqrt(E0)/E)/(1/sqrt(E))."""
    mu = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, parametrization="mup", mup_base_width=16)
    sp = dataclasses.replace(mu, parametrization="sp", mup_base_width=None)
    m_mu = Transformer(mu, rngs=nnx.Rngs(0))
    g_sp, _, r_sp = step.split_model(Transformer(sp, rngs=nnx.Rngs(1)))
    _, p_mu, _ = step.split_model(m_mu)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    E, E0 = 32, 8  # head dim 64/2; base 16/2
    ratio = (math.sqrt(E0) / E) / (1 / math.sqrt(E))
    p_sp = jax.tree.map(lambda x: x, p_mu)
    wq = p_sp["blocks"][0]["attn"]["wq"]
    wq.set_value(wq[...] * ratio)  # the SP model's q carries the μP attention scale
    logits_mu, _ = m_mu(toks)
    logits_sp, _ = nnx.merge(g_sp, p_sp, r_sp)(toks)
    np.testing.assert_allclose(np.asarray(logits_mu), np.asarray(logits_sp) / 4.0, rtol=2e-5, atol=1e-6)


def test_mup_keeps_the_weight_decay_per_step_of_the_base():
    """As mup's MuAdamW: the hidden Adam update is 1/m of SP's, the decay lr*wd*p is not."""
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, parametrization="mup", mup_base_width=16)
    _, p, _ = step.split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.0)
    grads = jax.tree.map(jnp.zeros_like, p)  # zero gradients: the update is the decay alone
    tx_mu, tx_sp = optim.make_optimizer(ocfg, model_cfg=cfg), optim.make_optimizer(ocfg)
    u_mu, _ = tx_mu.update(grads, tx_mu.init(p), p)
    u_sp, _ = tx_sp.update(grads, tx_sp.init(p), p)
    w_mu, w_sp = (np.asarray(u["blocks"][0]["mlp"]["w_in"][...]) for u in (u_mu, u_sp))
    np.testing.assert_allclose(w_mu, w_sp, rtol=1e-6)
    assert np.abs(w_sp).max() > 0  # the decay is there


def test_size_rule_sweeps_give_mup_the_rules_base_head_dim(tmp_path):
    from scaling.models.family import head_dim_for

    for kw in ({"rules": {"lr": {"mup": {"lr": 1e-2, "base_width": 64}}}},
               {"set": {**TINY, "model.parametrization": "mup", "model.mup_base_width": 64}}):
        ts = spec.trials(spec.load(_spec(tmp_path, sizes=[3e5, 3e6], buckets=[1e13], **kw)))
        for t in ts:
            m = t.config.model
            assert m.mup_base_head_dim == head_dim_for(64) == 16, m
            assert mup.attention_scale(m) == pytest.approx(4.0 / m.resolved_head_dim)
        assert {t.config.model.n_heads for t in ts} != {4}  # the heads do grow with width here


def test_new_fields_do_not_rename_existing_trials():
    # the first-wave hash of a default config (trial ids of every existing sweep depend on it)
    assert config_hash(TrainConfig()) == "594a8914aec7"
    assert config_hash(TrainConfig().with_overrides({"model.parametrization": "mup", "model.mup_base_width": 128})) != "594a8914aec7"


@pytest.mark.slow
def test_coordinate_check_flat_under_mup_and_growing_under_sp():
    widths = [32, 128, 512]
    mu = coord_check.coord_check(widths, parametrization="mup", lr=1e-2, steps=5, n_layers=1)
    sp = coord_check.coord_check(widths, parametrization="sp", lr=1e-2, steps=5, n_layers=1)
    assert set(mu["layers"]) == {"embed", "l0/attn", "l0/mlp", "logits"}
    spread = coord_check.spread(mu)
    assert max(spread.values()) < 2.0, spread  # the issue's criterion, every layer
    last = {k: [v[-1] for v in per_w] for k, per_w in sp["layers"].items()}
    for k in ("l0/attn", "l0/mlp"):  # SP: each wider model's hidden layers move more
        assert last[k][0] < last[k][1] < last[k][2], (k, last[k])
    assert last["logits"][2] > 2 * last["logits"][0]  # the readout too (not monotone: 1.1, 3.3, 2.8 measured)
    assert coord_check.spread(sp)["l0/mlp"] > 10.0  # the same criterion fails under SP


# ---------------------------------------------------------------------------------------------
# rules in sweep specs
# ---------------------------------------------------------------------------------------------


def _spec(tmp_path, **kw):
    raw = {"name": "r", "experiment": "dense", "set": dict(TINY), "buckets": [2e9, 8e9], "sizes": [2e3, 8e3]}
    raw.update(kw)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_power_law_rules_set_lr_batch_and_warmup_per_trial(tmp_path):
    from scaling import flops

    rules = {"lr": {"power_law": {"coef": 0.3118, "C": -0.125}},
             "batch": {"power_law": {"coef": 0.292, "C": 0.3271}, "unit": "tokens"},
             "warmup": {"fraction": 0.1}}
    raw = yaml.safe_load(_spec(tmp_path, rules=rules).read_text())
    raw["set"].pop("data.batch_size")
    ts = spec.trials(spec.parse(raw))
    assert len(ts) == 4
    for t in ts:
        C = t.budget
        assert t.config.optim.lr == pytest.approx(0.3118 * C ** -0.125, rel=1e-12)
        assert t.config.data.batch_size == max(2, 2 * round(0.292 * C ** 0.3271 / 16 / 2))
        assert t.config.optim.warmup_fraction == 0.1 and t.config.optim.warmup_steps is None
        assert t.steps == flops.steps_for_budget(t.config)
        d = t.describe()
        assert "lr: power_law 0.3118 * C^-0.125" in d["rules"] and "batch: power_law" in d["rules"]
    assert len({t.config.data.batch_size for t in ts}) == 2  # the two budgets get different batches


def test_per_size_grid_multiplies_a_rule_and_mup_rule_sets_the_parametrization(tmp_path):
    rules = {"lr": {"grid": {"factors": [0.5, 1, 2], "of": {"power_law": {"coef": 3e-3, "N": -0.5}, "at": {"N": 1e4}}}},
             "warmup": {"steps": 3}}
    ts = spec.trials(spec.load(_spec(tmp_path, rules=rules, buckets=[2e9])))
    assert len(ts) == 2 * 3
    for t in ts:
        n = t.config.model  # the rule's N is the model's non-embedding count
        from scaling import flops

        N = flops.param_counts(n).non_embedding
        f = dict(t.tags)["lr_factor"]
        assert t.config.optim.lr == pytest.approx(3e-3 * (N / 1e4) ** -0.5 * f)
        assert t.config.optim.warmup_steps == 3
    mu = spec.trials(spec.load(_spec(tmp_path, rules={"lr": {"mup": {"lr": 2e-2, "base_width": 16}}},
                                     sizes={"shapes": [{"d_model": 16, "n_heads": 2}, {"d_model": 64, "n_heads": 2}]})))
    assert {(t.config.model.parametrization, t.config.model.mup_base_width, t.config.optim.lr) for t in mu} == {("mup", 16, 2e-2)}


def _base_sweep(tmp_path, losses: dict, width: int = 16):
    """A finished base-width LR sweep as the store writes it (manifest + summaries)."""
    import json

    d = tmp_path / "base"
    trials = []
    for i, (lr, loss) in enumerate(losses.items()):
        tid = f"t{i}"
        trials.append({"trial_id": tid, "d_model": width, "n_layers": 1, "lr": lr, "seed": 0})
        (d / tid).mkdir(parents=True)
        (d / tid / "summary.json").write_text(json.dumps({"state": "done", "final_eval_loss": loss, "schema_version": 3}))
    (d / "manifest.json").write_text(json.dumps({"name": "base", "trials": trials}))
    return d


def test_mup_rule_takes_the_tuned_lr_of_an_earlier_base_sweep(tmp_path):
    base = _base_sweep(tmp_path, {1e-3: 2.5, 4e-3: 2.1, 1.6e-2: 2.3})
    rules = {"lr": {"mup": {"from": str(base), "base_width": 16}}}
    ts = spec.trials(spec.load(_spec(tmp_path, rules=rules, sizes={"shapes": [{"d_model": 16, "n_heads": 2},
                                                                                {"d_model": 64, "n_heads": 2}]})))
    assert {t.config.optim.lr for t in ts} == {4e-3}
    assert "best of 3 lrs at width 16" in ts[0].describe()["rules"]
    edge = _base_sweep(tmp_path / "e", {1e-3: 2.5, 4e-3: 2.4, 1.6e-2: 2.3})
    ts = spec.trials(spec.load(_spec(tmp_path, rules={"lr": {"mup": {"from": str(edge), "base_width": 16}}})))
    assert "the edge of its grid" in ts[0].describe()["rules"]
    with pytest.raises(ConfigError, match="no finished run of width 32"):
        spec.load(_spec(tmp_path, rules={"lr": {"mup": {"from": str(base), "base_width": 32}}}))
    # runs of two depths are not one tuned base
    import json

    m = json.loads((base / "manifest.json").read_text())
    m["trials"][0]["n_layers"] = 2
    (base / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="differ in n_layers"):
        spec.load(_spec(tmp_path, rules={"lr": {"mup": {"from": str(base), "base_width": 16}}}))


def test_plan_and_status_name_the_rule_of_every_trial(tmp_path, capsys):
    """(Training the shipped rule specs, lr_grid and lr_power_law, is tests/test_shipped_specs.py.)"""
    from scaling.sweep import store

    rules = {"lr": {"grid": {"factors": [0.5, 2], "of": {"power_law": {"coef": 1e-2, "N": -0.3}, "at": {"N": 4e3}}}},
             "warmup": {"steps": 2}}
    p = _spec(tmp_path, rules=rules, buckets=[3e9], sizes=[2e3])
    assert cli.main(["sweep", str(p), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "rule lr: grid of power_law 0.01 * (N/4000)^-0.3" in plan and "lr_factor=0.5" in plan
    sp = spec.load(p)
    out = tmp_path / "runs"
    store.write_manifest(out, sp, spec.trials(sp))
    assert cli.main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("warmup=steps lr=grid") == 2 and "rule lr: grid of power_law 0.01 * (N/4000)^-0.3" in text
    lrs = sorted(t.config.optim.lr for t in spec.trials(sp))
    assert lrs[1] == pytest.approx(4 * lrs[0])


# ---------------------------------------------------------------------------------------------
# the fit's best run per (N, C)
# ---------------------------------------------------------------------------------------------


def _grid_table(seed=0):
    """Losses of a known law at the tuned lr, worse off it: L = 1.5 + 40 N^-0.3 + 0.2 log2(lr/lr*)^2."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in (1e12, 1e13):
        for N in (1e4, 3e4, 1e5, 3e5):
            lr_star = 1e-2 * (N / 1e4) ** -0.4
            for f in (0.25, 0.5, 1.0, 2.0, 4.0):
                loss = 1.5 + 40 * N ** -0.3 + 0.2 * math.log2(f) ** 2
                rows.append(dict(N=N, C=C * (1 + 1e-4 * rng.standard_normal()), D=C / (6 * N), bucket=C, lr=lr_star * f,
                                 loss=loss, state="done"))
    return pd.DataFrame(rows)


def test_best_per_keeps_the_tuned_run_of_each_size_and_budget():
    df = _grid_table()
    kept, note = select.best_per(df, "N,C")
    assert len(kept) == 8 and (kept["n_candidates"] == 5).all()
    assert np.allclose(kept["lr"], 1e-2 * (kept["N"] / 1e4) ** -0.4)  # the optimum of every (N, C)
    assert np.allclose(kept["loss"], 1.5 + 40 * kept["N"] ** -0.3)
    # without a bucket column C is grouped by its value (0.1 dex): same selection
    kept2, _ = select.best_per(df.drop(columns="bucket"), ("N", "C"))
    assert sorted(kept2["lr"]) == sorted(kept["lr"])


def test_best_per_averages_seeds_rather_than_picking_the_luckiest():
    rows = [dict(N=1e4, C=1e12, loss=v, seed_group="A", seed=i) for i, v in enumerate((1.00, 1.40))]
    rows += [dict(N=1e4, C=1e12, loss=v, seed_group="B", seed=i) for i, v in enumerate((1.10, 1.10))]
    kept, _ = select.best_per(pd.DataFrame(rows), ("N", "C"))
    assert list(kept["seed_group"]) == ["B", "B"]  # mean 1.10 beats A's mean 1.20 (though A has the single best)
    # rows without a seed group are each their own candidate (not dropped, not merged); a NaN loss never wins
    rows = [dict(N=1e4, C=1e12, loss=v, seed_group=g) for v, g in ((2.0, None), (3.0, None), (2.4, "x"), (math.nan, "y"))]
    kept, _ = select.best_per(pd.DataFrame(rows), ("N", "C"))
    assert list(kept["loss"]) == [2.0] and list(kept["n_candidates"]) == [3]


def test_fit_cli_best_per_recovers_the_law_a_grid_would_lift(tmp_path, capsys):
    import json

    df = _grid_table()
    df = df[df["C"] > 5e12]  # one budget: loss(N) at fixed C
    path = tmp_path / "grid.csv"
    df.to_csv(path, index=False)
    assert cli.main(["fit", str(path), "--law", "powerlaw", "--x", "N", "--best-per", "N,C", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["params"]["alpha"] == pytest.approx(0.3, rel=1e-3) and res["params"]["E"] == pytest.approx(1.5, abs=1e-3)
    assert cli.main(["fit", str(path), "--law", "powerlaw", "--x", "N", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["params"]["E"] > 1.6  # the mistuned runs lift the fitted floor
    assert any("--best-per N,C" in n for n in res["notes"])


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the field, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sets, field, hint", [
    (["model.parametrization=mup"], "model.mup_base_width", "needs the width of the tuned base model"),
    (["model.parametrization=mup", "model.mup_base_width=50", "model.n_heads=4"], "model.mup_base_width",
     "not divisible by n_heads=4"),
    (["model.parametrization=mup", "model.mup_base_width=64", "model.mod=on"], "model.parametrization", "mixture-of-depths"),
])
def test_bad_mup_settings_exit_2(tmp_path, capsys, sets, field, hint):
    out = tmp_path / "run"
    args = ["train", "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and hint in err[0], err
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("kw, field, hint", [
    ({"rules": {"lr": {"power_law": {"coef": 1e-2, "Q": 0.5}}}}, "sweep.rules.lr.power_law.Q", "unknown variable"),
    ({"rules": {"lr": {"power_law": {"coef": -1e-2, "N": 0.5}}}}, "sweep.rules.lr.power_law.coef", "positive"),
    ({"rules": {"lr": {"power_law": {"coef": 1e-300, "N": -40}}}}, "sweep.rules.lr", "positive finite value"),
    ({"rules": {"lr": 0}}, "sweep.rules.lr", "positive"),
    ({"rules": {"batch": {"power_law": {"coef": 1.0, "D": 0.5}}}}, "sweep.rules.batch.power_law.D", "cannot depend on D"),
    ({"rules": {"warmup": {"steps": 5, "fraction": 0.1}}}, "sweep.rules.warmup", "not both"),
    ({"rules": {"lr": 1e-2}, "grid": {"lr": [1e-3, 1e-2]}}, "sweep.grid.lr", "set by sweep.rules.lr"),
    ({"rules": {"lr": {"mup": {"lr": 1e-2}}}}, "sweep.rules.lr.mup.base_width", "missing"),
    ({"rules": {"lr": {"mup": {"lr": 1e-2, "base_width": 50}}}, "sizes": {"shapes": [{"d_model": 64, "n_heads": 4}]}},
     "model.mup_base_width", "not divisible"),
    ({"rules": {"tempo": 1}}, "sweep.rules.tempo", "unknown field"),
    ({"rules": {"batch": 32}}, "sweep.rules.batch", "data.batch_size"),
    ({"rules": {"batch": {"power_law": {"coef": 1.0, "N": 0.0}}},
      "set": {k: v for k, v in TINY.items() if k != "data.batch_size"}}, "sweep.rules.batch", "rounds below 2 sequences"),
])
def test_bad_rules_exit_2_naming_the_field(tmp_path, capsys, kw, field, hint):
    p = _spec(tmp_path, **kw)
    out = tmp_path / "runs"
    assert cli.main(["sweep", str(p), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and hint in err[0], err
    assert not out.exists()


def test_wsd_branching_refuses_a_warmup_that_scales_with_the_run(tmp_path, capsys):
    p = _spec(tmp_path, strategy="wsd_branch", rules={"warmup": {"fraction": 0.05}},
              set={**TINY, "optim.schedule": "wsd"})
    assert cli.main(["sweep", str(p), "--plan"]) == 2
    err = capsys.readouterr().err
    assert "sweep.rules.warmup.fraction" in err and "fixed warmup" in err
    with pytest.raises(ConfigError, match="depends on C"):
        spec.load(_spec(tmp_path, strategy="wsd_branch", rules={"lr": {"power_law": {"coef": 1.0, "C": -0.1}}},
                        set={**TINY, "optim.schedule": "wsd", "optim.warmup_steps": 2}))
