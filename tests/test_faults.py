"""Fault injection at seeded points (``scaling.faults``: no random timing) and bad input from a
skeptical user: SIGKILL during a train step, during a checkpoint save and in the sweep runner;
flipped bytes in checkpoints; a full disk; code and shell injection through --where and sweep
specs; bad values that used to train; resource failures reported in one line. Each ends with
nothing lost: every valid metrics row is there and resumes are bitwise exact, or the input is
refused with one clear line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import experiments
from scaling.cli import main
from scaling.files import read_jsonl
from scaling.sweep import store
from scaling.train import loop
from scaling.train.loop import WALL_FIELDS

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "data.batch_size=16",
        "data.eval_tokens=1024", "log_every=5", "eval_every=20", "progress=false"]


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in rows]


def tiny(*extra):
    return experiments.get("dense").with_overrides([*TINY, "budget.steps=40", "checkpoint_every=10",
                                                    "checkpoint_keep=4", *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 40-step run (checkpoints at 10, 20, 30, 40)."""
    d = tmp_path_factory.mktemp("ref") / "run"
    summary = loop.run(tiny(), d)
    return d, summary, read_jsonl(d / "metrics.jsonl")


def same_as_reference(d: Path, reference) -> None:
    _, ref_summary, ref_rows = reference
    s = json.loads((d / "summary.json").read_text())
    assert s["state"] == "done" and s["steps"] == 40
    assert (s["final_train_loss"], s["final_eval_loss"]) == (ref_summary["final_train_loss"], ref_summary["final_eval_loss"])
    assert comparable(read_jsonl(d / "metrics.jsonl")) == comparable(ref_rows)


