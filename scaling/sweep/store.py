"""The sweep store: one directory per sweep, one sub-directory per trial, nothing ever lost.

Layout::

    runs/<sweep>/manifest.json        spec copy + every trial (id, bucket, shape, grid values, config)
    runs/<sweep>/events.jsonl         append-only log of state changes (trial_id, state, pid, time)
    runs/<sweep>/<trial-id>/
        trial.json                    the trial's description (bucket, shape, grid values, role)
        status.json                   running | failed (+ error) as seen by the launcher
        config.json, metrics.jsonl, summary.json, ckpt/     written by scaling.train.loop.run
        lock                          flock held while a process trains the trial
        log.txt                       the trial's console output

A trial's state is ``done``/``diverged`` when its ``summary.json`` says so (final), ``running``
while some process holds its lock, ``failed`` when the last attempt raised (the error is kept)
and ``pending`` otherwise (never started, or interrupted: its checkpoints resume it).
Every JSON file is written atomically (temp file + ``os.replace``), so a kill at any moment
leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

STATES = ("pending", "running", "done", "diverged", "failed")
FINAL = ("done", "diverged")
MANIFEST = "manifest.json"
EVENTS = "events.jsonl"


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically: a reader sees the old or the new file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def read_json(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def append_line(path: str | Path, obj: dict) -> None:
    """Append one JSON line with a single O_APPEND write (atomic for lines under PIPE_BUF)."""
    line = (json.dumps(obj, sort_keys=True, default=_jsonable) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (a kill mid-write) is skipped."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return rows


# --------------------------------------------------------------------------------------------
# Trial state
# --------------------------------------------------------------------------------------------


class Busy(RuntimeError):
    """Another live process holds the trial's lock."""


class TrialLock:
    """Exclusive ``flock`` on ``<trial>/lock``. The kernel drops it when the holder dies, so a
    SIGKILLed runner never leaves a trial locked, and two runners never train one trial."""

    def __init__(self, trial_dir: str | Path):
        self.path = Path(trial_dir) / "lock"
        self.fd: int | None = None

    def __enter__(self) -> "TrialLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(str(self.path.parent)) from None
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def is_locked(trial_dir: str | Path) -> bool:
    try:
        with TrialLock(trial_dir):
            return False
    except Busy:
        return True


def trial_state(trial_dir: str | Path) -> tuple[str, str | None]:
    """(state, error) of a trial directory; see the module docstring for the rules."""
    d = Path(trial_dir)
    summary = read_json(d / "summary.json") or {}
    if summary.get("state") in FINAL:
        return summary["state"], summary.get("error")
    if (d / "lock").exists() and is_locked(d):
        return "running", None
    status = read_json(d / "status.json") or {}
    if status.get("state") == "failed" or summary.get("state") == "failed":
        return "failed", status.get("error") or summary.get("error")
    return "pending", None


def mark(sweep_dir: str | Path, trial_id: str, state: str, error: str | None = None, **extra) -> None:
    """Record a state change: ``status.json`` (atomic) and one line in ``events.jsonl``."""
    assert state in STATES, state
    sweep_dir = Path(sweep_dir)
    rec = {"trial_id": trial_id, "state": state, "error": error, "pid": os.getpid(), "host": socket.gethostname(),
           "time": time.time(), **extra}
    write_json(sweep_dir / trial_id / "status.json", rec)
    append_line(sweep_dir / EVENTS, rec)


def events(sweep_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(sweep_dir) / EVENTS)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def write_manifest(sweep_dir: str | Path, spec, trial_list: list, spec_path: str | None = None) -> dict:
    """Write ``manifest.json`` (spec copy + every trial) and each ``<trial>/trial.json``.

    Trials of an earlier version of the spec stay listed (marked ``"current": false``) so a
    changed spec never hides finished work.
    """
    from scaling import flops

    sweep_dir = Path(sweep_dir)
    old = read_json(sweep_dir / MANIFEST) or {}
    rows = {}
    for t in trial_list:
        pc = flops.param_counts(t.config.model)
        row = t.describe()
        row.update({"N_planned": pc.active_non_embedding, "N_total": pc.total, "D_planned":
                    (t.steps * t.config.tokens_per_step) if t.steps else None, "current": True,
                    "config": t.config.to_dict(), "resources": t.resources.__dict__})
        rows[t.id] = row
    for r in old.get("trials", []):
        if r["trial_id"] not in rows:
            rows[r["trial_id"]] = {**r, "current": False}
    manifest = {"name": spec.name, "experiment": spec.experiment, "strategy": spec.strategy, "spec_path": spec_path,
                "spec": spec.raw, "updated": time.time(), "trials": list(rows.values())}
    write_json(sweep_dir / MANIFEST, manifest)
    for t in trial_list:
        if not (sweep_dir / t.id / "trial.json").exists():
            write_json(sweep_dir / t.id / "trial.json", rows[t.id])
    return manifest


def read_manifest(sweep_dir: str | Path) -> dict:
    m = read_json(Path(sweep_dir) / MANIFEST)
    if m is None:
        from scaling.cli import UsageError

        raise UsageError(f"{sweep_dir}: not a sweep directory (no {MANIFEST}); run `scaling sweep SPEC --out {sweep_dir}` first")
    return m


# --------------------------------------------------------------------------------------------
# Loading into DataFrames (the fitter's input)
# --------------------------------------------------------------------------------------------

TRIAL_COLUMNS = ["trial_id", "state", "error", "N", "D", "C", "loss", "N_total", "N_active", "N_embedding", "flops_6n",
                 "bucket", "bucket_kind", "variant", "experiment", "shape", "d_model", "n_layers", "n_heads", "batch",
                 "seq_len", "lr", "E", "G", "capacity", "seed", "target_params", "steps", "final_train_loss",
                 "tokens_per_s", "mfu", "wall_s", "epochs", "role", "main", "branch_step", "name"]


