"""Run a sweep's trials on a backend, resumably, recording every outcome.

Backends:

- ``local`` (``scaling.sweep.local``): ``jobs`` long-lived worker processes on this machine,
  each training one job at a time: one trial, or a stack of same-shape trials trained as one
  vmapped program (``run_stack``, ``--stack``).
- ``slurm``: submitit array jobs (one array per distinct ``resources`` block; WSD main runs
  first, then their branches), one trial per task. ``cluster="local"``/``"debug"`` run the
  same path without SLURM.

Resume = run again: done/diverged trials are skipped, interrupted ones continue from their
checkpoints (``scaling.train.loop.run`` restores ``<trial>/ckpt``), failed ones are retried.

Over 400 lines: one trial's life (lease, record, resume, a stack's trials) and the SLURM backend
that runs it share the store protocol; they change together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from scaling import storage
from scaling.config import TrainConfig
from scaling.errors import LeaseLost, RunDirBusy
from scaling.files import read_json, read_jsonl
from scaling.lease import RunLease
from scaling.progress import ProgressLine
from scaling.sweep import store
from scaling.train.cache import enable_compilation_cache

DEFAULT_RUN_FN = "scaling.train.loop:run"
BACKENDS = ("local", "slurm")


# --------------------------------------------------------------------------------------------
# One trial (runs inside a worker process or a submitit job)
# --------------------------------------------------------------------------------------------


def _import(spec: str) -> Callable:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "run")


def _record_final(sweep_dir: Path, trial_id: str, state: str, error: str | None, **extra) -> None:
    """Mark a final state exactly once in the event log (reruns that find it final add nothing)."""
    seen = any(e.get("trial_id") == trial_id and e.get("state") in store.FINAL for e in store.events(sweep_dir))
    if not seen:
        store.mark(sweep_dir, trial_id, state, error, **extra)


def trial_config(sweep_dir: Path, desc: dict) -> TrainConfig:
    """The config the trainer gets. A WSD branch's ``init_from`` names its main trial
    (``"<id>@<step>"``, so the trial id does not depend on where the sweep lives); the trainer
    needs that trial's directory."""
    cfg = TrainConfig.from_dict(desc["config"])
    if desc.get("main"):
        main_id, step = cfg.init_from.rsplit("@", 1)
        cfg = dataclasses.replace(cfg, init_from=f"{sweep_root(sweep_dir) / main_id}@{step}")
    return cfg


def sweep_root(sweep_dir):
    """The sweep directory: an absolute local path, or a ``StorePath`` for a URL."""
    p = storage.path(sweep_dir)
    return p.absolute() if isinstance(p, Path) else p


def local_dir(sweep_dir) -> Path:
    """Where a sweep keeps what must be on a filesystem (worker logs, submitit's job folder):
    the sweep directory itself, or for a sweep on an object store
    ``$SCALING_SWEEP_LOCAL_DIR/<name>`` (default ``~/.cache/scaling/sweeps/<name>``; for SLURM
    it must be on a filesystem the nodes share)."""
    root = sweep_root(sweep_dir)
    if isinstance(root, Path):
        return root
    base = Path(os.environ.get("SCALING_SWEEP_LOCAL_DIR") or Path.home() / ".cache" / "scaling" / "sweeps")
    return base / root.name


def _claim(sweep_dir: Path, trial_id: str):
    """Take a trial to train: ``(lock, config)``, or ``(None, result)`` when it will not train
    now (``busy``, already final, a WSD branch ``waiting`` for its main run, or ``failed``
    because that main run failed). The caller releases the lock."""
    d = sweep_dir / trial_id
    try:  # a store has no atomic lock: its trials are not leased (one runner per sweep)
        lock = RunLease(d).__enter__() if isinstance(d, Path) else contextlib.nullcontext()
    except RunDirBusy:
        return None, {"state": "busy", "error": None}
    try:
        summary = read_json(d / "summary.json") or {}
        if summary.get("state") in store.FINAL:
            _record_final(sweep_dir, trial_id, summary["state"], summary.get("error"))
            result = {"state": summary["state"], "error": summary.get("error"), "flops": summary.get("flops")}
        else:
            desc = read_json(d / "trial.json")
            cfg = trial_config(sweep_dir, desc)
            result = _main_run_gate(sweep_dir, trial_id, desc)
            if result is None:
                attempt = 1 + sum(1 for e in store.events(sweep_dir)
                                  if e.get("trial_id") == trial_id and e.get("state") == "running")
                store.mark(sweep_dir, trial_id, "running", attempt=attempt)
                return lock, cfg
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    lock.__exit__(None, None, None)
    return None, result


