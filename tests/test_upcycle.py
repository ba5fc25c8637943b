"""MoE upcycling (issue 25): a dense checkpoint becomes an MoE that starts as the dense model,
reads on in the dense run's data order and resumes bitwise; bad inputs are one line, exit 2;
the ``upcycle`` sweep strategy plans D1 x D2 branches beside from-scratch runs."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import assert_refused
from flax import nnx

import experiments
from scaling.cli import main
from scaling.config import ConfigError, TrainConfig
from scaling.files import read_jsonl
from scaling.models import upcycle
from scaling.models.transformer import Transformer
from scaling.train import loop
from scaling.train import step as step_lib
from scaling.train.loop import WALL_FIELDS

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=32", "data.batch_size=16",
        "data.eval_tokens=1024", "log_every=1", "eval_every=100", "progress=false", "optim.lr=3e-3", "wandb=off"]
UP = ["model.ffn=moe", "model.moe.router=dropless", "init.upcycle=moe"]


def _params(model_cfg, seed):
    _, params, _ = step_lib.split_model(Transformer(model_cfg, rngs=nnx.Rngs(seed)))
    return params


def _logits(model_cfg, params, tokens):
    graphdef, _, rest = step_lib.split_model(Transformer(model_cfg, rngs=nnx.Rngs(0)))
    logits, _ = nnx.merge(graphdef, params, rest)(tokens, train=False)
    return np.asarray(logits, np.float64)


def test_upcycled_model_computes_the_dense_logits_whatever_the_router_says():
    dense = TrainConfig().with_overrides(TINY).model
    moe = TrainConfig().with_overrides([*TINY, "model.ffn=moe", "model.moe.router=dropless"]).model
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, 256)
    d_params = _params(dense, seed=1)
    ref = _logits(dense, d_params, tokens)
    worst = 0.0
    for router_seed in (2, 7):  # two different fresh routers, one of them made 50x sharper
        m = _params(moe, seed=router_seed)
        if router_seed == 7:
            for blk in m["blocks"].values():
                blk["mlp"]["router"][...] = blk["mlp"]["router"][...] * 50
        up = upcycle.upcycle_params(d_params, m, moe)
        worst = max(worst, float(np.max(np.abs(_logits(moe, up, tokens) - ref))))
    assert worst < 1e-5 * float(np.max(np.abs(ref)))  # the gates sum to 1 up to rounding
    # controls: Switch top-1 gates (the raw probability) and noisy copies do change the model
    top1 = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, top_k=1))
    up1 = upcycle.upcycle_params(d_params, _params(top1, 2), top1)
    assert np.max(np.abs(_logits(top1, up1, tokens) - ref)) > 1e-2
    noisy = upcycle.upcycle_params(d_params, _params(moe, 2), moe, noise=0.1)
    assert np.max(np.abs(_logits(moe, noisy, tokens) - ref)) > 1e-4


def test_fine_grained_experts_are_slices_of_the_dense_mlp():
    dense = TrainConfig().with_overrides(TINY).model
    moe = TrainConfig().with_overrides([*TINY, "model.ffn=moe", "model.moe.granularity=2"]).model
    d = _params(dense, 1)
    up = upcycle.upcycle_params(d, _params(moe, 2), moe)
    w_in, w_out = d["blocks"][0]["mlp"]["w_in"][...], d["blocks"][0]["mlp"]["w_out"][...]
    f = moe.expert_d_ff
    for j in range(moe.moe.n_routed):
        g = j % 2
        np.testing.assert_array_equal(up["blocks"][0]["mlp"]["w_in"][...][j], w_in[:, g * f:(g + 1) * f])
        np.testing.assert_array_equal(up["blocks"][0]["mlp"]["w_out"][...][j], w_out[g * f:(g + 1) * f])
    np.testing.assert_array_equal(up["embed"]["embedding"][...], d["embed"]["embedding"][...])


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A 24-step dense run with a checkpoint at step 16 (the upcycling point)."""
    d = tmp_path_factory.mktemp("dense") / "run"
    loop.run(experiments.get("dense").with_overrides([*TINY, "budget.steps=24", "checkpoint_at=16"]), d)
    return d


def _up_cfg(dense_dir, *extra):
    return experiments.get("dense").with_overrides([*TINY, *UP, f"init_from={dense_dir}@16", "budget.steps=10",
                                                    "checkpoint_every=4", "checkpoint_keep=4", *extra])


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in rows]