def _trial_dirs(path: Path) -> Iterator[tuple[Path, dict]]:
    """(trial_dir, description) for a sweep dir (via its manifest) or a single run dir."""
    m = read_json(path / MANIFEST)
    if m is not None:
        for row in m["trials"]:
            yield path / row["trial_id"], row
    elif (path / "summary.json").exists() or (path / "config.json").exists():
        yield path, read_json(path / "trial.json") or {"trial_id": path.name}
    else:
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            if (sub / "trial.json").exists() or (sub / "summary.json").exists():
                yield sub, read_json(sub / "trial.json") or {"trial_id": sub.name}


def _nan(x):
    return math.nan if x is None else x


def load(path: str | Path) -> pd.DataFrame:
    """One row per trial: ``N`` (active non-embedding params), ``D`` (training tokens), ``C``
    (counted training FLOPs), ``loss`` (final eval loss, nats), ``state``, and the trial's
    settings (bucket FLOPs, shape, batch, lr, E, G, capacity, seed, ...). Trials that are not
    done carry their planned N and NaN for D, C and loss; fitters keep ``state == "done"``."""
    path = Path(path)
    if not path.is_dir():
        from scaling.cli import UsageError

        raise UsageError(f"{path}: no such sweep directory")
    rows = []
    for d, desc in _trial_dirs(path):
        s = read_json(d / "summary.json") or {}
        state, error = trial_state(d)
        row = {k: desc.get(k) for k in TRIAL_COLUMNS if k in desc}
        row.update(trial_id=desc.get("trial_id", d.name), state=state, error=error,
                   N=s.get("N", desc.get("N_planned")), N_total=s.get("N_total", desc.get("N_total")),
                   N_active=s.get("N_active"), N_embedding=s.get("N_embedding"),
                   D=_nan(s.get("D", s.get("tokens"))), C=_nan(s.get("C", s.get("flops"))),
                   loss=_nan(s.get("final_eval_loss")), flops_6n=_nan(s.get("flops_6n")),
                   final_train_loss=_nan(s.get("final_train_loss")), tokens_per_s=_nan(s.get("tokens_per_s")),
                   mfu=_nan(s.get("mfu")), wall_s=_nan(s.get("wall_s")), epochs=_nan(s.get("epochs")),
                   steps=s.get("steps", desc.get("steps")))
        if "d_model" in desc:
            row["shape"] = f"d{desc['d_model']}L{desc['n_layers']}"
        for k, v in desc.items():  # grid tags beyond the standard columns (e.g. a dotted key)
            if k not in row and k not in ("config", "resources", "group", "planned_flops"):
                row[k] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=TRIAL_COLUMNS)
    for c in ("N", "D", "C", "loss", "N_total", "N_active", "N_embedding", "flops_6n", "final_train_loss",
              "tokens_per_s", "mfu", "wall_s", "epochs"):
        if c in df:  # summaries write non-finite floats as strings ("nan")
            df[c] = pd.to_numeric(df[c], errors="coerce")
    cols = [c for c in TRIAL_COLUMNS if c in df.columns] + [c for c in df.columns if c not in TRIAL_COLUMNS]
    return df[cols].reset_index(drop=True)


STEP_COLUMNS = ["trial_id", "step", "tokens", "flops", "C", "loss", "eval_loss", "lr", "grad_norm", "gns_b_small",
                "gns_b_big", "gns_g_small_sq", "gns_g_big_sq", "tokens_per_s", "wall_s"]


def load_steps(path: str | Path) -> pd.DataFrame:
    """One row per logged step of every trial: ``trial_id, step, tokens, flops`` (= ``C``,
    cumulative training FLOPs), ``loss``, ``eval_loss`` (NaN off eval steps), ``lr``, the
    gradient-noise-scale statistics, plus the trial's ``N, batch, bucket, peak_lr, seed, shape``.
    A step logged twice (a resumed run repeating steps after its last checkpoint) appears once:
    the last write wins."""
    path = Path(path)
    frames = []
    for d, desc in _trial_dirs(path):
        rows = read_jsonl(d / "metrics.jsonl")
        if not rows:
            continue
        # the trainer writes non-finite floats as strings ("nan", "inf"): make them numbers again
        f = pd.DataFrame(rows).replace({"nan": math.nan, "inf": math.inf, "-inf": -math.inf})
        for c in f.columns[f.dtypes == object]:
            try:
                f[c] = pd.to_numeric(f[c])
            except (TypeError, ValueError):
                pass  # a genuinely non-numeric column
        f = f.drop_duplicates(subset="step", keep="last").sort_values("step")
        f.insert(0, "trial_id", desc.get("trial_id", d.name))
        if "flops" in f:
            f["C"] = f["flops"]
        s = read_json(d / "summary.json") or {}
        for k, v in (("N", s.get("N", desc.get("N_planned"))), ("batch", desc.get("batch")), ("bucket", desc.get("bucket")),
                     ("peak_lr", desc.get("lr")), ("seed", desc.get("seed")), ("variant", desc.get("variant")),
                     ("shape", f"d{desc['d_model']}L{desc['n_layers']}" if "d_model" in desc else None)):
            f[k] = v
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=STEP_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    for c in STEP_COLUMNS:
        if c not in df:
            df[c] = math.nan
    cols = STEP_COLUMNS + [c for c in df.columns if c not in STEP_COLUMNS]
    return df[cols].reset_index(drop=True)