def _main_run_gate(sweep_dir: Path, trial_id: str, desc: dict) -> dict | None:
    """A WSD branch starts once its main run is done: None when it may start, else its result."""
    if not desc.get("main"):
        return None
    main_state, _ = store.trial_state(sweep_dir / desc["main"])
    if main_state in ("pending", "running"):
        return {"state": "waiting", "error": None}
    if main_state != "done":
        err = f"main run {desc['main']} ended {main_state}; its cooldown branch cannot start"
        store.mark(sweep_dir, trial_id, "failed", err)
        return {"state": "failed", "error": err}
    return None


def _outcome(sweep_dir: Path, trial_id: str, summary: dict) -> dict:
    """Record what the trainer returned for a trial; the result dict."""
    state = summary.get("state")
    if state not in store.FINAL:
        msg = summary.get("error") or f"trainer returned state {state!r}"
        store.mark(sweep_dir, trial_id, "failed", msg)
        return {"state": "failed", "error": msg}
    _record_final(sweep_dir, trial_id, state, summary.get("error"))
    return {"state": state, "error": summary.get("error"), "flops": summary.get("flops")}


def _failure(sweep_dir: Path, trial_id: str, err: BaseException) -> dict:
    msg = f"{type(err).__name__}: {err}".splitlines()[0][:500]
    store.mark(sweep_dir, trial_id, "failed", msg)
    return {"state": "failed", "error": msg}


def run_trial(sweep_dir: str | Path, trial_id: str, run_fn: str = DEFAULT_RUN_FN, announce=None) -> dict:
    """Train one trial of the sweep under its lease (``scaling.lease``); return ``{"state", "error", "flops"}``.

    ``state`` is done/diverged/failed, ``busy`` (another live process holds it), or ``waiting``
    (a WSD branch whose main run has not finished). Never raises for a failing trial.
    ``announce(go: bool)`` (a multi-task trial's rank 0) is called exactly once, before the
    trainer starts (True) or when the trial will not train (False): the other ranks wait for it.
    """
    sweep_dir = sweep_root(sweep_dir)
    try:
        lock, got = _claim(sweep_dir, trial_id)
    except BaseException:
        if announce is not None:  # the other ranks wait for word either way
            announce(False)
        raise
    if lock is None:
        if announce is not None:
            announce(False)
        return got
    try:
        if announce is not None:
            announce(True)
        try:
            summary = _import(run_fn)(got, sweep_dir / trial_id)
        except LeaseLost:  # another runner owns the trial now: write nothing into it
            return {"state": "busy", "error": None}
        except Exception as err:  # recorded, and the sweep goes on
            traceback.print_exc()
            return _failure(sweep_dir, trial_id, err)
        return _outcome(sweep_dir, trial_id, summary)
    finally:
        lock.__exit__(None, None, None)


