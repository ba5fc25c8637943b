"""Run a sweep's trials on a backend, resumably, recording every outcome.

Backends:

- ``local``: ``jobs`` long-lived worker processes (``python -m scaling.sweep.launch worker``,
  talking over ``multiprocessing`` connections), each training one trial at a time. A worker
  shares a persistent JAX compilation cache with the others, so same-shape trials do not
  recompile. A trial that raises is recorded ``failed`` with its error
  and the worker goes on; a worker that dies (segfault, OOM kill) is recorded against its trial
  and replaced. Workers exit when the runner dies (a thread reads EOF on a lifeline pipe), and
  every trial is trained under a kernel lock, so a killed runner can simply be rerun.
- ``slurm``: submitit array jobs (one array per distinct ``resources`` block; WSD main runs
  first, then their branches). ``cluster="local"``/``"debug"`` run the same path without SLURM.

Resume = run again: done/diverged trials are skipped, interrupted ones continue from their
checkpoints (``scaling.train.loop.run`` restores ``<trial>/ckpt``), failed ones are retried.

Over 400 lines: one trial's life (lease, record, resume) and the two backends that run it share
the store protocol; they change together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import multiprocessing
import multiprocessing.connection
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from scaling import faults, storage
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


def run_trial(sweep_dir: str | Path, trial_id: str, run_fn: str = DEFAULT_RUN_FN, announce=None) -> dict:
    """Train one trial of the sweep under its lease (``scaling.lease``); return ``{"state", "error", "flops"}``.

    ``state`` is done/diverged/failed, ``busy`` (another live process holds it), or ``waiting``
    (a WSD branch whose main run has not finished). Never raises for a failing trial.
    ``announce(go: bool)`` (a multi-task trial's rank 0) is called exactly once, before the
    trainer starts (True) or when the trial will not train (False): the other ranks wait for it.
    """
    told = []

    def tell(go: bool) -> None:
        if announce is not None and not told:
            told.append(go)
            announce(go)

    sweep_dir = sweep_root(sweep_dir)
    d = sweep_dir / trial_id
    try:  # a store has no atomic lock: its trials are not leased (one runner per sweep)
        lock = RunLease(d).__enter__() if isinstance(d, Path) else contextlib.nullcontext()
    except RunDirBusy:
        tell(False)
        return {"state": "busy", "error": None}
    try:
        summary = read_json(d / "summary.json") or {}
        if summary.get("state") in store.FINAL:
            _record_final(sweep_dir, trial_id, summary["state"], summary.get("error"))
            return {"state": summary["state"], "error": summary.get("error"), "flops": summary.get("flops")}
        desc = read_json(d / "trial.json")
        cfg = trial_config(sweep_dir, desc)
        if desc.get("main"):  # a WSD branch starts once its main run is done
            main_state, _ = store.trial_state(sweep_dir / desc["main"])
            if main_state in ("pending", "running"):
                return {"state": "waiting", "error": None}
            if main_state != "done":
                err = f"main run {desc['main']} ended {main_state}; its cooldown branch cannot start"
                store.mark(sweep_dir, trial_id, "failed", err)
                return {"state": "failed", "error": err}
        attempt = 1 + sum(1 for e in store.events(sweep_dir) if e.get("trial_id") == trial_id and e.get("state") == "running")
        store.mark(sweep_dir, trial_id, "running", attempt=attempt)
        tell(True)
        try:
            summary = _import(run_fn)(cfg, d)
        except LeaseLost:  # another runner owns the trial now: write nothing into it
            return {"state": "busy", "error": None}
        except Exception as err:  # recorded, and the sweep goes on
            traceback.print_exc()
            msg = f"{type(err).__name__}: {err}".splitlines()[0][:500]
            store.mark(sweep_dir, trial_id, "failed", msg)
            return {"state": "failed", "error": msg}
        state = summary.get("state")
        if state not in store.FINAL:
            msg = summary.get("error") or f"trainer returned state {state!r}"
            store.mark(sweep_dir, trial_id, "failed", msg)
            return {"state": "failed", "error": msg}
        _record_final(sweep_dir, trial_id, state, summary.get("error"))
        return {"state": state, "error": summary.get("error"), "flops": summary.get("flops")}
    finally:
        tell(False)  # every path that did not train (a no-op after tell(True))
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
            if t.branch_step and t.flops_per_step:
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
# Local backend: worker processes
# --------------------------------------------------------------------------------------------


def _exit_with_runner(lifeline_fd: int) -> None:
    """Exit (status 1) as soon as the runner dies, even in the middle of a trial: a thread
    blocks on the read end of a pipe whose only write end the runner holds, and reads EOF when
    the runner is gone (any OS; it replaces Linux's ``PR_SET_PDEATHSIG``)."""

    def watch() -> None:
        while os.read(lifeline_fd, 1):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-runner", daemon=True).start()


@contextlib.contextmanager
def _output_to(log: Path):
    """File descriptors 1 and 2 into ``log`` for the block: Python's prints and what XLA, absl
    and other C++ code write to the descriptors directly (``contextlib.redirect_stdout`` would
    catch only the former)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def worker_main(sweep_dir: str, run_fn: str, conn_fd: int, lifeline_fd: int) -> int:
    """A worker process: receive trial ids on the ``multiprocessing`` connection at ``conn_fd``,
    train each with its console output in ``<trial>/log.txt``, send one result dict per trial;
    ``None`` or a closed connection ends it. Long-lived, so same-shape trials reuse the warm
    compile cache."""
    _exit_with_runner(lifeline_fd)
    conn = multiprocessing.connection.Connection(conn_fd)
    enable_compilation_cache()
    while True:
        try:
            tid = conn.recv()
        except (EOFError, OSError):
            return 0
        if tid is None:
            return 0
        with _output_to(local_dir(sweep_dir) / tid / "log.txt"):
            try:
                res = run_trial(sweep_dir, tid, run_fn)
            except Exception as err:  # the store itself failed: report, keep the worker alive
                traceback.print_exc()
                res = {"state": "failed", "error": f"{type(err).__name__}: {err}"}
        conn.send(json.loads(json.dumps({"trial_id": tid, **res}, default=str)))  # plain data only


class _Worker:
    """A worker started as ``python -m scaling.sweep.launch worker`` (not by multiprocessing's
    spawn, which re-runs the runner's main script in the child: a notebook run as a script
    would run again in every worker), talking over a ``multiprocessing`` connection."""

    def __init__(self, idx: int, sweep_dir: Path, run_fn: str):
        self.idx = idx
        self.conn, child = multiprocessing.Pipe()
        lifeline_r, self._lifeline_w = os.pipe()  # the write end stays here (not inherited)
        fds = (child.fileno(), lifeline_r)
        self.proc = subprocess.Popen([sys.executable, "-m", "scaling.sweep.launch", "worker", str(sweep_dir), run_fn,
                                      *map(str, fds)], pass_fds=fds)
        child.close()
        os.close(lifeline_r)
        self.trial: str | None = None

    def give(self, trial_id: str) -> None:
        self.trial = trial_id
        try:
            self.conn.send(trial_id)
        except OSError:  # the worker died just now: its death event records the trial and replaces it
            pass

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass

    def release(self) -> None:
        """Close the runner's ends (after the process is gone)."""
        self.conn.close()
        with contextlib.suppress(OSError):
            os.close(self._lifeline_w)


def _events(workers: list[_Worker], timeout: float) -> list[tuple[_Worker, dict | None]]:
    """Results the workers sent, and ``(worker, None)`` for each worker that died (after any
    result it sent first); waits up to ``timeout`` seconds for the first."""
    multiprocessing.connection.wait([w.conn for w in workers], timeout)
    out: list = []
    for w in workers:
        try:
            while w.conn.poll():
                out.append((w, w.conn.recv()))
        except (EOFError, OSError):
            out.append((w, None))
            continue
        if w.proc.poll() is not None:  # gone, its connection held open by a process it started
            out.append((w, None))
    return out


def run_local(sweep_dir: str | Path, trials: list, *, jobs: int = 1, run_fn: str = DEFAULT_RUN_FN,
              progress: bool = True, stream=None) -> dict:
    """Run ``trials`` (already in the sweep's manifest) with ``jobs`` worker processes; WSD
    branches start once their main run is done. Returns the final state counts."""
    sweep_dir = sweep_root(sweep_dir)
    prog = Progress(sweep_dir, trials, stream=stream, enabled=progress)
    by_id = {t.id: t for t in trials}
    todo = [t.id for t in trials if prog.state[t.id] not in store.FINAL]
    for tid in todo:
        prog.state[tid] = "pending"
    prog.show(force=True)
    if not todo:
        prog.close()
        return prog.counts()
    workers = [_Worker(i, sweep_dir, run_fn) for i in range(min(jobs, len(todo)))]
    retry_at: dict[str, float] = {}
    idle_deaths = 0
    n_results = 0

    def ready(tid: str) -> bool:
        t = by_id[tid]
        if retry_at.get(tid, 0) > time.time():
            return False
        if t.main and t.main in by_id and prog.state[t.main] not in ("done", "diverged", "failed"):
            return False
        return True

    def died(w: _Worker) -> None:
        """A worker died: what it was training is recorded, and it is replaced."""
        nonlocal idle_deaths
        rc = w.proc.wait()
        if w.trial is None:
            idle_deaths += 1
            if idle_deaths > 2 * len(workers):
                raise RuntimeError(f"sweep workers keep exiting (status {rc}) before training anything; see the messages above")
        else:
            st, _ = store.trial_state(sweep_dir / w.trial)
            if st not in store.FINAL:
                store.mark(sweep_dir, w.trial, "failed", f"worker process died (exit status {rc}) while training")
                st = "failed"
            prog.set(w.trial, st)
            w.trial = None
        w.release()
        workers[workers.index(w)] = _Worker(w.idx, sweep_dir, run_fn)

    def finished(w: _Worker, res: dict) -> None:
        nonlocal n_results
        n_results += 1
        faults.point("sweep_result", n_results)
        tid, st = res["trial_id"], res["state"]
        w.trial = None
        if st == "waiting" and not (by_id[tid].main in by_id and prog.state[by_id[tid].main] not in store.FINAL):
            err = f"main run {by_id[tid].main} is not part of this sweep run; run it too (drop --only)"
            store.mark(sweep_dir, tid, "failed", err)
            st = "failed"
        if st in ("busy", "waiting"):  # someone else has it / its main run is not finished
            todo.append(tid)
            retry_at[tid] = time.time() + 1.0
            st = "running" if st == "busy" else "pending"
        prog.set(tid, st)

    try:
        while todo or any(w.trial for w in workers):
            for w in workers:
                if w.trial is None and w.proc.poll() is None:
                    nxt = next((tid for tid in todo if ready(tid)), None)
                    if nxt is None:
                        break
                    todo.remove(nxt)
                    w.give(nxt)
                    prog.set(nxt, "running")
            events = _events(workers, timeout=1.0)
            if not events:
                prog.show()
            for w, res in events:
                if res is None:
                    died(w)
                else:
                    finished(w, res)
    finally:
        for w in workers:
            w.stop()
        for w in workers:
            try:
                w.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.release()
        prog.close()
    return prog.counts()


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 5 and argv[0] == "worker":
        return worker_main(argv[1], argv[2], int(argv[3]), int(argv[4]))
    print("usage: python -m scaling.sweep.launch worker SWEEP_DIR MODULE:FUNCTION CONN_FD LIFELINE_FD "
          "(started by the local sweep backend)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
