"""The local sweep backend: ``jobs`` long-lived worker processes on this machine.

Workers are started as ``python -m scaling.sweep.local worker`` and fed jobs (lists of trial
ids: one trial, or a stack of same-shape trials, ``scaling.stacking``) over ``multiprocessing``
connections, answering one result dict per trial. A worker shares a persistent JAX compilation
cache with the others, so same-shape trials do not recompile. A trial that raises is recorded
``failed`` with its error and the worker goes on; a worker that dies (segfault, OOM kill) is
recorded against its trials and replaced. Workers exit when the runner dies (a thread reads EOF
on a lifeline pipe), and every trial is trained under a kernel lock, so a killed runner can
simply be rerun. What one trial's life is (lease, record, resume) lives in
``scaling.sweep.launch``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from scaling import faults
from scaling.sweep import store
from scaling.sweep.launch import DEFAULT_RUN_FN, Progress, local_dir, run_stack, sweep_root
from scaling.train.cache import enable_compilation_cache


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
    """A worker process: receive jobs (lists of trial ids: one trial, or a stack) on the
    ``multiprocessing`` connection at ``conn_fd``, train each with its console output in the
    first trial's ``log.txt`` (a stack's other trials get a line pointing there), send one
    result dict per trial; ``None`` or a closed connection ends it. Long-lived, so same-shape
    trials reuse the warm compile cache."""
    _exit_with_runner(lifeline_fd)
    conn = multiprocessing.connection.Connection(conn_fd)
    enable_compilation_cache()
    while True:
        try:
            ids = conn.recv()
        except (EOFError, OSError):
            return 0
        if ids is None:
            return 0
        logs = [local_dir(sweep_dir) / tid / "log.txt" for tid in ids]
        for log in logs[1:]:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"trained stacked with {len(ids) - 1} other trials: console output in {logs[0]}\n")
        with _output_to(logs[0]):
            try:
                results = run_stack(sweep_dir, ids, run_fn)
            except Exception as err:  # the store itself failed: report, keep the worker alive
                traceback.print_exc()
                results = {tid: {"state": "failed", "error": f"{type(err).__name__}: {err}"} for tid in ids}
        for tid in ids:
            res = results.get(tid) or {"state": "failed", "error": "no result"}
            conn.send(json.loads(json.dumps({"trial_id": tid, **res}, default=str)))  # plain data only


class _Worker:
    """A worker started as ``python -m scaling.sweep.local worker`` (not by multiprocessing's
    spawn, which re-runs the runner's main script in the child: a notebook run as a script
    would run again in every worker), talking over a ``multiprocessing`` connection."""

    def __init__(self, idx: int, sweep_dir: Path, run_fn: str):
        self.idx = idx
        self.conn, child = multiprocessing.Pipe()
        lifeline_r, self._lifeline_w = os.pipe()  # the write end stays here (not inherited)
        fds = (child.fileno(), lifeline_r)
        self.proc = subprocess.Popen([sys.executable, "-m", "scaling.sweep.local", "worker", str(sweep_dir), run_fn,
                                      *map(str, fds)], pass_fds=fds)
        child.close()
        os.close(lifeline_r)
        self.trials: list[str] = []  # what it is training (a stack: several)

    def give(self, trial_ids: list[str]) -> None:
        self.trials = list(trial_ids)
        try:
            self.conn.send(list(trial_ids))
        except OSError:  # the worker died just now: its death event records the trials and replaces it
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


def stack_width(mode: str | int, probe=None) -> int:
    """Trials per stack for ``--stack`` (``scaling.stacking.parse_stack``'s value): 1 for off,
    ``K`` as given, and for ``auto`` ``stacking.AUTO_WIDTH`` on an accelerator and 1 on a
    CPU-only machine, where one training step already keeps the cores busy and stacking was
    measured slower (``scaling bench stack``: 0.85x). ``probe()`` names the JAX backend the
    workers will see (default: asked of a short-lived process, so the runner never holds an
    accelerator)."""
    from scaling import stacking

    if mode != "auto":
        return int(mode)
    backend = (probe or jax_backend)()
    return stacking.AUTO_WIDTH if backend not in ("cpu", None) else 1


def jax_backend() -> str | None:
    """The JAX backend a worker process on this machine gets (None when it cannot be told)."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return "cpu"
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # look, do not take the memory
    try:
        out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], env=env,
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None