def run_stack(sweep_dir: str | Path, trial_ids: list[str], run_fn: str = DEFAULT_RUN_FN) -> dict[str, dict]:
    """Train trials of one ``scaling.stacking.stack_key`` as one stack
    (``scaling.train.stacked_run``), each under its own lease and into its own directory;
    ``{trial_id: result}`` as ``run_trial``'s. When the group cannot stack after all (a
    ``ConfigError``: one process only, compiled settings, a bad trial) its trials train one at
    a time, so a bad one fails alone. Never raises for failing trials."""
    sweep_dir = sweep_root(sweep_dir)
    if run_fn != DEFAULT_RUN_FN or len(trial_ids) == 1:  # another trainer trains one trial at a time
        return {tid: run_trial(sweep_dir, tid, run_fn) for tid in trial_ids}
    from scaling.config import ConfigError
    from scaling.train.stacked_run import run_stacked

    results: dict[str, dict] = {}
    claimed: list[tuple[str, object, TrainConfig]] = []
    lanes: list[tuple[str, TrainConfig]] = []  # in the group's order: claimed trials and finished ones
    try:
        for tid in trial_ids:
            try:
                lock, got = _claim(sweep_dir, tid)
                if lock is None and got["state"] in store.FINAL:  # rides along as a ghost lane
                    lanes.append((tid, trial_config(sweep_dir, read_json(sweep_dir / tid / "trial.json"))))
            except Exception as err:  # this trial's record is broken: it fails alone
                traceback.print_exc()
                results[tid] = _failure(sweep_dir, tid, err)
                continue
            if lock is None:
                results[tid] = got
            else:
                claimed.append((tid, lock, got))
                lanes.append((tid, got))
        if not claimed:
            return results
        print(f"training {len(claimed)} trials stacked: {', '.join(t for t, _, _ in claimed)}"
              + (f" ({len(lanes) - len(claimed)} finished ones ride along)" if len(lanes) > len(claimed) else ""),
              file=sys.stderr)
        try:
            summaries = run_stacked([c for _, c in lanes], [sweep_dir / t for t, _ in lanes])
        except ConfigError as err:
            print(f"cannot stack them ({err}); training them one at a time", file=sys.stderr)
            for tid, lock, _ in claimed:
                lock.__exit__(None, None, None)
            ids, claimed = [t for t, _, _ in claimed], []
            for tid in ids:
                results[tid] = run_trial(sweep_dir, tid, run_fn)
            return results
        except LeaseLost:
            return {**results, **{t: {"state": "busy", "error": None} for t, _, _ in claimed}}
        except Exception as err:
            traceback.print_exc()
            for tid, _, _ in claimed:  # lanes that finished before the error keep their outcome
                summary = read_json(sweep_dir / tid / "summary.json") or {}
                final = summary.get("state") in store.FINAL
                results[tid] = _outcome(sweep_dir, tid, summary) if final else _failure(sweep_dir, tid, err)
            return results
        by_id = dict(zip([t for t, _ in lanes], summaries))
        for tid, _, _ in claimed:
            results[tid] = _outcome(sweep_dir, tid, by_id[tid])
        return results
    finally:
        for _, lock, _ in claimed:
            lock.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class Progress:
    """Counts of trial states and FLOPs spent vs. planned, shown as one live line
    (``scaling.progress.ProgressLine``)."""

    def __init__(self, sweep_dir: Path, trials: list, stream=None, enabled: bool = True):
        self.sweep_dir = sweep_dir
        self.trials = {t.id: t for t in trials}
        self.planned = sum(t.planned_flops or 0.0 for t in trials)
        self.state = {t.id: store.trial_state(sweep_dir / t.id)[0] for t in trials}
        self.enabled = enabled
        self.display = ProgressLine(None, enabled=enabled, stream=stream, interval_s=30.0)
        self._last_key: tuple = ()
        self._final_flops: dict[str, float] = {}

    def set(self, trial_id: str, state: str) -> None:
        self.state[trial_id] = state
        self.show()

    def spent(self) -> float:
        """FLOPs computed so far by this sweep's trials (finished ones: their plan; running
        ones: the last logged FLOP count minus what a branch inherited)."""
        total = 0.0
        for tid, st in self.state.items():
            t = self.trials[tid]
            if st in store.FINAL:
                if tid not in self._final_flops:  # read once: finished trials do not change
                    s = read_json(self.sweep_dir / tid / "summary.json") or {}
                    self._final_flops[tid] = s.get("flops", t.planned_flops or 0.0)
                done = self._final_flops[tid]
            else:
                rows = read_jsonl(self.sweep_dir / tid / "metrics.jsonl")[-1:]
                done = rows[0].get("flops", 0.0) if rows else 0.0
            # a WSD/CBS branch's FLOPs count from step 0 of its main run; an upcycled one's from its own
            if t.branch_step and t.flops_per_step and t.config.init.upcycle == "none":
                done = max(0.0, done - t.branch_step * t.flops_per_step)
            total += min(done, t.planned_flops or done)
        return total

    def line(self) -> str:
        counts = {s: 0 for s in store.STATES}
        for s in self.state.values():
            counts[s] = counts.get(s, 0) + 1
        n = len(self.state)
        frac = self.spent() / self.planned if self.planned else 0.0
        return (f"[sweep] {counts['done'] + counts['diverged']}/{n} finished (done {counts['done']}, diverged "
                f"{counts['diverged']}), running {counts['running']}, failed {counts['failed']}, pending "
                f"{counts['pending']} | compute {self.spent():.3g}/{self.planned:.3g} FLOPs ({100 * frac:.0f}%)")

    def show(self, force: bool = False) -> None:
        """Redraw the line; a log file gets one when a trial changes state, else every 30 s."""
        if not self.enabled:
            return
        key = tuple(sorted(self.counts().items()))
        self.display.update(self.line(), force=force or key != self._last_key)
        self._last_key = key

    def close(self) -> None:
        self.display.close()

    def counts(self) -> dict:
        out = {s: 0 for s in store.STATES}
        for s in self.state.values():
            out[s] += 1
        return out


# --------------------------------------------------------------------------------------------
# SLURM backend (submitit)
# --------------------------------------------------------------------------------------------


