"""Multi-host runs with real processes: two trainer processes on this machine, 4 CPU devices
each, joined by ``jax.distributed`` on a localhost coordinator (gloo collectives), and the same
through submitit's local executor. What is checked: the 2-process run trains like one process
with 8 devices, process 0 alone writes the run directory (every metrics row once), and a SIGKILL
of one process followed by a relaunch of both resumes bitwise."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import experiments
from scaling.files import read_jsonl
from scaling.train import loop
from scaling.train.loop import WALL_FIELDS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=32", "data.batch_size=8",
        "data.eval_tokens=1024", "mesh.data=8", "budget.steps=10", "log_every=1", "checkpoint_every=5",
        "eval_every=100", "progress=false"]


def tiny():
    return experiments.get("dense").with_overrides(TINY)


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(cfg_file: Path, out: Path, *, kill_at: dict[int, str] | None = None) -> list[subprocess.Popen]:
    """Start processes 0 and 1 of one run, 4 CPU devices each (stderr to ``out``'s parent)."""
    port = free_port()
    procs = []
    for i in (0, 1):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   SCALING_COORDINATOR=f"localhost:{port}", SCALING_NUM_PROCESSES="2", SCALING_PROCESS_ID=str(i))
        env.pop("SCALING_KILL_AT", None)
        if kill_at and i in kill_at:
            env["SCALING_KILL_AT"] = kill_at[i]
        log = open(out.parent / f"{out.name}.p{i}.log", "a")
        procs.append(subprocess.Popen([sys.executable, "-m", "scaling.cli", "train", "--config", str(cfg_file),
                                       "--out", str(out)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    return procs


def wait_all(procs, out: Path, timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs = "".join((out.parent / f"{out.name}.p{i}.log").read_text()[-1500:] for i in (0, 1))
            pytest.fail(f"multi-process run did not finish in {timeout} s:\n{logs}")
    return codes


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in this process on its 8 CPU devices."""
    d = tmp_path_factory.mktemp("one") / "run"
    loop.run(tiny(), d)
    rows = read_jsonl(d / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))
    return rows


def test_two_processes_train_like_one_and_resume_after_sigkill(tmp_path, one_process):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(tiny().to_json())

    # uninterrupted: the 8-device mesh spans both processes
    whole = tmp_path / "whole"
    assert wait_all(launch(cfg_file, whole), whole) == [0, 0]
    rows = read_jsonl(whole / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))  # process 0 alone writes: each row once
    for a, b in zip(rows, one_process):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert json.loads((whole / "summary.json").read_text())["state"] == "done"
    resolved = json.loads((whole / "config.json").read_text())["resolved"]
    assert (resolved["total_steps"], resolved["process_count"], resolved["device_count"]) == (10, 2, 8)

    # process 1 dies by SIGKILL after step 7 (checkpoint at 5); as a scheduler would, the job's
    # other process is killed too; then both are launched again
    killed = tmp_path / "killed"
    procs = launch(cfg_file, killed, kill_at={1: "train_step:7"})
    assert procs[1].wait(timeout=240) == -signal.SIGKILL
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=60)
    assert max(r["step"] for r in read_jsonl(killed / "metrics.jsonl")) <= 7
    assert wait_all(launch(cfg_file, killed), killed) == [0, 0]
    assert comparable(read_jsonl(killed / "metrics.jsonl")) == comparable(rows)  # bitwise
    logs = (tmp_path / "killed.p0.log").read_text()
    assert "resuming from checkpoint step 5/10" in logs


def test_a_two_task_trial_through_submitits_local_executor(tmp_path, one_process):
    """``scaling sweep --backend slurm --cluster local`` with ``tasks_per_node: 2``: submitit
    starts two tasks, each reads its rank through ``submitit.JobEnvironment`` and joins
    ``jax.distributed``; the trial trains like one process with 8 devices."""
    spec = tmp_path / "spec.yaml"
    sets = dict(s.split("=", 1) for s in TINY if not s.startswith(("model.d_model", "model.n_layers", "budget.")))
    spec.write_text(json.dumps({
        "name": "two_task", "experiment": "dense", "strategy": "independent", "set": sets,
        "resources": {"tasks_per_node": 2, "cpus_per_task": 1, "timeout_min": 10},
        "buckets": [{"tokens": 10 * 8 * 32, "sizes": {"shapes": [{"model.d_model": 32, "model.n_layers": 2}]}}]}))
    out = tmp_path / "sweep"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    for k in [k for k in env if k.startswith(("SLURM_", "SUBMITIT_", "SCALING_COORDINATOR", "SCALING_NUM_PROC"))]:
        env.pop(k)
    r = subprocess.run([sys.executable, "-m", "scaling.cli", "sweep", str(spec), "--out", str(out), "--backend",
                        "slurm", "--cluster", "local", "--quiet"], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (trial,) = [d for d in out.iterdir() if (d / "trial.json").exists()]
    assert json.loads((trial / "summary.json").read_text())["state"] == "done"
    assert json.loads((trial / "config.json").read_text())["resolved"]["process_count"] == 2
    rows = read_jsonl(trial / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))
    for a, b in zip(rows, one_process):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_run_directory_on_an_object_store_writes_resumes_and_loads(tmp_path):
    """``--out memory://...`` (fsspec's memory filesystem standing in for gs://): config and
    summary are whole objects, metrics are numbered chunk objects (stores cannot append), the
    checkpoints go to ``checkpoint_dir`` (orbax writes gs:// natively, not memory://); a killed
    run resumes from its checkpoint and ``runs.load`` / ``load_steps`` read it back."""
    import fsspec

    from scaling import runs, storage
    from scaling.config import ConfigError

    out = f"memory://scaling-tests/{tmp_path.name}/run"
    ckpt = tmp_path / "ckpt"
    cfg = experiments.get("dense").with_overrides([*[t for t in TINY if not t.startswith("mesh.")],
                                                   f"checkpoint_dir={ckpt}"])
    with pytest.raises(ConfigError, match="out: orbax writes checkpoints to local paths and gs://, not memory://"):
        loop.run(experiments.get("dense").with_overrides(TINY[:-1]), out + "-no-ckpt")

    s = loop.run(cfg, out)
    assert s["state"] == "done"
    ref = tmp_path / "local"
    with pytest.raises(ConfigError, match="checkpoint_dir: .* holds the checkpoints of run memory://"):
        loop.run(cfg, ref)  # a second run directory may not share the first one's checkpoints
    loop.run(cfg.with_overrides([f"checkpoint_dir={tmp_path / 'ref_ckpt'}"]), ref)  # the same run, locally
    ref_rows = read_jsonl(ref / "metrics.jsonl")
    fs = fsspec.filesystem("memory")
    chunks = fs.ls(f"/scaling-tests/{tmp_path.name}/run/metrics.jsonl.chunks", detail=False)
    assert len(chunks) == 10 and not fs.exists(f"/scaling-tests/{tmp_path.name}/run/lock.guard")
    assert comparable(read_jsonl(out + "/metrics.jsonl")) == comparable(ref_rows)

    # as if the process died after logging step 10, before its last checkpoint and summary
    storage.path(out + "/summary.json").unlink()
    import shutil

    shutil.rmtree(ckpt / "10")
    (tmp_path / "ckpt_checksums" / "10.json").unlink()
    with pytest.raises(ConfigError, match="checkpoint_dir: this run's checkpoints are in"):
        loop.run(cfg.with_overrides([f"checkpoint_dir={tmp_path / 'elsewhere'}"]), out)  # not a restart from 0
    s = loop.run(cfg, out)
    assert s["state"] == "done" and s["steps"] == 10
    assert comparable(read_jsonl(out + "/metrics.jsonl")) == comparable(ref_rows)  # steps 6-10 again, once
    assert [r["step"] for r in read_jsonl(out + "/metrics.jsonl.rolled_back")] == [6, 7, 8, 9, 10]

    # scaling eval finds the checkpoints where the run recorded them
    from scaling.config import config_hash
    from scaling.train.eval_cli import score

    assert config_hash(cfg) == config_hash(cfg.with_overrides([f"checkpoint_dir={tmp_path / 'elsewhere'}"]))
    assert score(out)["final_eval_loss"] == pytest.approx(s["final_eval_loss"], rel=1e-6)

    table = runs.load(out)
    assert len(table) == 1 and table["loss"].iloc[0] == s["final_eval_loss"] and table["state"].iloc[0] == "done"
    steps = runs.load_steps(out)
    assert steps["step"].tolist() == list(range(1, 11))


def test_a_multi_task_trial_that_will_not_train_releases_every_task(tmp_path):
    """Rank 0 of a 2-task submitit trial finds it already done: it tells rank 1 (a broadcast
    after both joined jax.distributed), and both return at once instead of rank 1 starting the
    trainer alone and waiting for a partner that never comes."""
    sweep = tmp_path / "sweep"
    (sweep / "t0").mkdir(parents=True)
    (sweep / "t0" / "summary.json").write_text(json.dumps({"state": "done", "flops": 1.0}))
    port = free_port()
    code = ("import json, sys; from scaling.sweep.launch import _submitit_trial, DEFAULT_RUN_FN; "
            "print('RESULT', json.dumps(_submitit_trial(sys.argv[1], 't0', DEFAULT_RUN_FN)))")
    procs = []
    for i in (0, 1):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="77", SUBMITIT_LOCAL_NTASKS="2",
                   SUBMITIT_LOCAL_GLOBALID=str(i), SUBMITIT_LOCAL_LOCALID=str(i), SUBMITIT_LOCAL_NODEID="0",
                   SUBMITIT_LOCAL_JOB_NUM_NODES="1", JAX_COORDINATOR_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(sweep)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-1500:]
        results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
    assert results[0]["state"] == "done"
    assert results[1] == {"state": "worker", "summary": None}


def test_a_sweep_directory_on_an_object_store(tmp_path, monkeypatch):
    """``scaling sweep --out memory://...`` (in-process: the memory filesystem is not shared
    between processes; gs:// is): manifest, trial.json, status and the run on the store, events
    as time-named chunk objects, worker/submitit files in a local directory; ``runs.load`` and
    ``store.events`` read it back."""
    import fsspec

    from scaling import runs
    from scaling.sweep import launch, spec as spec_mod, store

    monkeypatch.setenv("SCALING_SWEEP_LOCAL_DIR", str(tmp_path / "local"))
    sets = dict(s.split("=", 1) for s in TINY if not s.startswith(("model.d_model", "model.n_layers", "budget.", "mesh.")))
    sets["checkpoint_dir"] = str(tmp_path / "ckpt")
    sp = spec_mod.parse({"name": "on_store", "experiment": "dense", "strategy": "independent", "set": sets,
                         "buckets": [{"tokens": 10 * 8 * 32,
                                      "sizes": {"shapes": [{"model.d_model": 32, "model.n_layers": 2}]}}]})
    trials = spec_mod.trials(sp)
    out = f"memory://scaling-tests/{tmp_path.name}/on_store"
    store.write_manifest(out, sp, trials)
    counts = launch.run_slurm(out, trials, cluster="debug", progress=False)
    assert counts["done"] == 1
    table = runs.load(out)
    assert len(table) == 1 and table["state"].iloc[0] == "done" and table["steps"].iloc[0] == 10
    assert [e["state"] for e in store.events(out)] == ["running", "done"]
    fs = fsspec.filesystem("memory")
    assert len(fs.ls(f"/scaling-tests/{tmp_path.name}/on_store/events.jsonl.chunks", detail=False)) == 2
    assert (tmp_path / "local" / "on_store" / ".submitit").is_dir()  # submitit's folder stays local
