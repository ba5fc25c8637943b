"""Sweep specs and plans: trials resolved from YAML, budgets, IsoFLOP grids, WSD branching
arithmetic, and bad specs rejected (exit 2) before anything runs. No training here."""

import math
from pathlib import Path

import pytest
import yaml

from scaling import cli, flops
from scaling.config import ConfigError, config_hash
from scaling.sweep import spec, wsd

TINY = {"data.seq_len": 32, "data.batch_size": 8, "model.vocab_size": 256}


CBS = {"at_tokens": [4096], "factors": [1, 4], "delta_tokens": 2048}
CONST = {**TINY, "optim.schedule": "constant", "optim.warmup_steps": 4}


def write(tmp_path: Path, raw: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def base(**kw) -> dict:
    raw = {"name": "t", "experiment": "dense", "set": dict(TINY),
           "buckets": [2e9, 8e9], "sizes": [2e3, 8e3]}
    raw.update(kw)
    return raw


def test_trials_resolve_budgets_sizes_and_ids():
    sp = spec.parse(base(grid={"lr": [1e-3, 3e-3]}, seeds=[0, 1]))
    ts = spec.trials(sp)
    assert len(ts) == 2 * 2 * 2 * 2  # buckets x sizes x lr x seeds
    assert len({t.id for t in ts}) == len(ts)
    for t in ts:
        assert t.id == config_hash(t.config)
        assert t.config.budget.flops == t.budget
        fps = flops.train_flops_per_token(t.config.model, 32) * 8 * 32
        assert t.flops_per_step == pytest.approx(fps)
        assert t.steps == flops.steps_for_budget(t.config)
        # the planned compute honours the bucket to within one step
        assert abs(t.steps * fps - t.budget) <= fps / 2 + 1e-6
        assert t.config.progress is False
    # sizes follow the family's size rule: non-embedding params near the target
    for t in ts:
        n = flops.param_counts(t.config.model).active_non_embedding
        assert abs(math.log(n / t.target_params)) < math.log(2.5)
    lrs = sorted({t.config.optim.lr for t in ts})
    assert lrs == [1e-3, 3e-3]
    assert {t.config.seed for t in ts} == {0, 1}


def test_isoflop_grid_is_geometric_ladder_around_guess():
    grid = spec.IsoFlopGrid(n=5, ratio=2.0, law=(4e4, 1e12, 0.5))
    sizes = grid.sizes_for(1e12, "x")
    assert len(sizes) == 5
    assert all(math.isclose(b / a, 2.0) for a, b in zip(sizes, sizes[1:]))
    assert sizes[2] == 2.0 ** round(math.log2(4e4))  # centred on the guess, snapped to 2^k
    # 100x the compute moves the centre by 10x (exponent 0.5)
    sizes100 = grid.sizes_for(1e14, "x")
    assert math.isclose(math.log2(sizes100[2] / sizes[2]), round(math.log2(10)), abs_tol=1)
    # Chinchilla default centre: sqrt(C / 120)
    g = spec.IsoFlopGrid(n=1, ratio=2.0)
    assert math.isclose(math.log2(g.sizes_for(1.2e13, "x")[0]), math.log2(math.sqrt(1.2e13 / 120)), abs_tol=0.5)


def test_shipped_specs_plan_and_isoflop_cpu_branch_ratio(capsys):
    for name in ("quickstart", "isoflop_cpu", "batch_size", "moe_granularity", "mod_vs_dense"):
        assert cli.main(["sweep", name, "--plan"]) == 0, name
        out = capsys.readouterr().out
        assert f"sweep {name}:" in out and "compute: independent" in out
    sp = spec.load("isoflop_cpu")
    indep = spec.trials(sp, "independent")
    branched = spec.trials(sp, "wsd_branch")
    ratio = wsd.planned_compute(branched) / wsd.planned_compute(indep)
    assert ratio <= 0.5, ratio
    # branching changes how trials run, not which (bucket, model, settings) points are measured
    assert sorted((t.bucket, t.group) for t in indep) == sorted((t.bucket, t.group) for t in branched)
    q = spec.trials(spec.load("quickstart"))
    assert len({t.budget for t in q}) == 3 and 4 <= len(q) / 3 <= 5


def test_wsd_branch_points_share_the_main_runs_learning_rate():
    """A branch leaves the main run where its own schedule starts to cool down, and up to that
    step the two schedules are identical: that is what makes a branch equal an independent run."""
    from scaling.train.optim import make_schedule, wsd_decay_start

    sp = spec.parse(base(strategy="wsd_branch", buckets=[2e9, 4e9, 8e9], sizes=[4e3],
                         set={**TINY, "optim.schedule": "wsd", "optim.warmup_steps": 3}))
    ts = spec.trials(sp)
    mains = [t for t in ts if t.role == "main"]
    branches = [t for t in ts if t.role == "branch"]
    assert len(mains) == 1 and len(branches) == 2
    main = mains[0]
    assert main.budget == 8e9
    assert sorted(main.config.checkpoint_at) == sorted(b.branch_step for b in branches)
    main_lr = make_schedule(main.config.optim, main.steps)
    for b in branches:
        assert b.main == main.id and b.config.init_from == f"{main.id}@{b.branch_step}"
        assert b.branch_step == wsd_decay_start(b.config.optim, b.steps)
        assert b.planned_flops == pytest.approx((b.steps - b.branch_step) * b.flops_per_step)
        own_lr = make_schedule(b.config.optim, b.steps)
        for s in range(b.branch_step):
            assert float(own_lr(s)) == float(main_lr(s))
        assert float(own_lr(b.branch_step)) < float(main_lr(b.branch_step))  # its cooldown has begun
    assert wsd.planned_compute(ts) < wsd.planned_compute(spec.trials(sp, "independent"))


def test_only_filter_selects_and_pulls_in_main_runs():
    sp = spec.parse(base(strategy="wsd_branch", buckets=[2e9, 8e9], sizes=[2e3, 8e3],
                         set={**TINY, "optim.schedule": "wsd", "optim.warmup_steps": 3}))
    ts = spec.trials(sp)
    sel = spec.select(ts, "bucket=2e9")
    assert {t.budget for t in sel if t.role == "branch"} == {2e9}
    assert all(t.main in {s.id for s in sel} for t in sel if t.main)
    with pytest.raises(ConfigError, match="matches no trial"):
        spec.select(ts, "bucket=3e9")


@pytest.mark.parametrize("raw_kw, field, hint", [
    ({"experiment": "nope"}, "sweep.experiment", "unknown experiment"),
    ({"grid": {"lr": []}}, "sweep.grid.lr", "empty"),
    ({"buckets": []}, "sweep.buckets", "empty"),
    ({"buckets": [2e9, 1e3]}, "sweep.buckets[1].flops", "less than one step"),
    ({"sizes": [4e3, 4e3]}, "sweep.buckets[0].sizes[1]", "duplicates the trial"),
    ({"grid": {"lr": [-1.0]}}, "sweep.grid.lr=-1.0", "optim.lr"),
    ({"strategy": "magic"}, "sweep.strategy", "independent, wsd_branch"),
    ({"bukets": [1e9]}, "sweep.bukets", "unknown field"),
    ({"strategy": "wsd_branch"}, "optim.schedule", "wsd"),
    ({"strategy": "cbs_branch"}, "sweep.cbs", "needs a mapping"),
    ({"cbs": {"at_tokens": [1e4]}}, "sweep.cbs", "cbs_branch only"),
    ({"strategy": "cbs_branch", "cbs": CBS}, "optim.schedule", "constant"),
    ({"strategy": "cbs_branch", "cbs": {**CBS, "factors": [2]}}, "sweep.cbs.factors", "at least two"),
    ({"strategy": "cbs_branch", "cbs": {**CBS, "delta_tokens": 1000}, "set": CONST}, "sweep.cbs.delta_tokens",
     "multiple of 1024"),
    ({"strategy": "cbs_branch", "cbs": {**CBS, "at_tokens": [512]}, "set": CONST}, "sweep.cbs.at_tokens",
     "outside its constant-LR part"),
    # every branch trains exactly delta_tokens: 2048 is not a whole number of steps at 3 x 256
    ({"strategy": "cbs_branch", "cbs": {**CBS, "factors": [1, 3, 4]}, "set": CONST}, "sweep.cbs.delta_tokens",
     "multiple of 3072"),
    ({"strategy": "cbs_branch", "cbs": {**CBS, "at_tokens": [2048, 2100]}, "set": CONST}, "sweep.cbs.at_tokens",
     "both step 8"),
    ({"strategy": "cbs_branch", "cbs": CBS, "set": {**CONST, "optim.batch_lr_exponent": 0.5}},
     "optim.batch_lr_exponent", "leave optim.batch_lr_exponent at 0"),
    ({"strategy": "cbs_branch", "cbs": {**CBS, "lr_exponent": 1e308}, "set": CONST}, "sweep.cbs.lr_exponent",
     "[0, 2]"),
    ({"strategy": "cbs_branch", "cbs": {**CBS, "factors": [True, 2]}, "set": CONST}, "sweep.cbs.factors[0]",
     "whole number"),
    ({"set": {**TINY, "data.batch_schedule": ["4096:inf"]}}, "data.batch_schedule[0]", "TOKENS:BATCH"),
    ({"strategy": "wsd_branch", "set": {**TINY, "optim.schedule": "wsd", "optim.warmup_steps": 2,
                                        "data.batch_schedule": ["1e6:16"]}}, "data.batch_schedule", "wsd_branch"),
])
def test_bad_specs_exit_2_naming_the_field_before_anything_runs(tmp_path, capsys, raw_kw, field, hint):
    p = write(tmp_path, base(**raw_kw))
    out = tmp_path / "runs"
    assert cli.main(["sweep", str(p), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert field in err and hint in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing ran, nothing written


def test_unknown_backend_and_bad_yaml_exit_2(tmp_path, capsys):
    p = write(tmp_path, base())
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", str(p), "--backend", "kubernetes"])
    assert e.value.code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert cli.main(["sweep", str(bad), "--plan"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["sweep", str(tmp_path / "missing.yaml"), "--plan"]) == 2
    assert "not found" in capsys.readouterr().err


def test_moe_grid_and_seconds_buckets():
    ts = spec.trials(spec.load("moe_granularity"))
    combos = {(t.config.model.moe.n_experts, t.config.model.moe.granularity) for t in ts}
    assert combos == {(e, g) for e in (4, 8) for g in (1, 2, 4)}
    # fine-grained experts keep the shape and the active parameters (up to the router's d x E G)
    by = {}
    for t in ts:
        m = t.config.model
        by.setdefault((t.budget, t.target_params), []).append(
            ((m.d_model, m.n_layers, m.resolved_d_ff), flops.param_counts(m).active_non_embedding))
    for group in by.values():
        assert len({shape for shape, _ in group}) == 1
        active = [a for _, a in group]
        assert max(active) / min(active) < 1.06
    # accelerator-seconds buckets become wall-clock budgets per device (Languini-style)
    sp = spec.parse(base(buckets=[{"accelerator_seconds": 120, "resources": {"gpus_per_node": 4}}], sizes=[4e3]))
    (t,) = spec.trials(sp)
    assert t.config.budget.kind == "seconds" and t.config.budget.seconds == 30.0 and t.steps is None
    with pytest.raises(ConfigError, match="wsd_branch needs FLOP buckets"):
        spec.trials(sp, "wsd_branch")


def test_cbs_branch_plan_regroups_the_main_runs_data_at_k_times_the_batch():
    """Each trial becomes a main run (checkpoints at the branch points) and one branch per
    (point, factor): batch k x B from the point's token count on, lr x sqrt(k), delta tokens
    more; the branch's steps and tokens follow its batch schedule."""
    sp = spec.parse(base(strategy="cbs_branch", set=CONST, buckets=[{"tokens": 16384}], sizes=[2e3],
                         cbs={"at_tokens": [2048, 8192], "factors": [1, 2, 4], "delta_tokens": 4096}))
    ts = spec.trials(sp)
    main = [t for t in ts if t.role == "main"]
    assert len(main) == 1 and main[0].config.checkpoint_at == (8, 32)
    branches = [t for t in ts if t.role == "branch"]
    assert len(branches) == 6 and all(t.main == main[0].id for t in branches)
    for t in branches:
        k, at = dict(t.tags)["cbs_factor"], dict(t.tags)["cbs_at_tokens"]
        assert t.config.init_from == f"{main[0].id}@{at // 256}"
        assert t.config.optim.lr == pytest.approx(main[0].config.optim.lr * k ** 0.5)
        assert t.config.data.batch_schedule == (() if k == 1 else (f"{at}:{8 * k}",))
        assert t.steps == at // 256 + 4096 // (256 * k)
        assert flops.tokens_for_steps(t.config, t.steps) == at + 4096 == t.config.budget.tokens
