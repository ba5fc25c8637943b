"""The sweep store: one directory per sweep, one sub-directory per trial, nothing ever lost.

Layout::

    runs/<sweep>/manifest.json        spec copy + every trial (id, bucket, shape, grid values, config)
    runs/<sweep>/events.jsonl         append-only log of state changes (trial_id, state, pid, time)
    runs/<sweep>/<trial-id>/
        trial.json                    the trial's description (bucket, shape, grid values, role)
        status.json                   running | failed (+ error) as seen by the launcher
        config.json, metrics.jsonl, summary.json, ckpt/     written by scaling.train.loop.run
        lock                          the run-directory lease (scaling.lease) while a process trains it
        log.txt                       the trial's console output

This module writes the store; reading it into tables (``load``, ``load_steps``,
``trial_state``) belongs to ``scaling.runs`` and is re-exported here. A trial's state is
``done``/``diverged`` when its ``summary.json`` says so (final), ``running`` while a live process
holds its lease, ``failed`` when the last attempt raised (the error is kept) and ``pending``
otherwise (never started, or interrupted: its checkpoints resume it). Every JSON file is written
atomically (``scaling.files``), so a kill at any moment leaves either the old or the new file.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from scaling import storage
from scaling.errors import UsageError
from scaling.files import append_jsonl, read_json, read_jsonl, write_json_atomic
from scaling.runs import FINAL, MANIFEST, STATES, STEP_COLUMNS, TRIAL_COLUMNS, load, load_steps, trial_state  # noqa: F401

EVENTS = "events.jsonl"


# --------------------------------------------------------------------------------------------
# Trial state
# --------------------------------------------------------------------------------------------


def mark(sweep_dir: str | Path, trial_id: str, state: str, error: str | None = None, **extra) -> None:
    """Record a state change: ``status.json`` (atomic) and one line in ``events.jsonl``."""
    assert state in STATES, state
    sweep_dir = storage.path(sweep_dir)
    rec = {"trial_id": trial_id, "state": state, "error": error, "pid": os.getpid(), "host": socket.gethostname(),
           "time": time.time(), **extra}
    write_json_atomic(sweep_dir / trial_id / "status.json", rec)
    append_jsonl(sweep_dir / EVENTS, rec)


def events(sweep_dir: str | Path) -> list[dict]:
    return read_jsonl(storage.path(sweep_dir) / EVENTS)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def write_manifest(sweep_dir: str | Path, spec, trial_list: list, spec_path: str | None = None) -> dict:
    """Write ``manifest.json`` (spec copy + every trial) and each ``<trial>/trial.json``.

    Trials of an earlier version of the spec stay listed (marked ``"current": false``) so a
    changed spec never hides finished work.
    """
    from scaling import flops

    sweep_dir = storage.path(sweep_dir)
    old = read_json(sweep_dir / MANIFEST) or {}
    rows = {}
    for t in trial_list:
        pc = flops.param_counts(t.config.model)
        row = t.describe()
        row.update({"N_planned": pc.active_non_embedding, "N_total": pc.total, "D_planned":
                    flops.tokens_for_steps(t.config, t.steps) if t.steps else None, "current": True,
                    "config": t.config.to_dict(), "resources": t.resources.__dict__})
        rows[t.id] = row
    for r in old.get("trials", []):
        if r["trial_id"] not in rows:
            rows[r["trial_id"]] = {**r, "current": False}
    manifest = {"name": spec.name, "experiment": spec.experiment, "strategy": spec.strategy, "spec_path": spec_path,
                "spec": spec.raw, "updated": time.time(), "trials": list(rows.values())}
    write_json_atomic(sweep_dir / MANIFEST, manifest)
    for t in trial_list:
        if not (sweep_dir / t.id / "trial.json").exists():
            write_json_atomic(sweep_dir / t.id / "trial.json", rows[t.id])
    return manifest


def read_manifest(sweep_dir: str | Path) -> dict:
    m = read_json(storage.path(sweep_dir) / MANIFEST)
    if m is None:
        raise UsageError(f"{sweep_dir}: not a sweep directory (no {MANIFEST}); run `scaling sweep SPEC --out {sweep_dir}` first")
    return m
