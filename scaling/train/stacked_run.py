"""``run_stacked(cfgs, outs)``: same-shape trials trained as one vmapped program, each into its
own run directory.

Every trial is a lane: a ``scaling.train.session.Session`` of its own (run directory lease,
config.json, its own data iterator and eval set, metrics.jsonl, checkpoints, summary.json,
wandb), exactly as ``scaling.train.loop.run`` would build it. Only the training step is shared:
``scaling.train.stack.make_stacked_train_step`` advances every lane by one step per call, on the
batch the lane's own iterator gives (the batches it would see alone). Logging, evaluation,
divergence checks and checkpoints stay per lane, on the lane's own schedule.

- A lane that diverges is recorded ``diverged`` and leaves the stack; the others go on.
- A lane whose budget is spent finishes (``done``) and leaves the stack.
- The stack's width is always the number of lanes still training, so after a restart (the
  finished lanes skipped, the others restored from their checkpoints) every remaining lane runs
  in a program of the same width it had at that step: the resumed result equals the
  uninterrupted one bit for bit (XLA may sum a lane's matmuls differently at another width, so
  the width must be a function of the lanes left, and it is).
- The one exception: a kill while some lanes had saved step ``s`` and others not yet; the lanes
  then resume from different steps and are still trained correctly, but at other widths than
  the uninterrupted stack, so equal to rounding rather than bitwise.

Versus a trial trained alone the numbers agree to float rounding, not bitwise (see
``scaling.train.stack``). Every lane records ``resolved.stacked`` (lanes, its lane) in
config.json and ``stacked`` in summary.json. A lane's ``tokens_per_s`` and MFU are its own
tokens over the stack's wall time, so the stack's throughput is their sum.

Not stacked (``ConfigError``): wall-clock budgets (one clock per trial), ``init_from`` branches,
batch schedules, multi-process runs, trials whose compiled settings differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from scaling import faults, storage
from scaling.config import ConfigError, TrainConfig
from scaling.data.tokenize import bits_per_byte
from scaling.errors import LeaseLost
from scaling.lease import RunLease
from scaling.progress import train_text
from scaling.stacking import refusal
from scaling.train import loop
from scaling.train.cache import enable_compilation_cache


@dataclasses.dataclass
class _Lane:
    index: int  # position in the caller's list
    cfg: TrainConfig
    out: Path
    resolved: dict
    lease: RunLease | None
    session: object = None
    state: dict | None = None
    tally: object = None


def run_stacked(cfgs: list[TrainConfig], outs: list, *, max_width: int | None = None) -> list[dict]:
    """Train ``cfgs[i]`` into ``outs[i]`` for every ``i`` as one stack; the summaries, in order.

    Finished run directories return their stored summary. ``max_width`` caps how many lanes
    train at once (the memory estimate narrows it further); wider groups train as consecutive
    stacks. Raises ``ConfigError`` for bad input before training (``refusal``, differing
    compiled settings, any lane's own checks); on any other error every lane still training is
    recorded ``failed`` and the error re-raised.
    """
    if len(cfgs) != len(outs):
        raise ValueError("run_stacked: one run directory per config")
    if jax.process_count() > 1:
        raise ConfigError("stack: stacked trials train in one process; run multi-process trials one at a time (--stack off)")
    enable_compilation_cache()
    outs = [storage.path(o) for o in outs]
    results: list[dict | None] = [None] * len(cfgs)
    with contextlib.ExitStack() as held:
        lanes = []
        for i, (cfg, out) in enumerate(zip(cfgs, outs)):
            why = refusal(cfg)
            if why:
                raise ConfigError(f"{why}; it cannot train stacked (--stack off)")
            loop._check_writable(out)
            prev = loop.read_summary(out)
            if prev and prev.get("state") in ("done", "diverged"):
                results[i] = prev
                continue
            lease = held.enter_context(RunLease(out, join=True)) if isinstance(out, Path) else None
            loop._check_same_config(cfg, out)
            loop._claim_checkpoint_dir(cfg, out)
            prev = loop.read_summary(out)  # finished by another trainer while we waited
            if prev and prev.get("state") in ("done", "diverged"):
                results[i] = prev
                continue
            lanes.append(_Lane(i, cfg, out, loop.preflight(cfg), lease))
        width = _width_that_fits(lanes, max_width)
        for lo in range(0, len(lanes), width):
            for lane, summary in _Stack(lanes[lo:lo + width]).run():
                results[lane.index] = summary
    return results


def _width_that_fits(lanes: list[_Lane], max_width: int | None) -> int:
    """Lanes per stack: ``max_width`` (default all), narrowed so that the stack's estimated
    memory (lanes x one trial's estimate) fits a device."""
    from scaling import sharding

    width = max(1, min(len(lanes), max_width or len(lanes)))
    if not lanes:
        return 1
    mesh = sharding.make_mesh(lanes[0].cfg.mesh)
    need, have = sharding.memory_estimate(lanes[0].cfg, mesh), sharding.available_memory_per_device(mesh)
    if have is not None and need > 0:
        width = max(1, min(width, int(have // need)))
    return width


def _leading(a) -> NamedSharding | None:
    """``a``'s sharding with a leading unsharded trial axis."""
    sh = a.sharding
    if isinstance(sh, NamedSharding):
        return NamedSharding(sh.mesh, P(None, *sh.spec))
    return None


class _Stack:
    """Lanes that train together: ``run()`` yields ``(lane, summary)`` as each lane ends."""

    def __init__(self, lanes: list[_Lane]):
        self.lanes = lanes

    def run(self):
        from scaling.train.session import Session

        lanes = self.lanes
        try:
            for pos, lane in enumerate(lanes):
                lane.resolved["stacked"] = {"lanes": len(lanes), "lane": pos}
                lane.session = Session(lane.cfg, lane.out, lane.resolved, lane.lease)
            yield from self._train()
        except (ConfigError, LeaseLost):
            raise
        except BaseException as err:
            for lane in lanes:
                s = lane.session
                if s is not None and s.summary.get("state") in (None, "running"):
                    with contextlib.suppress(Exception):
                        s.finish("failed", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            for lane in reversed(lanes):
                if lane.session is not None:
                    lane.session.close()

    def _train(self):
        from scaling import sharding
        from scaling.train import stack

        first = self.lanes[0].session
        for lane in self.lanes:
            s = lane.session
            lane.state = s._set_up()
            lane.state, lane.tally = s._restore(lane.state)
            s._open_outputs(lane.tally)
            s.summary["stacked"] = len(self.lanes)
        # every compiled setting must agree (ConfigError naming the field otherwise)
        stack.stacked_hparams([lane.cfg.optim for lane in self.lanes], first.cfg.model)
        mesh = first.mesh
        accum, shards = sharding.accumulation(first.cfg.data, mesh)
        every = loop.gns_every(first.cfg)
        step_fn = stack.make_stacked_train_step(first.graphdef, first.cfg.optim, first.cfg.model, accum=accum,
                                                shards=shards, gns_every=every)
        batch_sh = NamedSharding(mesh, P(None, *sharding.batch_sharding(mesh).spec))
        active = []
        for lane in self.lanes:
            if lane.tally.step < lane.session.total_steps:
                active.append(lane)
            else:  # resumed from its final checkpoint: nothing to train
                yield lane, lane.session._finish_done(lane.state, lane.tally)
        compiled: set[int] = set()
        state_K = hp_K = None
        while active:
            if state_K is None:  # (re)stack: the width is the number of lanes left
                state_K = self._stack_states([lane.state for lane in active])
                hp_K = stack.stacked_hparams([lane.cfg.optim for lane in active], first.cfg.model)
                for lane in active:
                    lane.state = None
            width = len(active)
            batches = [next(lane.session.iterator) for lane in active]
            batch_K = jax.device_put({k: np.stack([b[k] for b in batches]) for k in ("inputs", "targets")}, batch_sh)
            wants = [_takes_statistics(lane) for lane in active]
            gns = any(wants)  # one branch for all lanes: a lane that did not ask logs none (below)
            fresh = width not in compiled
            if fresh and compiled:  # a narrower program compiles: time the steps before it, not the compile
                jax.block_until_ready(state_K)
                now = time.perf_counter()
                for lane in active:
                    lane.tally.close(now)
            state_K, m_K = step_fn(state_K, batch_K, hp_K, np.ones(width, bool), gns)
            for lane in active:
                lane.tally.step += 1
            faults.point("train_step", active[0].tally.step)
            if fresh:
                jax.block_until_ready(m_K)
                compiled.add(width)
                for lane in active:
                    lane.tally.compiled = True
                    lane.tally.restart(lane.tally.step)
            dues = [lane.session._due(lane.tally) for lane in active]
            if not any(d.logging or d.evaluating or d.saving for d in dues):
                continue
            m_host = jax.device_get(m_K)
            now = time.perf_counter()
            dts = [lane.tally.close(now) for lane in active]  # every lane's clock stops while any lane works
            leaving = []
            for pos, (lane, due, dt) in enumerate(zip(active, dues, dts)):
                m = {k: v[pos] for k, v in m_host.items() if wants[pos] or not k.startswith("gns_")}
                ended = self._after_step(lane, due, dt, m,
                                         lambda pos=pos: jax.tree.map(lambda x: x[pos], state_K))
                if ended is not None:
                    leaving.append(pos)
                    yield lane, ended
            if leaving:
                staying = [pos for pos in range(width) if pos not in leaving]
                for pos in staying:
                    active[pos].state = jax.tree.map(lambda x, pos=pos: x[pos], state_K)
                active = [active[pos] for pos in staying]
                state_K = None
            for lane in active:
                lane.tally.restart(lane.tally.step)

    @staticmethod
    def _stack_states(states: list[dict]) -> dict:
        """Lane states -> one state with a leading trial axis, each leaf sharded as a lane's."""
        host = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)
        shardings = jax.tree.map(_leading, states[0])
        return jax.tree.map(lambda h, sh: jax.device_put(h, sh) if sh is not None else jax.numpy.asarray(h),
                            host, shardings)

    @staticmethod
    def _after_step(lane: _Lane, due, dt: float, m: dict, lane_state) -> dict | None:
        """The lane's work on a step where it logs, evaluates or saves (as ``Session.train``
        does); its summary when it leaves the stack (diverged or done), else None."""
        s, t = lane.session, lane.tally
        if not (due.logging or due.evaluating or due.saving):  # (a lane's last step always logs)
            return None
        row = s._row(t, m, dt)
        diverged = s._divergence(t, row["loss"])
        state = None
        if due.evaluating and diverged is None:
            state = lane_state()
            t.evals = s._evaluate(state)
            row.update(t.evals)
            t.eval_loss = t.evals["eval_loss"]
            row["eval_bpb"] = bits_per_byte(t.eval_loss, s.eval.bytes_per_token)
            s.progress.message(f"step {t.step}/{s.total_steps}: eval loss {t.eval_loss:.4f} nats")
        if due.logging or due.evaluating:
            s._check_lease()
            s.metrics.write(row)
            s.wandb.log(row)
            t.last_row = row
        s.progress.update(train_text(loss=row["loss"], tokens_per_s=row["tokens_per_s"], mfu=row["mfu"],
                                     eta_s=(s.total_steps - t.step) * dt / max(1, t.step - t.seg_step)), n=t.step)
        if diverged is not None:
            return s._stop_diverged(t, diverged)
        if due.saving:
            s._checkpoint(state if state is not None else lane_state(), t)
        if t.step >= s.total_steps:
            return s._finish_done(state if state is not None else lane_state(), t)
        return None


def _takes_statistics(lane: _Lane) -> bool:
    """Whether the lane's next step takes noise-scale statistics (``scaling.train.step``'s
    rule: every ``gns_every`` steps and on the last)."""
    every = loop.gns_every(lane.cfg)
    nxt = lane.tally.step + 1
    return bool(every) and (nxt % every == 0 or nxt == lane.session.total_steps)

