"""End-to-end training through `scaling train` / `loop.run`: learning on the embedded corpus
within the exact budget, bitwise-exact resume after SIGKILL, corrupt-checkpoint fallback,
divergence handling, finished-run reruns and WSD branching."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import experiments
from scaling import flops
from scaling.cli import main
from scaling.config import ConfigError, config_hash
from scaling.data import corpus
from scaling.train import loop
from scaling.train.loop import WALL_FIELDS
from scaling.files import read_jsonl

# a tiny dense model (8 host devices in tests: batch 16 = one row per device per half-batch)
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "data.batch_size=16",
        "data.eval_tokens=1024", "log_every=5", "eval_every=20", "progress=false"]


def tiny_cfg(*extra):
    return experiments.get("dense").with_overrides([*TINY, *extra])


def write_cfg(path: Path, cfg) -> str:
    path.write_text(cfg.to_json())
    return str(path)


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in rows]


@pytest.mark.slow
def test_default_experiment_learns_within_exact_flop_budget(tmp_path, capsys):
    """~100K-parameter model, 1e12 training FLOPs on the embedded corpus: eval loss well below the
    unigram entropy (what a model without context can reach), FLOPs within one step of budget."""
    cfg = experiments.get("dense").with_overrides(["progress=false"])
    assert cfg.budget.flops == 1e12
    n = flops.param_counts(cfg.model).non_embedding
    assert 50_000 <= n <= 200_000
    rc = main(["train", "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["state"] == "done"
    h = corpus.corpus_info(cfg.data)["unigram_entropy_nats"]
    assert summary["final_eval_loss"] < h - 0.5, (summary["final_eval_loss"], h)
    per_step = flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.tokens_per_step
    assert abs(summary["flops"] - 1e12) <= per_step
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == summary["steps"] and rows[-1]["flops"] == summary["flops"]
    assert rows[-1]["eval_loss"] == summary["final_eval_loss"]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps))
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["corpus"]["sha256"] == summary["corpus_sha256"] and resolved["total_steps"] == summary["steps"]
    assert loop.load_config(tmp_path / "run") == cfg
    # the schedule ended exactly at the budget: last logged lr is final_lr_fraction * peak
    assert rows[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.final_lr_fraction, rel=1e-5)
    # rerunning a finished run does nothing
    capsys.readouterr()
    assert main(["train", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == rows


@pytest.mark.slow
def test_sigkill_resume_is_bitwise_exact_and_corrupt_latest_falls_back(tmp_path, capsys):
    cfg = tiny_cfg("budget.steps=100", "checkpoint_every=10", "checkpoint_keep=3")
    cfg_file = write_cfg(tmp_path / "cfg.json", cfg)
    a, b = tmp_path / "a", tmp_path / "b"

    # B: a subprocess killed with SIGKILL at a random moment after its second checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "scaling.cli", "train", "--config", cfg_file, "--out", str(b)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpts = [p for p in (b / "ckpt").glob("*") if p.name.isdigit()] if (b / "ckpt").exists() else []
        if len(ckpts) >= 2:
            time.sleep(random.uniform(0.0, 0.5))
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "summary.json").exists(), "the run finished before it could be killed"
    killed_rows = read_jsonl(b / "metrics.jsonl")
    assert killed_rows and killed_rows[-1]["step"] < 100

    # A: uninterrupted; then B resumed
    assert main(["train", "--config", cfg_file, "--out", str(a)]) == 0
    capsys.readouterr()
    assert main(["train", "--config", cfg_file, "--out", str(b)]) == 0
    assert "resuming from checkpoint step" in capsys.readouterr().err
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa["state"] == sb["state"] == "done" and sa["steps"] == sb["steps"] == 100
    assert sa["final_train_loss"] == sb["final_train_loss"]  # bitwise (JSON floats round-trip)
    assert sa["final_eval_loss"] == sb["final_eval_loss"]
    rows_a = read_jsonl(a / "metrics.jsonl")
    assert comparable(rows_a) == comparable(read_jsonl(b / "metrics.jsonl"))
    assert [r["step"] for r in rows_a] == list(range(5, 101, 5))

    # killed after its final checkpoint but before the summary: the rerun trains nothing and
    # reports the same figures
    (a / "summary.json").unlink()
    assert main(["train", "--config", cfg_file, "--out", str(a)]) == 0
    s_end = json.loads((a / "summary.json").read_text())
    assert (s_end["final_train_loss"], s_end["final_eval_loss"]) == (sa["final_train_loss"], sa["final_eval_loss"])
    assert comparable(read_jsonl(a / "metrics.jsonl")) == comparable(rows_a)

    # corrupt the newest checkpoint of A and rerun its last stretch: warn, fall back, same result
    (a / "summary.json").unlink()
    latest = a / "ckpt" / "100"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert main(["train", "--config", cfg_file, "--out", str(a)]) == 0
    assert "resuming from checkpoint step 90" in capsys.readouterr().err
    assert (a / "ckpt_corrupt" / "100").is_dir()
    sa2 = json.loads((a / "summary.json").read_text())
    assert sa2["final_train_loss"] == sa["final_train_loss"] and sa2["final_eval_loss"] == sa["final_eval_loss"]
    assert comparable(read_jsonl(a / "metrics.jsonl")) == comparable(rows_a)


def test_absurd_lr_diverges_cleanly(tmp_path, capsys):
    cfg_file = write_cfg(tmp_path / "cfg.json", tiny_cfg("optim.lr=1e3", "budget.steps=60", "log_every=1"))
    rc = main(["train", "--config", cfg_file, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["state"] == "diverged"
    assert summary["steps"] < 60
    assert "diverged" in err and "optim.lr" in err and "Traceback" not in err
    assert "diverged" in summary["error"]
    # a diverged run is finished: rerunning does nothing
    assert main(["train", "--config", cfg_file, "--out", str(tmp_path / "run")]) == 0
    assert "already diverged" in capsys.readouterr().err


@pytest.mark.slow
def test_wsd_branch_equals_independent_run(tmp_path):
    """A short WSD run branched off a long one at its cooldown start equals the short run trained
    from scratch (same warmup, same stable LR, same data order)."""
    wsd = ["optim.schedule=wsd", "optim.warmup_steps=5", "optim.wsd_decay_fraction=0.25"]
    long = tiny_cfg(*wsd, "budget.steps=60", "checkpoint_at=30")
    short = tiny_cfg(*wsd, "budget.steps=40")
    loop.run(long, tmp_path / "long")
    assert (tmp_path / "long" / "ckpt" / "30").is_dir()  # kept beyond keep-last-k
    branch = short.with_overrides([f"init_from={tmp_path / 'long'}@30"])
    sb = loop.run(branch, tmp_path / "branch")
    ss = loop.run(short, tmp_path / "short")
    assert sb["state"] == ss["state"] == "done" and sb["steps"] == ss["steps"] == 40
    assert sb["final_train_loss"] == ss["final_train_loss"]
    assert sb["final_eval_loss"] == ss["final_eval_loss"]
    rows_b = [r for r in read_jsonl(tmp_path / "branch" / "metrics.jsonl")]
    rows_s = [r for r in read_jsonl(tmp_path / "short" / "metrics.jsonl") if r["step"] > 30]
    assert comparable(rows_b) == comparable(rows_s)


@pytest.mark.slow
def test_seconds_budget_stops_and_schedule_fits(tmp_path):
    cfg = tiny_cfg("budget.seconds=2", "log_every=1000")
    s = loop.run(cfg, tmp_path / "run")
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert s["state"] == "done" and 1 <= s["steps"] <= resolved["total_steps"]
    # either the planned steps were all run or the wall-clock budget was spent
    assert s["steps"] == resolved["total_steps"] or s["wall_s"] >= 2.0
    # a resumed seconds-budget run keeps its planned schedule length (from the checkpoint)
    (tmp_path / "run" / "summary.json").unlink()
    s2 = loop.run(cfg, tmp_path / "run")
    again = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert again["total_steps"] == resolved["total_steps"] and s2["steps"] == s["steps"]


def test_error_during_training_marks_failed_and_reraises(tmp_path, monkeypatch):
    from scaling.train import step as step_lib

    def broken_step(*args, **kwargs):
        def step(state, batch):
            raise RuntimeError("simulated device failure")
        return step

    monkeypatch.setattr(step_lib, "make_traced_train_step", broken_step)
    with pytest.raises(RuntimeError, match="simulated device failure"):
        loop.run(tiny_cfg("budget.steps=10"), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["state"] == "failed" and "simulated device failure" in summary["error"]


def test_mod_run_stores_the_causal_loss_and_logs_the_top_k_one(tmp_path):
    """A MoD run's fitted loss is each token's causal decision (what a sampler sees); the top-k
    routing number, which looks at later tokens, is logged beside it as eval_loss_topk. The
    stored loss equals a causal evaluation of the final checkpoint on the same held-out set."""
    import jax

    from scaling.data import loader
    from scaling.train.sample_cli import load_model

    cfg = experiments.get("mod").with_overrides([*TINY, "model.n_layers=2", "budget.steps=20"])
    summary = loop.run(cfg, tmp_path / "run")
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert rows and all(np.isfinite(r["eval_loss_topk"]) for r in rows)
    assert summary["final_eval_loss_topk"] == rows[-1]["eval_loss_topk"] != summary["final_eval_loss"]
    assert summary["causal"] is True and 0 < summary["final_eval_loss"] < 10
    _, model, _ = load_model(tmp_path / "run")
    total = count = 0.0
    for chunk in loader.eval_set(cfg.data).chunks:
        logits, _ = model(chunk["inputs"], train=False, mod_routing="causal")
        logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
        total -= np.take_along_axis(logp, chunk["targets"][..., None], axis=-1).sum()
        count += chunk["targets"].size
    assert total / count == pytest.approx(summary["final_eval_loss"], rel=1e-5)

def test_microbatched_run_matches_plain_and_logs_statistics_every_gns_every_steps(tmp_path):
    """``data.microbatch`` through the trainer (8 devices: 16 sequences, 1 per device per pass)
    gives the plain run's losses; ``optim.gns_every=3`` adds a row with the statistics on every
    third step (and the last), and only there, with ``gns_b_small`` the 8-sequence pass."""
    plain = tiny_cfg("budget.steps=12", "checkpoint_every=100", "optim.gns_every=0")
    micro = tiny_cfg("budget.steps=12", "checkpoint_every=100", "data.microbatch=1", "optim.gns_every=3")
    for name, cfg in (("plain", plain), ("micro", micro)):
        assert main(["train", "--config", write_cfg(tmp_path / f"{name}.json", cfg), "--out", str(tmp_path / name)]) == 0
    rows = {n: read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("plain", "micro")}
    assert [r["step"] for r in rows["plain"]] == [5, 10, 12]
    assert [r["step"] for r in rows["micro"]] == [3, 5, 6, 9, 10, 12]
    assert not any("gns_g_small_sq" in r for r in rows["plain"])
    with_stats = [r["step"] for r in rows["micro"] if "gns_g_small_sq" in r]
    assert with_stats == [3, 6, 9, 12]
    assert all(r["gns_b_small"] == 8 and r["gns_b_big"] == 16 for r in rows["micro"] if "gns_b_small" in r)
    by_step = {r["step"]: r for r in rows["micro"]}
    for r in rows["plain"]:
        assert by_step[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-5)
    assert json.loads((tmp_path / "micro" / "summary.json").read_text())["final_eval_loss"] == pytest.approx(
        json.loads((tmp_path / "plain" / "summary.json").read_text())["final_eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_batch_schedule_branch_from_a_checkpoint_equals_the_scheduled_run(tmp_path):
    """A branch that doubles the batch at another run's checkpoint (``init_from`` +
    ``data.batch_schedule``, how the branched critical-batch measurement runs) equals the run
    trained from scratch with that schedule, row for row: the data position, the token count
    and the optimizer state carry over exactly. Without the schedule the mismatch is refused."""
    const = ["optim.schedule=constant", "optim.warmup_steps=3", "checkpoint_every=100", "log_every=2", "eval_every=4"]
    at, b0, L = 8, 16, 32
    main_cfg = tiny_cfg(*const, "budget.steps=12", f"checkpoint_at={at}")
    sched = tiny_cfg(*const, f"data.batch_schedule={at * b0 * L}:32", "budget.steps=12")
    loop.run(main_cfg, tmp_path / "main")
    branch = sched.with_overrides([f"init_from={tmp_path / 'main'}@{at}"])
    sb = loop.run(branch, tmp_path / "branch")
    ss = loop.run(sched, tmp_path / "scratch")
    assert sb["state"] == ss["state"] == "done"
    assert sb["tokens"] == ss["tokens"] == (at * b0 + 4 * 32) * L
    rows_b = read_jsonl(tmp_path / "branch" / "metrics.jsonl")
    rows_s = [r for r in read_jsonl(tmp_path / "scratch" / "metrics.jsonl") if r["step"] > at]
    assert comparable(rows_b) == comparable(rows_s)
    assert [(r["step"], r["tokens"], r["batch_size"]) for r in rows_b] == [
        (10, (at * b0 + 2 * 32) * L, 32), (12, (at * b0 + 4 * 32) * L, 32)]
    main_rows = {r["step"]: r for r in read_jsonl(tmp_path / "main" / "metrics.jsonl")}
    assert main_rows[at]["loss"] == {r["step"]: r for r in read_jsonl(tmp_path / "scratch" / "metrics.jsonl")}[at]["loss"]
    # optim.batch_lr_exponent: the lr follows the batch (x sqrt(2) after the switch to 32)
    sqrt_rule = sched.with_overrides(["optim.batch_lr_exponent=0.5"])
    loop.run(sqrt_rule, tmp_path / "sqrt")
    lrs = {r["step"]: r["lr"] for r in read_jsonl(tmp_path / "sqrt" / "metrics.jsonl")}
    base_lr = sched.optim.lr
    assert lrs[8] == pytest.approx(base_lr, rel=1e-6) and lrs[10] == pytest.approx(base_lr * 2 ** 0.5, rel=1e-6)
    wrong = tiny_cfg(*const, "data.batch_size=32", "budget.steps=12",
                     f"init_from={tmp_path / 'main'}@{at}")
    with pytest.raises(ConfigError, match="data.batch_size.*data.batch_schedule"):
        loop.run(wrong, tmp_path / "wrong")


@pytest.mark.slow
def test_scanned_layers_train_like_the_loop(tmp_path):
    """``model.scan_layers``: the blocks stacked and run by one lax.scan start from the loop
    model's parameters and train to the same losses (10 steps, 1e-6 relative; MoE and MoD
    patterns: test_model); a branch from a loop-layout checkpoint into the scanned layout (the
    parameters and Adam's moments converted) continues like the loop run; a pattern that does
    not repeat cannot be scanned."""
    base = ["model.n_layers=4", "log_every=1", "eval_every=10", "budget.steps=10", "checkpoint_every=100",
            "checkpoint_at=5"]
    for name, extra in (("dense", []),):
        losses = {}
        for layout in ("loop", "scan"):
            cfg = tiny_cfg(*base, *extra, f"model.scan_layers={layout == 'scan'}")
            s = loop.run(cfg, tmp_path / f"{name}_{layout}")
            losses[layout] = [r["loss"] for r in read_jsonl(tmp_path / f"{name}_{layout}" / "metrics.jsonl")]
            losses[layout].append(s["final_eval_loss"])
        assert len(losses["scan"]) == 11
        np.testing.assert_allclose(losses["scan"], losses["loop"], rtol=1e-6)
    cross = tiny_cfg(*base, "model.scan_layers=true", f"init_from={tmp_path / 'dense_loop'}@5")
    s = loop.run(cross, tmp_path / "cross")
    after = [r["loss"] for r in read_jsonl(tmp_path / "cross" / "metrics.jsonl")] + [s["final_eval_loss"]]
    np.testing.assert_allclose(after, losses["loop"][5:], rtol=1e-6)
    with pytest.raises(ConfigError, match="model.scan_layers: the blocks .* end in a partial group.* multiple of 2"):
        tiny_cfg("model.n_layers=3", "model.moe=on", "model.moe.every=2", "model.scan_layers=true")
    # one group (the pattern as long as the model) is a scan of length 1, not an error
    assert tiny_cfg("model.n_layers=4", "model.mod=on", "model.mod.every=4", "model.scan_layers=true").model.layer_period() == 4


def test_wandb_runs_are_grouped_by_sweep_and_tagged(tmp_path, monkeypatch):
    """A sweep trial's wandb run carries a project, the sweep's name as its group and tags for
    the experiment, budget, shape and seed; a lone run is grouped under its directory's name.
    (wandb itself is replaced by a recorder: tests never start it.)"""
    import wandb

    calls = []

    class Run:
        summary: dict = {}

        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "my-laws")
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or Run())
    sweep = tmp_path / "isoflop_x"
    sweep.mkdir()
    (sweep / "manifest.json").write_text(json.dumps({"name": "isoflop_x", "trials": []}))
    cfg = tiny_cfg("budget.steps=2", "seed=3")
    assert cfg.wandb == "offline"  # the default; the trial id is the one wandb=off always had
    assert config_hash(cfg) == config_hash(cfg.with_overrides(["wandb=off"])) == config_hash(cfg.with_overrides(["wandb=online"]))
    loop.run(cfg, sweep / "abc123")
    loop.run(cfg, tmp_path / "lone")
    assert [c["group"] for c in calls] == ["isoflop_x", "lone"]
    assert calls[0]["project"] == "my-laws" and calls[0]["mode"] == "offline"
    assert calls[0]["tags"] == ["dense", "steps=2", "d32L1", "seed=3"]


@pytest.mark.slow
def test_default_wandb_mirror_is_offline_and_local(tmp_path, monkeypatch):
    """The default (wandb=offline) starts real wandb with no network: the run's rows land in an
    offline run under OUT/wandb, and metrics.jsonl is unchanged by it."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    cfg = tiny_cfg("budget.steps=5")
    assert cfg.wandb == "offline"
    summary = loop.run(cfg, tmp_path / "run")
    assert summary["state"] == "done"
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs
    ref = loop.run(cfg.with_overrides(["wandb=off"]), tmp_path / "ref")
    assert comparable(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == comparable(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    assert summary["final_eval_loss"] == ref["final_eval_loss"]
