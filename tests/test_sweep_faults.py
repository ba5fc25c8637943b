"""End-to-end sweeps with the real trainer (tiny models): nothing lost when the `scaling sweep`
runner is SIGKILLed at random moments, exact resumes, diverging/raising trials recorded with
their reasons, budgets honoured, and WSD branches equal to independent runs."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scaling.sweep import local, spec, store
from scaling.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY = {"data.seq_len": 32, "data.batch_size": 8, "data.eval_tokens": 512, "model.d_model": 16,
        "model.n_layers": 1, "model.n_heads": 2, "log_every": 5, "eval_every": 20, "checkpoint_every": 10}


def fps(d_model, n_layers):
    from scaling import flops
    from scaling.config import ModelConfig

    m = ModelConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=2)
    return flops.train_flops_per_token(m, 32) * 8 * 32


@pytest.fixture
def env(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "jax_cache"
    monkeypatch.setenv("SCALING_JAX_CACHE", str(cache))
    return dict(os.environ, SCALING_JAX_CACHE=str(cache))


def sweep_cmd(spec_path, out):
    return [sys.executable, "-m", "scaling.cli", "sweep", str(spec_path), "--out", str(out), "--quiet"]


def metrics_rows(out: Path) -> int:
    return sum(len(read_jsonl(p)) for p in out.glob("*/metrics.jsonl"))


@pytest.mark.slow
def test_sigkilled_runner_loses_nothing_and_resumes_exactly(tmp_path, env):
    # same-shape, same-budget trials (seeds) share one compiled step through the cache
    f = fps(16, 1)
    raw = {"name": "faults", "experiment": "dense", "set": {**TINY, "checkpoint_every": 25},
           "buckets": [150 * f], "seeds": [0, 1]}
    p = tmp_path / "faults.yaml"
    p.write_text(yaml.safe_dump(raw))
    ref, out = tmp_path / "ref", tmp_path / "faulted"

    # uninterrupted reference
    r = subprocess.run(sweep_cmd(p, ref), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    rng = random.Random(1234)
    kills = 0
    for i in range(8):
        before = metrics_rows(out)
        proc = subprocess.Popen(sweep_cmd(p, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i % 2 == 0:  # mid-training: wait until this run trains, then a random moment later
            deadline = time.time() + 120
            while proc.poll() is None and metrics_rows(out) <= before and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.3))
        else:  # start-up: imports, manifest, worker spawn, trial set-up, checkpoint restore
            time.sleep(rng.uniform(0.2, 3.0))
        if proc.poll() is not None:
            break  # finished before we could kill it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        if kills >= 6:
            break
    assert kills >= 5
    r = subprocess.run(sweep_cmd(p, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    a, b = store.load(ref).set_index("trial_id"), store.load(out).set_index("trial_id")
    assert len(b) == 2 and b.index.is_unique and sorted(a.index) == sorted(b.index)
    assert set(b["state"]) == {"done"}
    # resumed trials end exactly where uninterrupted ones do
    for tid in a.index:
        assert b.loc[tid, "loss"] == pytest.approx(a.loc[tid, "loss"], rel=1e-6, abs=1e-6), tid
        assert b.loc[tid, "D"] == a.loc[tid, "D"] and b.loc[tid, "steps"] == a.loc[tid, "steps"]
    # some trial really was interrupted and resumed
    ev = store.events(out)
    attempts = {tid: sum(1 for e in ev if e["trial_id"] == tid and e["state"] == "running") for tid in b.index}
    assert max(attempts.values()) >= 2, attempts
    # each trial finished exactly once, and no one restarted a finished trial
    for tid in b.index:
        states = [e["state"] for e in ev if e["trial_id"] == tid]
        assert states.count("done") == 1 and states[-1] == "done", states
    # budgets honoured: counted FLOPs within 1% or one step of the bucket
    for tid, row in b.iterrows():
        step = fps(int(row["d_model"]), int(row["n_layers"]))
        assert abs(row["C"] - row["bucket"]) <= max(0.01 * row["bucket"], step), (tid, row["C"], row["bucket"])
    # per-step table: no duplicated or missing logged steps
    steps = store.load_steps(out)
    assert not steps.duplicated(["trial_id", "step"]).any()
    for tid, g in steps.groupby("trial_id"):
        final = int(b.loc[tid, "steps"])
        expect = sorted(set(range(5, final + 1, 5)) | {final})
        assert sorted(g["step"].astype(int)) == expect, tid


@pytest.mark.slow
def test_diverging_and_raising_trials_recorded_and_sweep_goes_on(tmp_path, env):
    f = fps(16, 1)
    sp = spec.parse({"name": "bad", "experiment": "dense", "set": TINY, "buckets": [40 * f],
                     "variants": {"ok": {}, "absurd_lr": {"set": {"optim.lr": 1e3}},
                                  "broken": {"set": {"init_from": str(tmp_path / "nowhere") + "@5"}}}})
    ts = spec.trials(sp)
    store.write_manifest(tmp_path / "s", sp, ts)
    counts = local.run_local(tmp_path / "s", ts, jobs=1, progress=False)
    df = store.load(tmp_path / "s").set_index("variant")
    assert counts["done"] == 1 and counts["diverged"] == 1 and counts["failed"] == 1
    assert df.loc["ok", "state"] == "done" and df.loc["ok", "loss"] < 5.0
    assert df.loc["absurd_lr", "state"] == "diverged" and "diverged" in df.loc["absurd_lr", "error"]
    assert df.loc["broken", "state"] == "failed"
    assert "init_from" in df.loc["broken", "error"] and "nowhere" in df.loc["broken", "error"]


@pytest.mark.slow
def test_wsd_branch_equals_independent_run(tmp_path, env):
    f = fps(16, 1)
    raw = {"name": "wsd", "experiment": "dense", "strategy": "wsd_branch",
           "set": {**TINY, "optim.schedule": "wsd", "optim.warmup_steps": 5, "optim.wsd_decay_fraction": 0.2},
           "buckets": [50 * f, 100 * f]}
    sp = spec.parse(raw)
    ts = spec.trials(sp)
    store.write_manifest(tmp_path / "b", sp, ts)
    local.run_local(tmp_path / "b", ts, jobs=1, progress=False)
    sp_i = spec.parse({**raw, "strategy": "independent"})
    small = [t for t in spec.trials(sp_i) if t.budget == 50 * f]
    store.write_manifest(tmp_path / "i", sp_i, small)
    local.run_local(tmp_path / "i", small, jobs=1, progress=False)
    b = store.load(tmp_path / "b").set_index("role")
    i = store.load(tmp_path / "i").iloc[0]
    assert set(b["state"]) == {"done"}
    br = b.loc["branch"]
    # the branch ran only its cooldown, yet ends where the independent run does
    assert br["branch_step"] == 40 and br["steps"] == i["steps"] == 50
    assert br["C"] == pytest.approx(i["C"]) and br["D"] == i["D"]
    assert br["loss"] == pytest.approx(i["loss"], rel=1e-5, abs=1e-5)
    steps = store.load_steps(tmp_path / "b")
    assert steps[steps.trial_id == br["trial_id"]]["step"].min() > 40


@pytest.mark.slow
def test_cbs_branch_sweep_runs_and_fits_end_to_end(tmp_path, env, capsys):
    """A tiny ``strategy: cbs_branch`` sweep through the real trainer: the k=1 branch is the main
    run continued (its held-out loss equals the main run's at the same step, to the last digit),
    the larger branches read their tokens at the larger batch, and ``scaling fit --law cbs``
    reads the directory (one CBS per branch point, 1% tolerance)."""
    import json

    from scaling.cli import main as cli_main

    raw = {"name": "cbs", "experiment": "dense", "strategy": "cbs_branch",
           "set": {**TINY, "optim.schedule": "constant", "optim.warmup_steps": 3, "eval_every": 4,
                   "checkpoint_every": 1000},
           "cbs": {"at_tokens": [2048, 4096], "factors": [1, 2], "delta_tokens": 1024},
           "buckets": [{"tokens": 8192}]}
    sp = spec.parse(raw)
    ts = spec.trials(sp)
    store.write_manifest(tmp_path / "c", sp, ts)
    local.run_local(tmp_path / "c", ts, jobs=1, progress=False)
    df = store.load(tmp_path / "c")
    assert set(df["state"]) == {"done"} and len(df) == 5
    main_id = df.loc[df["role"] == "main", "trial_id"].iloc[0]
    main_eval = {r["step"]: r["eval_loss"] for r in read_jsonl(tmp_path / "c" / main_id / "metrics.jsonl")
                 if "eval_loss" in r}
    k1 = df[(df["role"] == "branch") & (df["cbs_factor"] == 1)]
    for _, r in k1.iterrows():
        assert r["loss"] == main_eval[int(r["steps"])]
    k2 = df[(df["role"] == "branch") & (df["cbs_factor"] == 2)]
    assert sorted(k2["D"]) == [2048 + 1024, 4096 + 1024] and sorted(k2["steps"]) == [10, 18]
    assert cli_main(["fit", str(tmp_path / "c"), "--law", "cbs", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [p["D"] for p in d["branch_points"]] == [2048, 4096]
    assert all(p["batches"] == [256, 512] for p in d["branch_points"])