@pytest.mark.slow
def test_upcycled_run_starts_at_the_dense_loss_reads_on_and_resumes_bitwise(dense_run, tmp_path, capfd):
    out = tmp_path / "up"
    s = loop.run(_up_cfg(dense_run), out)
    dense_rows = {r["step"]: r for r in read_jsonl(dense_run / "metrics.jsonl")}
    up_rows = read_jsonl(out / "metrics.jsonl")
    # step 1's loss is computed before any update, on the batch the dense run read at its step 17:
    # the same model on the same tokens (no token seen twice)
    assert abs(up_rows[0]["loss"] - dense_rows[17]["loss"]) < 1e-5
    assert up_rows[-1]["loss"] < up_rows[0]["loss"]
    assert (s["dense_tokens"], s["steps"], s["tokens"]) == (16 * 512, 10, 10 * 512)
    assert s["dense_flops"] == pytest.approx(json.loads((dense_run / "summary.json").read_text())["flops"] * 16 / 24)
    # SIGKILL during step 7 (checkpoint at 4), then the same command: every row bit for bit
    killed = tmp_path / "killed"
    cfg_file = tmp_path / "up.json"
    cfg_file.write_text(_up_cfg(dense_run).to_json())
    r = subprocess.run([sys.executable, "-m", "scaling.cli", "train", "--config", str(cfg_file), "--out", str(killed)],
                       env=dict(os.environ, SCALING_KILL_AT="train_step:7"), capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-1500:]
    capfd.readouterr()
    s2 = loop.run(_up_cfg(dense_run), killed)
    err = capfd.readouterr().err
    assert "resuming from checkpoint step 4/10" in err and ": upcycled " not in err  # its own checkpoint, not the dense one
    assert comparable(read_jsonl(killed / "metrics.jsonl")) == comparable(up_rows)
    assert (s2["final_train_loss"], s2["final_eval_loss"]) == (s["final_train_loss"], s["final_eval_loss"])
    # init.data=restart reads from the first batch instead: another loss at step 1
    restart = loop.run(_up_cfg(dense_run, "init.data=restart", "budget.steps=1"), tmp_path / "restart")
    assert restart["steps"] == 1
    assert read_jsonl(tmp_path / "restart" / "metrics.jsonl")[0]["loss"] != up_rows[0]["loss"]


@pytest.mark.parametrize("sets,message", [
    (["init.upcycle=moe"], "init.upcycle: needs the dense checkpoint to start from; set init_from=RUN_DIR@STEP"),
    (["init.upcycle=moe", "init_from=somewhere@3"],
     "init.upcycle: moe upcycles into an MoE model, but model.moe is not set; set model.ffn=moe (or model.moe=on)"),
    (["init.noise=-1"], "init.noise: must be a finite number >= 0 (the noise std relative to each copied tensor's), "
                        "got -1.0"),
    (["init.data=restart"], "init.data: applies to upcycling only; set init.upcycle=moe or leave init.noise and "
                            "init.data at their defaults"),
])
def test_bad_upcycling_configs_are_one_line_and_exit_2(sets, message, tmp_path, capsys):
    assert_refused(sets, message, tmp_path, capsys)


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_is_refused_before_training(dense_run, tmp_path, capsys):
    def refused(extra, message):
        cfg = _up_cfg(dense_run, *extra)
        path = tmp_path / "c.json"
        path.write_text(cfg.to_json())
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"scaling train: error: {message}"]
        assert not (tmp_path / "r" / "metrics.jsonl").exists()

    refused(["model.d_model=64"], "model.d_model: the dense checkpoint has d_model=32, this MoE config 64; upcycling "
                                  "keeps the dense shape (set model.d_model=32)")
    refused(["model.moe.expert_size=0.5"], "model.moe.expert_size: upcycling copies the dense MLP into each expert, so "
                                           "experts must be its size; set model.moe.expert_size=1 (got 0.5)")
    refused(["data.seq_len=64"], "data.seq_len: init.data=continue reads on from the dense run's data, which has "
                                 "seq_len=32 (this run 64); set data.seq_len=32 or init.data=restart")
    refused(["model.n_layers=4", "model.scan_layers=true", "model.moe.every=2"],
            "model.scan_layers: upcycling into a scanned model whose MoE layers alternate (model.moe.every=2) is not "
            "supported; use model.scan_layers=false")
    # a plain branch (no init.upcycle) from a dense checkpoint into an MoE: said, not an orbax traceback
    cfg = experiments.get("dense").with_overrides([*TINY, "model.ffn=moe", f"init_from={dense_run}@16", "budget.steps=20"])
    (tmp_path / "b.json").write_text(cfg.to_json())
    assert main(["train", "--config", str(tmp_path / "b.json"), "--out", str(tmp_path / "rb")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "scaling train: error: init_from: the checkpoint's model has model.ffn=mlp, this one moe; a branch continues "
        "the same model (to turn a dense checkpoint into an MoE set init.upcycle=moe)"]
    moe_run = tmp_path / "moe"
    loop.run(experiments.get("dense").with_overrides([*TINY, "model.ffn=moe", "budget.steps=2"]), moe_run)
    cfg = experiments.get("dense").with_overrides([*TINY, *UP, f"init_from={moe_run}@2", "budget.steps=2"])
    path = tmp_path / "c2.json"
    path.write_text(cfg.to_json())
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r2")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "scaling train: error: init_from: the checkpoint's model is not dense (model.ffn=moe); upcycling starts from "
        "a dense run"]


