"""The shared plumbing, each surface with one owner: import rules of the house, the JSONL
reader/writer across a resume, atomic JSON files, the run-directory lease (two trainers, a
stale lease, a lost lease), schema versions and provenance, and the one progress display."""

import ast
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import experiments
from scaling import lease as lease_lib
from scaling import runs, schema
from scaling.cli import main
from scaling.errors import LeaseLost, RunDirBusy, SchemaError
from scaling.files import append_jsonl, read_json, read_jsonl, write_json_atomic
from scaling.lease import RunLease
from scaling.progress import ProgressLine, train_text
from scaling.train import loop
from scaling.train.loop import WALL_FIELDS

PKG = Path(__file__).resolve().parents[1] / "scaling"
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "data.batch_size=16",
        "data.eval_tokens=1024", "log_every=5", "eval_every=20", "progress=false"]


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in rows]


# ---------------------------------------------------------------------------------------------
# import rules
# ---------------------------------------------------------------------------------------------

BOTTOM_FLOOR = {"scaling", "scaling.errors", "scaling.files", "scaling.lease", "scaling.schema", "scaling.runs"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _banned(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


def test_import_rules_hold_in_the_source():
    fit_banned = ("jax", "flax", "optax", "orbax", "grain", "scaling.cli", "scaling.sweep", "scaling.train",
                  "scaling.models", "scaling.data", "scaling.sharding", "scaling.config", "scaling.flops")
    for f in sorted((PKG / "fit").glob("*.py")):
        assert not _banned(_imports(f), fit_banned), (f.name, _banned(_imports(f), fit_banned))
    # the bottom floor imports nothing above it
    for name in ("errors", "files", "lease", "schema", "runs"):
        scaling_imports = {n for n in _imports(PKG / f"{name}.py") if n.startswith("scaling")}
        above = {n for n in scaling_imports if n.rsplit(".", 1)[0] not in BOTTOM_FLOOR and n not in BOTTOM_FLOOR}
        assert not above, (name, above)
        assert not _banned(_imports(PKG / f"{name}.py"), ("jax", "flax", "numpy")), name
    assert not _banned(_imports(PKG / "flops.py"), ("scaling.models", "jax", "flax"))
    for f in sorted((PKG / "blocks").glob("*.py")):  # block kinds count without jax; calls are named lazily
        assert not _banned(_imports(f), ("scaling.models", "jax", "flax")), f.name
    assert not _banned(_imports(PKG / "models" / "layers.py"), ("scaling.models.moe", "scaling.models.mod"))
    assert not _banned(_imports(PKG / "models" / "bench.py"), ("scaling.train.bench",))
    # every error type lives in scaling.errors: no module defines its own Exception subclass
    for f in PKG.rglob("*.py"):
        if f.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not bases & {"Exception", "ValueError", "RuntimeError", "OSError"}, (f, node.name)


def test_fit_reads_a_sweep_without_jax_and_flops_without_flax(tmp_path):
    trial = tmp_path / "t1"
    write_json_atomic(tmp_path / "manifest.json", {"trials": [{"trial_id": "t1", "d_model": 8, "n_layers": 1}]})
    write_json_atomic(trial / "summary.json", {"state": "done", "N": 1e3, "D": 1e5, "C": 6e8, "final_eval_loss": 2.5,
                                               "schema_version": schema.SCHEMA_VERSION})
    append_jsonl(trial / "metrics.jsonl", {"step": 1, "loss": 3.0, "flops": 1e6})
    code = textwrap.dedent(f"""
        import sys
        import scaling.fit
        from scaling.fit import io
        df, _ = io.load_table({str(tmp_path)!r})
        steps, _ = io.load_table({str(tmp_path)!r}, steps=True)
        assert len(df) == 1 and df.loc[0, "loss"] == 2.5 and len(steps) == 1
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "optax", "orbax", "grain")
                       or m.startswith(("scaling.cli", "scaling.sweep", "scaling.train", "scaling.models")))
        assert not heavy, heavy
        import scaling.flops
        from scaling.config import MoDConfig, MoEConfig, ModelConfig
        assert scaling.flops.param_counts(ModelConfig(n_layers=2, moe=MoEConfig(), mod=MoDConfig())).total > 0
        assert "flax" not in sys.modules and "jax" not in sys.modules
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------------------------
# files: JSONL and atomic JSON
# ---------------------------------------------------------------------------------------------


def test_jsonl_reader_skips_bad_lines_and_an_append_never_joins_a_torn_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\nnot json\n[1, 2]\n{"step": 3}\n{"step": 4, "lo')  # garbage, non-object, torn
    rows = read_jsonl(p)
    assert rows == [{"step": 1}, {"step": 3}] and rows.bad == [2, 3, 5]
    append_jsonl(p, {"step": 5})
    assert read_jsonl(p) == [{"step": 1}, {"step": 3}, {"step": 5}]
    append_jsonl(p, {"x": float("nan")})  # non-finite floats stay strict JSON
    assert read_jsonl(p)[-1] == {"x": "nan"}


def test_atomic_json_honours_umask_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    old = os.umask(0o022)
    try:
        write_json_atomic(p, {"a": 1, "n": float("inf")})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644  # teammates on a shared disk can read it
    assert read_json(p) == {"a": 1, "n": "inf"}

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_json_atomic(p, {"a": 2})
    assert read_json(p)["a"] == 1 and sorted(q.name for q in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.slow
def test_garbage_middle_line_and_torn_last_line_lose_no_row_across_resume(tmp_path):
    cfg = experiments.get("dense").with_overrides([*TINY, "budget.steps=40", "checkpoint_every=20"])
    a, b = tmp_path / "a", tmp_path / "b"
    ref = loop.run(cfg, a)
    rows_a = read_jsonl(a / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == list(range(5, 41, 5))

    # b: as if killed after logging step 40 but before its summary, with its newest checkpoint
    # lost, a garbage line after step 10 and a torn line at the end
    shutil.copytree(a, b)
    (b / "summary.json").unlink()
    shutil.rmtree(b / "ckpt" / "40")
    lines = (b / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines.insert(2, "\x00\x00 garbage }{\n")
    (b / "metrics.jsonl").write_text("".join(lines) + '{"step": 45, "loss": 1.')
    sb = loop.run(cfg, b)  # resumes from step 20: rows 5..20 kept (15 and 20 lie after the garbage)
    assert sb["final_eval_loss"] == ref["final_eval_loss"] and sb["final_train_loss"] == ref["final_train_loss"]
    assert comparable(read_jsonl(b / "metrics.jsonl")) == comparable(rows_a)
    assert read_jsonl(b / "metrics.jsonl").bad == []
    assert (b / "metrics.jsonl.bad").read_text() == '\x00\x00 garbage }{\n{"step": 45, "loss": 1.\n'

    # the run records what it was measured under, and where it came from
    c = json.loads((a / "config.json").read_text())
    assert c["schema_version"] == schema.SCHEMA_VERSION == ref["schema_version"]
    prov = c["provenance"]
    assert prov["versions"]["jax"] and prov["versions"]["flax"] and prov["versions"]["optax"]
    assert prov["corpus_sha256"] == c["resolved"]["corpus"]["sha256"] and len(prov["tokenizer_sha256"]) == 64
    assert loop.load_config(a) == cfg


# ---------------------------------------------------------------------------------------------
# the run-directory lease
# ---------------------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import os, signal, sys, time
    from scaling.lease import RunLease
    lease = RunLease(sys.argv[1]).__enter__()
    print("held", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
""")


def _hold(d: Path, mode: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d), mode], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_stale_lease_of_a_killed_process_is_taken_over_with_one_line(tmp_path, capfd):
    d = tmp_path / "run"
    p = _hold(d, "die")
    p.wait()
    assert p.returncode == -signal.SIGKILL
    dead = lease_lib.holder(d)
    assert dead["pid"] == p.pid and not lease_lib.is_running(d)
    capfd.readouterr()
    with RunLease(d):
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"took over a stale lease of PID {p.pid}" in err[0] and "process is gone" in err[0]
        assert lease_lib.holder(d)["pid"] == os.getpid() and lease_lib.is_running(d)
    assert lease_lib.holder(d) is None  # released


def test_live_lease_refuses_and_other_hosts_count_by_heartbeat(tmp_path, monkeypatch):
    d = tmp_path / "run"
    p = _hold(d, "sleep")
    try:
        with pytest.raises(RunDirBusy, match=f"run directory is in use by PID {p.pid} on {socket.gethostname()}"):
            RunLease(d).__enter__()
        assert runs.trial_state(d)[0] == "running"
    finally:
        p.kill()
        p.wait()
    # a lease written on another host: live while its heartbeat is fresh, then stale
    other = {"host": "node-17", "pid": 4242, "token": "x", "heartbeat": time.time(), "stale_after_s": 120}
    write_json_atomic(d / "lock", other)
    with pytest.raises(RunDirBusy, match="PID 4242 on node-17"):
        RunLease(d).__enter__()
    write_json_atomic(d / "lock", {**other, "heartbeat": time.time() - 121})
    with RunLease(d, quiet=True):
        assert lease_lib.holder(d)["host"] == socket.gethostname()
        # the same process is refused too, unless it joins (the trainer inside a sweep worker)
        with pytest.raises(RunDirBusy):
            RunLease(d).__enter__()
        with RunLease(d, join=True):
            pass
        assert lease_lib.is_running(d)


def test_a_lease_taken_over_is_known_lost_and_readers_take_no_lock(tmp_path):
    d = tmp_path / "run"
    with RunLease(d) as held:
        before = sorted(q.name for q in d.iterdir())
        assert runs.trial_state(d)[0] == "running" and sorted(q.name for q in d.iterdir()) == before
        write_json_atomic(d / "lock", {**lease_lib.holder(d), "token": "someone-else"})  # judged stale, taken
        assert held.heartbeat() is False and held.lost
        with pytest.raises(LeaseLost):
            held.check()
    assert lease_lib.holder(d)["token"] == "someone-else"  # the new holder's lease is left alone


@pytest.mark.slow
def test_second_trainer_on_a_busy_directory_exits_2_and_the_first_finishes_as_alone(tmp_path):
    cfg = experiments.get("dense").with_overrides([*TINY, "budget.steps=150", "checkpoint_every=50"])
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    d = tmp_path / "shared"
    cmd = [sys.executable, "-m", "scaling.cli", "train", "--config", str(cfg_file), "--out", str(d)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while lease_lib.holder(d) is None and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    running = first.poll() is None
    first_err = first.communicate(timeout=300)[1]
    assert running, "the first trainer finished before the second started; lengthen it"
    assert second.returncode == 2, second.stderr
    line = second.stderr.strip().splitlines()
    assert len(line) == 1 and f"run directory is in use by PID {first.pid}" in line[0], second.stderr
    assert first.returncode == 0, first_err

    alone = loop.run(cfg, tmp_path / "alone")
    shared = json.loads((d / "summary.json").read_text())
    assert shared["state"] == "done" and shared["final_eval_loss"] == alone["final_eval_loss"]
    assert shared["final_train_loss"] == alone["final_train_loss"]
    assert comparable(read_jsonl(d / "metrics.jsonl")) == comparable(read_jsonl(tmp_path / "alone" / "metrics.jsonl"))
    assert lease_lib.holder(d) is None


# ---------------------------------------------------------------------------------------------
# schema versions
# ---------------------------------------------------------------------------------------------


def _sweep_with_versions(root: Path, versions: list[int | None]) -> Path:
    trials = []
    for i, v in enumerate(versions):
        tid = f"t{i}"
        trials.append({"trial_id": tid, "d_model": 8 * (i + 1), "n_layers": 1, "bucket": 1e9})
        s = {"state": "done", "N": 1e3 * (i + 1), "D": 1e6 / (i + 1), "C": 6e9 * (i + 1), "final_eval_loss": 3.0 - 0.1 * i}
        if v is not None:
            s["schema_version"] = v
        write_json_atomic(root / tid / "summary.json", s)
    write_json_atomic(root / "manifest.json", {"name": "s", "strategy": "independent", "trials": trials})
    return root


def test_tables_refuse_to_mix_schema_versions_unless_asked(tmp_path, capsys):
    d = _sweep_with_versions(tmp_path / "s", [None, None, 2, 2, 2])  # two first-wave runs, three new
    with pytest.raises(SchemaError, match=r"schema versions 1 \(2 runs\) and 2 \(3 runs\)"):
        runs.load(d)
    df = runs.load(d, allow_mixed=True)
    assert sorted(df["schema_version"]) == [1, 1, 2, 2, 2]
    assert main(["fit", str(d), "--law", "powerlaw"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allow-mixed-schema" in err[0]
    assert main(["fit", str(d), "--law", "powerlaw", "--allow-mixed-schema", "--json"]) == 0
    assert main(["status", str(d)]) == 0  # status shows every trial, whatever its version
    same = _sweep_with_versions(tmp_path / "same", [2, 2, 2])
    assert list(runs.load(same)["schema_version"]) == [2, 2, 2]


# ---------------------------------------------------------------------------------------------
# the progress display
# ---------------------------------------------------------------------------------------------


def test_one_progress_display_writes_throttled_plain_lines_to_a_log():
    buf = io.StringIO()
    bar = ProgressLine(100, stream=buf, interval_s=3600)
    text = train_text(loss=2.0, tokens_per_s=81234.0, mfu=0.031, eta_s=75)
    bar.update(text, n=30)          # first line always
    bar.update(text, n=60)          # throttled
    bar.message("step 60/100: eval loss 2.1 nats")
    bar.update(text, n=100)         # the end always
    lines = buf.getvalue().splitlines()
    assert lines == ["[#######-----------------] 30/100 loss 2.0000  81.2K tok/s  MFU 3.1%  ETA 01:15",
                     "step 60/100: eval loss 2.1 nats",
                     "[########################] 100/100 loss 2.0000  81.2K tok/s  MFU 3.1%  ETA 01:15"]
    sweep = io.StringIO()
    line = ProgressLine(None, stream=sweep, interval_s=3600)
    line.update("[sweep] 0/2 finished")
    line.update("[sweep] 0/2 finished")
    line.update("[sweep] 1/2 finished", force=True)  # a state change always shows
    assert sweep.getvalue().splitlines() == ["[sweep] 0/2 finished", "[sweep] 1/2 finished"]


def test_a_holder_that_cannot_heartbeat_knows_it_lost_the_lease(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_LEASE_STALE_S", "0.4")  # heartbeat every 0.1 s, lost after 0.2 s
    d = tmp_path / "run"
    with RunLease(d) as held:
        def full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(lease_lib, "write_json_atomic", full)
        deadline = time.time() + 5
        while not held.lost and time.time() < deadline:
            time.sleep(0.05)
        assert held.lost
        with pytest.raises(LeaseLost):
            held.check()


def test_check_rereads_the_lease_and_old_flock_files_are_respected(tmp_path):
    d = tmp_path / "run"
    with RunLease(d) as held:
        held.check()
        write_json_atomic(d / "lock", {**lease_lib.holder(d), "token": "someone-else"})
        with pytest.raises(LeaseLost):  # no heartbeat needed: check() reads the file
            held.check()
    # an older version's empty lock file, still flocked by its trainer: busy; once free: taken
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "lock").write_text("")
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(legacy / 'lock')!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match="older scaling version"):
            RunLease(legacy).__enter__()
    finally:
        p.kill()
        p.wait()
    with RunLease(legacy):
        assert lease_lib.holder(legacy)["pid"] == os.getpid()


def test_long_modules_say_why_at_their_top():
    """Modules stay small; one over ~400 lines says why in its docstring."""
    long = []
    for f in sorted(PKG.rglob("*.py")):
        text = f.read_text()
        if text.count("\n") > 420 and "Over 400 lines:" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{f.relative_to(PKG)} ({text.count(chr(10))} lines)")
    assert not long, long


def test_trial_ids_of_existing_configs_do_not_move():
    """Trial ids are published (run directories, committed studies): fields added later, the
    block registry and the wandb default leave them as the first wave computed them (values
    from commit e426e0d)."""
    import dataclasses

    import experiments
    from scaling.config import TrainConfig, config_hash

    sweep_trial = lambda cfg: dataclasses.replace(cfg, progress=False)  # noqa: E731  (what spec.trials does)
    assert config_hash(TrainConfig()) == "594a8914aec7"
    assert config_hash(sweep_trial(TrainConfig())) == "58c2d9b27470"
    assert config_hash(sweep_trial(experiments.get("moe"))) == "f15a1fb6e24c"
    assert config_hash(sweep_trial(experiments.get("mod"))) == "6768bf43d0c4"