def _submitit_trial(sweep_dir: str, trial_id: str, run_fn: str) -> dict:
    """Body of one array task. In a multi-host trial every task runs the trainer (which joins
    ``jax.distributed``); only rank 0 touches the store."""
    import submitit

    enable_compilation_cache()
    try:
        env = submitit.JobEnvironment()
        rank, n = env.global_rank, env.num_tasks
    except RuntimeError:  # DebugExecutor runs in-process without a job environment
        rank, n = 0, 1
    if n == 1:
        return run_trial(sweep_dir, trial_id, run_fn)
    # every rank joins jax.distributed first, then learns from rank 0 whether the trial trains
    # (it may be finished, busy or a branch still waiting for its main run)
    from scaling.distributed import initialize_distributed

    initialize_distributed()
    if rank == 0:
        return run_trial(sweep_dir, trial_id, run_fn, announce=_broadcast_go)
    if not _broadcast_go(False):
        return {"state": "worker", "summary": None}
    root = sweep_root(sweep_dir)
    desc = read_json(root / trial_id / "trial.json")
    return {"state": "worker", "summary": _import(run_fn)(trial_config(root, desc), root / trial_id)}


def _broadcast_go(go: bool) -> bool:
    """Rank 0's ``go`` on every rank of a multi-task trial (the others' argument is ignored)."""
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(int(multihost_utils.broadcast_one_to_all(np.int32(1 if go else 0))))


def slurm_parameters(res) -> dict:
    """submitit AutoExecutor parameters for a ``Resources`` block (its values checked again
    here, since a block can be built in Python without the spec parser)."""
    from scaling.sweep.spec import check_resources

    check_resources(res)
    p = {"timeout_min": res.timeout_min, "nodes": res.nodes, "tasks_per_node": res.tasks_per_node,
         "cpus_per_task": res.cpus_per_task, "gpus_per_node": res.gpus_per_node}
    if res.mem_gb:
        p["mem_gb"] = res.mem_gb
    if res.partition:
        p["slurm_partition"] = res.partition
    if res.extra:
        p["slurm_additional_parameters"] = dict(res.extra)
    return p


def run_slurm(sweep_dir: str | Path, trials: list, *, run_fn: str = DEFAULT_RUN_FN, cluster: str | None = None,
              progress: bool = True, stream=None, poll_s: float = 5.0) -> dict:
    """Submit the unfinished trials as submitit array jobs and wait for them. ``cluster=None``
    lets submitit pick SLURM when ``sbatch`` exists; ``"local"``/``"debug"`` run without it."""
    import submitit

    sweep_dir = sweep_root(sweep_dir)
    from scaling.sweep.spec import slurm_value

    # the job name and the log folder (under the sweep directory) become #SBATCH lines too:
    # checking the whole path covers both
    slurm_value("--out", str(sweep_dir))
    job_name = sweep_dir.name
    prog = Progress(sweep_dir, trials, stream=stream, enabled=progress)
    executor = submitit.AutoExecutor(folder=local_dir(sweep_dir) / ".submitit" / "%j", cluster=cluster)
    todo = [t for t in trials if prog.state[t.id] not in store.FINAL]
    waves = [[t for t in todo if t.role != "branch"], [t for t in todo if t.role == "branch"]]
    try:
        for wave in waves:
            groups: dict = {}
            for t in wave:
                groups.setdefault(t.resources, []).append(t)
            jobs = []
            for res, group in groups.items():
                executor.update_parameters(name=job_name, **slurm_parameters(res))
                ids = [t.id for t in group]
                futures = executor.map_array(_submitit_trial, [str(sweep_dir)] * len(ids), ids, [run_fn] * len(ids))
                jobs.extend(zip(ids, futures))
                for tid in ids:
                    prog.set(tid, "running")
            pending = dict(jobs)
            while pending:
                for tid, job in list(pending.items()):
                    if not job.done():
                        continue
                    try:
                        res_ = job.result()
                        st = res_.get("state", "failed") if isinstance(res_, dict) else "failed"
                    except Exception as err:  # job crashed, timed out or was cancelled
                        st, _ = store.trial_state(sweep_dir / tid)
                        if st not in store.FINAL:
                            store.mark(sweep_dir, tid, "failed", f"job {job.job_id}: {type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}"[:500])
                            st = "failed"
                    if st in ("busy", "waiting"):
                        st = store.trial_state(sweep_dir / tid)[0]
                    prog.set(tid, st)
                    del pending[tid]
                if pending:
                    time.sleep(poll_s)
                    prog.show()
    finally:
        prog.close()
    return prog.counts()