def killed_train(tmp_path: Path, out: Path, point: str) -> None:
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(tiny().to_json())
    env = dict(os.environ, SCALING_KILL_AT=point)
    r = subprocess.run([sys.executable, "-m", "scaling.cli", "train", "--config", str(cfg_file), "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, (point, r.returncode, r.stderr[-1500:])
    assert not (out / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("point, resumes_at", [("train_step:27", 20), ("checkpoint_save:30", 30)])
def test_sigkill_at_seeded_points_resumes_bitwise(tmp_path, reference, capfd, point, resumes_at):
    out = tmp_path / "run"
    killed_train(tmp_path, out, point)
    rows_at_kill = read_jsonl(out / "metrics.jsonl")
    assert rows_at_kill and rows_at_kill[-1]["step"] <= int(point.split(":")[1])
    capfd.readouterr()
    loop.run(tiny(), out)  # the stale lease of the killed process is taken over
    err = capfd.readouterr().err
    assert f"resuming from checkpoint step {resumes_at}/40" in err and "took over a stale lease" in err
    same_as_reference(out, reference)


def test_hardware_flops_add_up_per_session_when_a_resume_changes_remat(tmp_path, reference):
    """``model.remat`` is unhashed, so a run may resume under another policy: its hardware
    FLOPs are the first session's at the first rate plus the second's at the second (the
    model FLOPs, ``flops``, do not change)."""
    from scaling.train.metrics import hardware_flops_per_token

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    (out / "summary.json").unlink()
    for step in (30, 40):  # the run resumes from step 20
        shutil.rmtree(out / "ckpt" / str(step))
        (out / "ckpt_checksums" / f"{step}.json").unlink()
    cfg = tiny("model.remat=full")
    s = loop.run(cfg, out)
    tokens = 20 * cfg.tokens_per_step
    none_rate = hardware_flops_per_token(tiny().model, cfg.data.seq_len)
    full_rate = hardware_flops_per_token(cfg.model, cfg.data.seq_len)
    assert full_rate > 1.1 * none_rate  # the block forward again (the head is not rematerialised)
    assert s["hardware_flops"] == pytest.approx(tokens * none_rate + tokens * full_rate, rel=1e-12)
    assert s["flops"] == reference[1]["flops"] and s["steps"] == 40


@pytest.mark.slow
def test_flipped_bytes_are_caught_by_checksums_and_the_resume_stays_exact(tmp_path, reference, capfd):
    ref_dir = reference[0]
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    (out / "summary.json").unlink()
    # three flipped bytes in the newest step's largest state file: orbax alone reads this silently
    files = sorted((f for f in (out / "ckpt" / "40" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    target = files[-1]
    data = bytearray(target.read_bytes())
    for i in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    capfd.readouterr()
    with pytest.warns(RuntimeWarning, match="does not match its recorded checksum"):
        loop.run(tiny(), out)
    err = capfd.readouterr().err
    assert "resuming from checkpoint step 30/40" in err and (out / "ckpt_corrupt" / "40").is_dir()
    same_as_reference(out, reference)

    # every checkpoint unusable: one line, a fresh start, the same result
    (out / "summary.json").unlink()
    for step_dir in (out / "ckpt").iterdir():
        for f in step_dir.rglob("*"):
            if f.is_file() and f.stat().st_size > 8:
                b = bytearray(f.read_bytes())
                b[len(b) // 2] ^= 0xFF
                f.write_bytes(bytes(b))
    with pytest.warns(RuntimeWarning):
        loop.run(tiny(), out)
    err = capfd.readouterr().err
    assert err.count("no usable checkpoint: restarting from step 0") == 1
    assert "Traceback" not in err and len(err.splitlines()) < 12, err
    same_as_reference(out, reference)


def test_full_disk_records_failed_and_leaves_no_temp_files(tmp_path, monkeypatch, capsys):
    from scaling import files

    real = files.JsonlAppender.write
    calls = {"n": 0}

    def write(self, row):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device", str(self.path))
        real(self, row)

    monkeypatch.setattr(files.JsonlAppender, "write", write)
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(tiny().to_json())
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_file), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("scaling train: error: No space left on device") and "Traceback" not in "\n".join(err)
    s = json.loads((out / "summary.json").read_text())
    assert s["state"] == "failed" and "No space left on device" in s["error"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or "orbax-checkpoint-tmp" in p.name]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [5, 10]  # every row written is kept
    monkeypatch.setattr(files.JsonlAppender, "write", real)
    assert main(["train", "--config", str(cfg_file), "--out", str(out)]) == 0  # space freed: it resumes
    assert json.loads((out / "summary.json").read_text())["state"] == "done"


@pytest.mark.slow
def test_sweep_runner_killed_at_a_seeded_point_loses_nothing(tmp_path):
    from scaling import flops
    from scaling.config import ModelConfig

    sweep_tiny = {"data.seq_len": 32, "data.batch_size": 8, "data.eval_tokens": 512, "model.d_model": 16,
                  "model.n_layers": 1, "model.n_heads": 2, "log_every": 5, "eval_every": 20, "checkpoint_every": 10}
    per_step = flops.train_flops_per_token(ModelConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2), 32) * 8 * 32
    raw = {"name": "seeded", "experiment": "dense", "set": sweep_tiny, "buckets": [40 * per_step], "seeds": [0, 1, 2]}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "scaling.cli", "sweep", str(p), "--out", str(out), "--quiet"]
    env = dict(os.environ, SCALING_KILL_AT="sweep_result:2")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-1500:]
    df = store.load(out)
    assert sorted(df["state"]) == ["done", "done", "pending"]  # the two reported trials are final
    done_rows = {t: read_jsonl(out / t / "metrics.jsonl") for t in df.loc[df["state"] == "done", "trial_id"]}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    df = store.load(out)
    assert list(df["state"]) == ["done"] * 3
    for t, rows in done_rows.items():  # finished trials were not touched again
        assert read_jsonl(out / t / "metrics.jsonl") == rows
    for t in df["trial_id"]:
        assert [r["step"] for r in read_jsonl(out / t / "metrics.jsonl")] == list(range(5, 41, 5))


# ---------------------------------------------------------------------------------------------
# injection: a filter or a spec never runs anything
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr", [
    "@pd.io.common.os.system('echo PWNED > {f}')",
    "N.__class__.__init__.__globals__['os'].system('echo PWNED > {f}') == 0",
    "__import__('os').system('echo PWNED > {f}') == 0",
    "N > 0 and (lambda: __import__('os').system('echo PWNED > {f}'))() == 0",
])
@pytest.mark.parametrize("command", ["fit", "plot"])
def test_where_cannot_execute_code(tmp_path, capsys, expr, command):
    table = tmp_path / "t.csv"
    table.write_text("N,D,C,loss\n1e6,2e7,1.2e14,3.1\n1e7,2e8,1.2e16,2.6\n1e8,2e9,1.2e18,2.2\n")
    pwned = tmp_path / "pwned"
    argv = [command, str(table), "--where", expr.format(f=pwned)]
    argv += ["--law", "chinchilla"] if command == "fit" else ["--figure", "frontier", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"scaling {command}: error: --where:")
    assert not pwned.exists()


@pytest.mark.parametrize("expr", ["~" * 500 + "(N > 1)", "not " * 500 + "N > 1", "N > " + "-" * 500 + "1",
                                  "(" * 3000 + "N > 1" + ")" * 3000, "\ud800 > 1", "N > 'x'", "N" * 20000])
def test_where_never_tracebacks(expr):
    import pandas as pd

    from scaling.errors import UsageError
    from scaling.fit import where

    with pytest.raises(UsageError, match="^--where: "):
        where.apply(pd.DataFrame({"N": [1.0, 2.0]}), expr)


def test_where_reads_nullable_columns():
    import pandas as pd

    from scaling.fit import where

    df = pd.DataFrame({"i": pd.array([1, None, 3], dtype="Int64"), "s": pd.array(["a", None, "b"], dtype="string")})
    assert list(where.row_mask(df, "i in [1, 3]")) == [True, False, True]
    assert list(where.row_mask(df, "s != 'b' and i >= 1")) == [True, False, False]


def test_where_keeps_what_it_says_and_refuses_an_empty_result(tmp_path, capsys):
    from scaling.fit import io

    table = tmp_path / "t.csv"
    table.write_text("N,loss,tag\n1,3.0,a\n2,2.5,b\n3,2.0,a\n")
    df, _ = io.load_table(table, where="tag in ['a'] and not (N < 2) or loss == 2.5")
    assert list(df["N"]) == [2, 3]
    df, _ = io.load_table(table, where="(1 < N <= 3) & (tag != 'b')")
    assert list(df["N"]) == [3]
    assert main(["fit", str(table), "--law", "powerlaw", "--x", "N", "--where", "N > 10"]) == 2
    assert "keeps none of the 3 rows" in capsys.readouterr().err


@pytest.mark.parametrize("resources", [
    {"extra": {"output": "/tmp/elsewhere"}},
    {"partition": "gpu\ntouch {x}\n#"},
    {"extra": {"comment": "ok\ntouch {x}"}},
    {"extra": {"comment\ntouch {x}": "1"}},
    {"partition": "gpu; touch {x}"},
])
def test_sweep_resources_cannot_inject_shell_lines(tmp_path, capsys, resources):
    x = tmp_path / "x"
    res = json.loads(json.dumps(resources).replace("{x}", str(x)))
    raw = {"name": "inj", "experiment": "dense", "buckets": [1e11], "resources": res}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(p), "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep.resources." in err[0]
    assert not x.exists()


def test_slurm_paths_and_python_built_resources_are_checked_too(tmp_path):
    from scaling.config import ConfigError
    from scaling.sweep import launch, spec

    with pytest.raises(ConfigError, match="must be one line"):
        launch.run_slurm(tmp_path / "a\ntouch x" / "sweep", [], cluster="debug", progress=False)
    bad = spec.Resources(extra=(("comment", "a\nb"),))
    with pytest.raises(ConfigError, match="resources.extra.comment"):
        launch.slurm_parameters(bad)


def test_a_restore_failure_with_intact_checksums_keeps_the_checkpoint(tmp_path, reference, monkeypatch):
    import orbax.checkpoint as ocp

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    (out / "summary.json").unlink()

    def exhausted(self, *a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while restoring")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", exhausted)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        loop.run(tiny(), out)
    assert (out / "ckpt" / "40").is_dir() and not (out / "ckpt_corrupt").exists()  # nothing set aside


# ---------------------------------------------------------------------------------------------
# bad values that used to train, and tracebacks that are now one line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--set", "model.vocab_size=100"], "model.vocab_size: 100 is below the data's vocabulary (256 byte tokens"),
    (["--set", "data.source=synthetic", "--set", "data.synthetic_vocab=64", "--set", "model.vocab_size=32"],
     "model.vocab_size: 32 is below the data's vocabulary (data.synthetic_vocab=64"),
    (["--set", "model.d_model=16384", "--set", "model.n_layers=48", "--set", "model.n_heads=64", "--set", "budget.steps=10"],
     "model: a training step needs about"),
])
def test_bad_values_refused_in_one_line(tmp_path, capsys, argv, message):
    assert main(["train", "--no-progress", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_config_files_that_contradict_themselves_are_refused(tmp_path, capsys):
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"budget": {"flops": 1e12, "steps": 10}}))
    assert main(["train", "--config", str(two), "--out", str(tmp_path / "a")]) == 2
    assert "sets 2 budgets (budget.flops, budget.steps)" in capsys.readouterr().err
    moe = tmp_path / "moe.json"
    moe.write_text(json.dumps({"experiment": "moe"}))
    assert main(["train", "--experiment", "dense", "--config", str(moe), "--out", str(tmp_path / "b")]) == 2
    assert "--experiment: dense disagrees with experiment='moe'" in capsys.readouterr().err


