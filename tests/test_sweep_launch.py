"""The launcher and store with a stand-in trainer (no JAX training): outcomes recorded with their
reasons, the sweep going on past failures and dead workers, resume skipping finished trials,
the tables the fitter reads, and the submitit path (local and debug executors)."""

import json
import math
import os
from pathlib import Path

import pytest

from scaling import cli, flops
from scaling.sweep import launch, local, spec, store
from scaling.files import read_json, read_jsonl, write_json_atomic
from scaling.lease import RunLease

HERE = Path(__file__).resolve().parent
FAKE = "test_sweep_launch:fake_run"
# A known law the stand-in trainer reports: loss = E + A / N^alpha + B / D^beta
E, A, ALPHA, B, BETA = 1.7, 400.0, 0.34, 410.0, 0.28


def fake_run(cfg, out_dir):
    """Stand-in for scaling.train.loop.run: the trial's behaviour is keyed on its lr."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lr = cfg.optim.lr
    if lr == 0.066:
        raise RuntimeError("boom: injected failure")
    if lr == 0.077:
        os._exit(3)  # the whole worker process dies
    if lr == 0.088:  # hangs: records its pid, then trains "forever"
        (out / "pid").write_text(str(os.getpid()))
        import time

        time.sleep(600)
    steps = flops.steps_for_budget(cfg)
    fpt = flops.train_flops_per_token(cfg.model, cfg.data.seq_len)
    n = flops.param_counts(cfg.model).active_non_embedding
    with open(out / "metrics.jsonl", "a") as f:
        for s in range(1, steps + 1, max(1, steps // 4)):
            f.write(json.dumps({"step": s, "tokens": s * cfg.tokens_per_step, "flops": s * cfg.tokens_per_step * fpt,
                                "loss": 5.0 / s, "gns_b_small": 1, "gns_b_big": cfg.data.batch_size}) + "\n")
    d = steps * cfg.tokens_per_step
    state, err = ("diverged", "loss is nan at step 3") if lr >= 10 else ("done", None)
    summary = {"state": state, "error": err, "steps": steps, "tokens": d, "D": d, "flops": d * fpt, "C": d * fpt,
               "N": n, "N_total": flops.param_counts(cfg.model).total, "final_eval_loss": E + A / n**ALPHA + B / d**BETA,
               "tokens_per_s": 1e5, "wall_s": 1.0}
    write_json_atomic(out / "summary.json", summary)
    return summary


@pytest.fixture(autouse=True)
def _importable_fake(monkeypatch, tmp_path):
    # worker processes import the stand-in trainer by name
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SCALING_JAX_CACHE", str(tmp_path / "jax_cache"))


def make_spec(**kw):
    raw = {"name": "fake", "experiment": "dense", "set": {"data.seq_len": 32, "data.batch_size": 8},
           "buckets": [2e9, 8e9], "sizes": [2e3, 8e3]}
    raw.update(kw)
    return spec.parse(raw)


def start(sweep_dir, sp):
    ts = spec.trials(sp)
    store.write_manifest(sweep_dir, sp, ts)
    return ts


def test_outcomes_recorded_and_sweep_goes_on_past_failures(tmp_path, capsys):
    sp = make_spec(grid={"lr": [3e-3, 0.066, 0.077, 100.0]}, buckets=[2e9], sizes=[4e3])
    ts = start(tmp_path, sp)
    counts = local.run_local(tmp_path, ts, jobs=2, run_fn=FAKE, progress=False)
    assert counts == {"pending": 0, "running": 0, "done": 1, "diverged": 1, "failed": 2}
    df = store.load(tmp_path).set_index("lr")
    assert df.loc[3e-3, "state"] == "done"
    assert df.loc[100.0, "state"] == "diverged" and "nan" in df.loc[100.0, "error"]
    assert df.loc[0.066, "state"] == "failed" and df.loc[0.066, "error"] == "RuntimeError: boom: injected failure"
    assert df.loc[0.077, "state"] == "failed" and "worker process died (exit status 3)" in df.loc[0.077, "error"]
    # the failing trial's traceback is kept in its log
    assert "boom" in (tmp_path / df.loc[0.066, "trial_id"] / "log.txt").read_text()
    # status table shows every trial and the reasons
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "boom: injected failure" in out and "done 1" in out and "failed 2" in out


def test_store_tables_and_resume_skips_finished(tmp_path):
    sp = make_spec()
    ts = start(tmp_path, sp)
    local.run_local(tmp_path, ts, jobs=1, run_fn=FAKE, progress=False)
    df = store.load(tmp_path)
    assert len(df) == 4 and set(df["state"]) == {"done"} and df["trial_id"].is_unique
    for col in ("N", "D", "C", "loss", "N_total", "flops_6n", "bucket", "shape", "batch", "lr", "E", "G", "capacity", "seed"):
        assert col in df.columns, col
    # the table carries exactly what the trainer measured
    assert (df["loss"] - (E + A / df["N"] ** ALPHA + B / df["D"] ** BETA)).abs().max() < 1e-12
    assert ((df["C"] - df["bucket"]).abs() <= 0.01 * df["bucket"]).all()
    steps = store.load_steps(tmp_path)
    assert set(steps["trial_id"]) == set(df["trial_id"])
    assert not steps.duplicated(["trial_id", "step"]).any()
    assert (steps["C"] == steps["flops"]).all() and "gns_b_big" in steps
    # rerun: nothing retrained, no new events
    n_events = len(store.events(tmp_path))
    counts = local.run_local(tmp_path, ts, jobs=1, run_fn=FAKE, progress=False)
    assert counts["done"] == 4 and len(store.events(tmp_path)) == n_events
    finals = [e for e in store.events(tmp_path) if e["state"] == "done"]
    assert sorted(e["trial_id"] for e in finals) == sorted(df["trial_id"])


def test_running_trial_is_locked_and_stale_running_is_pending(tmp_path):
    sp = make_spec(buckets=[2e9], sizes=[4e3])
    (t,) = start(tmp_path, sp)
    store.mark(tmp_path, t.id, "running")  # a runner that was SIGKILLed mid-trial
    assert store.trial_state(tmp_path / t.id)[0] == "pending"
    with RunLease(tmp_path / t.id):
        assert store.trial_state(tmp_path / t.id)[0] == "running"
        assert launch.run_trial(tmp_path, t.id, FAKE)["state"] == "busy"
    assert launch.run_trial(tmp_path, t.id, FAKE)["state"] == "done"


def test_atomic_json_never_torn(tmp_path):
    p = tmp_path / "x.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": 2, "b": list(range(1000))})
    assert read_json(p)["a"] == 2
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]  # no temp files left behind
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": ')  # killed mid-line
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]


@pytest.mark.parametrize("cluster", ["debug", "local"])
def test_submitit_backend(tmp_path, cluster):
    sp = make_spec(grid={"lr": [3e-3, 0.066]}, buckets=[2e9], sizes=[4e3],
                   resources={"timeout_min": 5, "cpus_per_task": 1})
    ts = start(tmp_path, sp)
    counts = launch.run_slurm(tmp_path, ts, run_fn=FAKE, cluster=cluster, progress=False, poll_s=0.2)
    assert counts["done"] == 1 and counts["failed"] == 1
    df = store.load(tmp_path)
    assert set(df.loc[df["state"] == "failed", "error"]) == {"RuntimeError: boom: injected failure"}
    done = df[df.state == "done"]
    assert ((done["loss"] - (E + A / done["N"] ** ALPHA + B / done["D"] ** BETA)).abs() < 1e-12).all()
    assert launch.slurm_parameters(ts[0].resources) == {"timeout_min": 5, "nodes": 1, "tasks_per_node": 1,
                                                        "cpus_per_task": 1, "gpus_per_node": 0}


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_worker_exits_when_its_runner_is_killed_mid_trial(tmp_path):
    """SIGKILL the runner while its worker trains: the worker exits within seconds (it reads EOF
    on its lifeline pipe), so no orphan keeps training and writing into the sweep."""
    import signal
    import subprocess
    import sys
    import time

    sp = make_spec(grid={"lr": [0.088]}, buckets=[2e9], sizes=[4e3])
    ts = start(tmp_path, sp)
    # the runner is a script with top-level code and no __main__ guard, as a notebook run with
    # `python analysis/x.py` is: starting workers must not run it again
    import pickle

    (tmp_path / "trials.pkl").write_bytes(pickle.dumps(ts))
    script = tmp_path / "runner.py"
    script.write_text("\n".join([
        "import pickle",
        "from scaling.sweep import local",
        f"ts = pickle.loads(open({str(tmp_path / 'trials.pkl')!r}, 'rb').read())",
        f"local.run_local({str(tmp_path)!r}, ts, jobs=1, run_fn={FAKE!r}, progress=False)", ""]))
    runner = subprocess.Popen([sys.executable, str(script)])
    pid_file = tmp_path / ts[0].id / "pid"
    deadline = time.time() + 120
    while not pid_file.exists() and time.time() < deadline and runner.poll() is None:
        time.sleep(0.05)
    assert pid_file.exists(), "the worker never started the trial"
    worker = int(pid_file.read_text())
    assert _alive(worker)
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    deadline = time.time() + 20
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "the worker outlived its runner"