SPEC = {"name": "up", "experiment": "dense", "strategy": "upcycle",
        "set": {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "data.seq_len": 32,
                "data.batch_size": 16, "optim.schedule": "constant", "optim.warmup_steps": 2},
        "buckets": [{"tokens": 8192}], "sizes": {"shapes": [{"d_model": 32, "n_layers": 1}]},
        "upcycle": {"dense_tokens": [2048, 4096], "upcycled_tokens": [1024, 2048], "scratch_flops": [3e8],
                    "scratch_dense": True}}


def test_the_upcycle_strategy_plans_d1_by_d2_branches_beside_scratch_runs():
    from scaling.sweep import spec as spec_mod

    trials = spec_mod.trials(spec_mod.parse(SPEC))
    arms = [dict(t.tags)["arm"] for t in trials]
    assert sorted(arms) == sorted(["dense_main"] + ["upcycled"] * 4 + ["scratch_moe", "scratch_dense"])
    main_t = next(t for t in trials if t.role == "main")
    assert main_t.config.checkpoint_at == (4, 8)  # 2048 and 4096 tokens at 512 per step
    for t in trials:
        tags = dict(t.tags)
        if tags["arm"] == "upcycled":
            assert t.config.init_from == f"{main_t.id}@{tags['D1'] // 512}" and t.main == main_t.id
            assert t.config.init.upcycle == "moe" and t.config.model.moe is not None
            assert t.config.optim.schedule == "cosine" and t.config.budget.tokens == tags["D2"]
        elif tags["arm"] == "scratch_moe":
            assert t.config.model.moe is not None and t.config.init_from is None and t.config.budget.flops == 3e8


@pytest.mark.parametrize("change,message", [
    ({"set": {**SPEC["set"], "optim.schedule": "cosine"}},
     "sweep.set.optim.schedule: strategy upcycle needs the dense runs at optim.schedule: constant"),
    ({"upcycle": {**SPEC["upcycle"], "dense_tokens": [1000]}},
     "sweep.upcycle.dense_tokens: 1000 tokens must be a whole number of steps (512 tokens each)"),
    ({"upcycle": {**SPEC["upcycle"], "moe": {"model.ffn": "peer"}}},
     "init.upcycle: moe upcycles into an MoE model, but model.moe is not set"),
    ({"upcycle": {**SPEC["upcycle"], "depth": 2}}, "sweep.upcycle.depth: unknown key"),
    ({"strategy": "independent"}, "sweep.upcycle: applies to strategy: upcycle only"),
])
def test_bad_upcycle_specs_name_the_field(change, message):
    from scaling.sweep import spec as spec_mod

    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        spec_mod.trials(spec_mod.parse({**SPEC, **change}))


def test_the_upcycling_law_recovers_its_parameters_and_the_interaction():
    """Losses drawn from L = A D1^-a1 D2^(-a2 + a3 ln D1) + E on a 4 x 4 grid (0.3% noise):
    the fit returns the exponents, and the interaction's sign, that made them."""
    import pandas as pd

    from scaling import fit

    truth = {"A": 40.0, "alpha1": 0.12, "alpha2": 0.35, "alpha3": 0.008, "E": 1.6}
    rng = np.random.default_rng(0)
    D1, D2 = np.meshgrid(np.geomspace(2e5, 2e7, 4), np.geomspace(2e5, 2e7, 4))
    D1, D2 = D1.ravel(), D2.ravel()
    loss = truth["A"] * D1 ** -truth["alpha1"] * D2 ** (-truth["alpha2"] + truth["alpha3"] * np.log(D1)) + truth["E"]
    df = pd.DataFrame({"D1": D1, "D2": D2, "loss": loss * (1 + 0.003 * rng.standard_normal(D1.size))})
    res = fit.upcycling(df, bootstrap=50, seed=0)
    p = res.params
    assert p["alpha3"] == pytest.approx(truth["alpha3"], abs=0.003) and res.ci["alpha3"][0] > 0
    assert p["alpha2"] == pytest.approx(truth["alpha2"], abs=0.06)
    assert p["E"] == pytest.approx(truth["E"], abs=0.1)
    pred = res.predict(D1=np.array([2e7]), D2=np.array([2e7]))
    assert float(pred["loss"].iloc[0]) == pytest.approx(loss[-1], rel=0.01)
    assert pred["loss_lo"].iloc[0] < pred["loss"].iloc[0] < pred["loss_hi"].iloc[0]