def test_grid_values_are_typed_before_hashing(tmp_path, capsys):
    raw = {"name": "g", "experiment": "dense", "buckets": [1e11], "grid": {"lr": ["1e-3", 0.001]}}
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(p), "--plan"]) == 2
    assert "sweep.grid.lr: repeats a value" in capsys.readouterr().err
    from scaling.sweep import spec

    sp = spec.parse({**raw, "grid": {"lr": ["1e-3", 3e-3]}})
    assert dict(sp.grid)["lr"] == (0.001, 0.003)
    assert sorted(t.describe()["lr"] for t in spec.trials(sp)) == [0.001, 0.003]


def test_warmup_longer_than_the_run_is_said_with_the_numbers(tmp_path, capfd):
    loop.run(experiments.get("dense").with_overrides([*TINY, "budget.steps=6", "optim.warmup_steps=50"]), tmp_path / "w")
    err = capfd.readouterr().err
    assert "optim.warmup_steps: 50 is longer than the run's 6 steps" in err
    assert json.loads((tmp_path / "w" / "config.json").read_text())["resolved"]["warnings"]


def test_one_line_for_broken_pipes_file_outs_and_umask_for_teammates(tmp_path, capsys):
    r = subprocess.run(f"{sys.executable} -m scaling.cli sweep quickstart --plan | head -1", shell=True,
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == "", r.stderr
    f = tmp_path / "a_file"
    f.write_text("")
    assert main(["sweep", "quickstart", "--out", str(f)]) == 2
    assert "--out: " in capsys.readouterr().err
    # the sweep's own files are readable by the group and others under the usual umask
    from scaling.sweep import spec

    old = os.umask(0o022)
    try:
        sp = spec.load("quickstart")
        ts = spec.trials(sp)[:1]
        store.write_manifest(tmp_path / "s", sp, ts)
        store.mark(tmp_path / "s", ts[0].id, "failed", "x")
    finally:
        os.umask(old)
    for name in ("manifest.json", f"{ts[0].id}/trial.json", f"{ts[0].id}/status.json", "events.jsonl"):
        assert (tmp_path / "s" / name).stat().st_mode & 0o777 == 0o644, name