def plan_jobs(trials: list, width: int) -> list[list[str]]:
    """The jobs of a local run: ``scaling.stacking.groups`` over every trial given (finished
    ones too, so a rerun keeps each trial's companions), each group in the order given."""
    from scaling import stacking

    return stacking.groups([(t.id, t.config) for t in trials], width)


def run_local(sweep_dir: str | Path, trials: list, *, jobs: int = 1, run_fn: str = DEFAULT_RUN_FN,
              progress: bool = True, stream=None, stack: int = 1) -> dict:
    """Run ``trials`` (already in the sweep's manifest) with ``jobs`` worker processes, same-shape
    trials in stacks of up to ``stack`` (``stack_width``; 1: one at a time); WSD branches start
    once their main run is done. Returns the final state counts."""
    sweep_dir = sweep_root(sweep_dir)
    prog = Progress(sweep_dir, trials, stream=stream, enabled=progress)
    by_id = {t.id: t for t in trials}
    # a stack keeps its finished trials: they ride along as ghost lanes (scaling.train.stacked_run)
    todo = [job for job in plan_jobs(trials, stack) if any(prog.state[tid] not in store.FINAL for tid in job)]
    for job in todo:
        for tid in job:
            if prog.state[tid] not in store.FINAL:
                prog.state[tid] = "pending"
    prog.show(force=True)
    if not todo:
        prog.close()
        return prog.counts()
    workers = [_Worker(i, sweep_dir, run_fn) for i in range(min(jobs, len(todo)))]
    retry_at: dict[str, float] = {}
    idle_deaths = 0
    n_results = 0

    def ready(job: list[str]) -> bool:
        for tid in job:
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
        if not w.trials:
            idle_deaths += 1
            if idle_deaths > 2 * len(workers):
                raise RuntimeError(f"sweep workers keep exiting (status {rc}) before training anything; see the messages above")
        for tid in w.trials:
            st, _ = store.trial_state(sweep_dir / tid)
            if st not in store.FINAL:
                store.mark(sweep_dir, tid, "failed", f"worker process died (exit status {rc}) while training")
                st = "failed"
            prog.set(tid, st)
        w.trials = []
        w.release()
        workers[workers.index(w)] = _Worker(w.idx, sweep_dir, run_fn)

    def finished(w: _Worker, res: dict) -> None:
        nonlocal n_results
        n_results += 1
        faults.point("sweep_result", n_results)
        tid, st = res["trial_id"], res["state"]
        if tid in w.trials:
            w.trials.remove(tid)
        if st == "waiting" and not (by_id[tid].main in by_id and prog.state[by_id[tid].main] not in store.FINAL):
            err = f"main run {by_id[tid].main} is not part of this sweep run; run it too (drop --only)"
            store.mark(sweep_dir, tid, "failed", err)
            st = "failed"
        if st in ("busy", "waiting"):  # someone else has it / its main run is not finished
            todo.append([tid])
            retry_at[tid] = time.time() + 1.0
            st = "running" if st == "busy" else "pending"
        prog.set(tid, st)

    try:
        while todo or any(w.trials for w in workers):
            for w in workers:
                if not w.trials and w.proc.poll() is None:
                    nxt = next((job for job in todo if ready(job)), None)
                    if nxt is None:
                        break
                    todo.remove(nxt)
                    w.give(nxt)
                    for tid in nxt:
                        if prog.state[tid] not in store.FINAL:
                            prog.set(tid, "running")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 5 and argv[0] == "worker":
        return worker_main(argv[1], argv[2], int(argv[3]), int(argv[4]))
    print("usage: python -m scaling.sweep.local worker SWEEP_DIR MODULE:FUNCTION CONN_FD LIFELINE_FD "
          "(started by the local sweep backend)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
