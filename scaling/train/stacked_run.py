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
- The stack's width is the number of lanes still training. XLA may sum a lane's matmuls
  differently at another width, and the noise-scale branch is taken when any lane asks, so a
  resume must rebuild the same stack at every step: finished lanes come back as frozen *ghost*
  lanes (inactive, any state, their own statistics schedule) until the survivors pass the step
  where they left. A resumed stack then equals the uninterrupted one bit for bit (tested with
  a lane that ended after the survivors' last checkpoint).
- The exceptions, equal to float rounding rather than bitwise: a kill while some lanes had
  saved step ``s`` and others not yet (the lanes resume from different steps), and a rerun
  that groups other trials (``--only``, another ``--stack``, less device memory).

Versus a trial trained alone the numbers agree to float rounding, not bitwise (see
``scaling.train.stack``); a lane also takes the noise-scale (two-halves) gradient on the steps
another lane takes statistics on, and logs statistics only on its own. Every lane records
``resolved.stacked`` (lanes, its lane) in config.json and ``stacked`` (lanes when its session
started) in summary.json. A lane's ``tokens_per_s`` and MFU are its own
tokens over the stack's wall time, so the stack's throughput is their sum.

Not stacked (``ConfigError``): wall-clock budgets (one clock per trial), ``init_from`` branches,
batch schedules, multi-process runs, trials whose compiled settings differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from scaling import faults, storage
from scaling.config import ConfigError, TrainConfig
from scaling.errors import LeaseLost
from scaling.lease import RunLease
from scaling.stacking import refusal
from scaling.train import loop
from scaling.train.cache import enable_compilation_cache


@dataclasses.dataclass(eq=False)
class _Lane:
    index: int  # position in the caller's list
    cfg: TrainConfig
    out: Path
    resolved: dict | None
    lease: RunLease | None
    ghost_until: int | None = None  # a finished lane: present while the survivors are before this step
    total_steps: int | None = None
    session: object = None
    state: dict | None = None
    tally: object = None

    @property
    def ghost(self) -> bool:
        return self.ghost_until is not None


def run_stacked(cfgs: list[TrainConfig], outs: list, *, max_width: int | None = None) -> list[dict]:
    """Train ``cfgs[i]`` into ``outs[i]`` for every ``i`` as one stack; the summaries, in order.

    Finished run directories return their stored summary (and ride along as ghost lanes, see
    the module docstring). ``max_width`` caps how many lanes train at once (narrowed further,
    with a message, when the memory estimate of the stack exceeds a device); wider groups train
    as consecutive stacks of the lanes in order. Raises ``ConfigError`` for bad input before
    training (``refusal``, differing compiled settings, any lane's own checks); on any other
    error every lane still training is recorded ``failed`` and the error re-raised.
    """
    from scaling import flops

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
            if not (prev and prev.get("state") in ("done", "diverged")):
                lease = held.enter_context(RunLease(out, join=True)) if isinstance(out, Path) else None
                loop._check_same_config(cfg, out)
                loop._claim_checkpoint_dir(cfg, out)
                prev = loop.read_summary(out)  # finished by another trainer while we waited
            if prev and prev.get("state") in ("done", "diverged"):
                results[i] = prev
                if prev.get("steps"):
                    lanes.append(_Lane(i, cfg, out, None, None, ghost_until=int(prev["steps"]),
                                       total_steps=int(flops.steps_for_budget(cfg))))
                continue
            lanes.append(_Lane(i, cfg, out, loop.preflight(cfg), lease))
        live = [lane for lane in lanes if not lane.ghost]
        if not live:
            return results
        width = _width_that_fits(live[0].cfg, len(lanes), max_width)
        for lo in range(0, len(lanes), width):
            chunk = lanes[lo:lo + width]
            if any(not lane.ghost for lane in chunk):
                for lane, summary in _Stack(chunk).run():
                    results[lane.index] = summary
    return results


def _width_that_fits(cfg: TrainConfig, n: int, max_width: int | None) -> int:
    """Lanes per stack: ``max_width`` (default all ``n``), narrowed so that the stack's
    estimated memory (lanes x one trial's estimate) fits a device."""
    from scaling import sharding

    width = max(1, min(n, max_width or n))
    mesh = sharding.make_mesh(cfg.mesh)
    need, have = sharding.memory_estimate(cfg, mesh), sharding.available_memory_per_device(mesh)
    if have is not None and need > 0 and width * need > have:
        fits = max(1, int(have // need))
        print(f"stack: {width} trials need about {width * need / 2**30:.2f} GiB per device and {have / 2**30:.2f} GiB "
              f"is available; training them {fits} at a time", file=sys.stderr)
        width = fits
    return width


def _leading(a, mesh) -> NamedSharding:
    """``a``'s sharding with a leading unsharded trial axis (replicated over ``mesh`` when it
    has no named sharding)."""
    sh = getattr(a, "sharding", None)
    if isinstance(sh, NamedSharding):
        return NamedSharding(sh.mesh, P(None, *sh.spec))
    return NamedSharding(mesh, P())


class _Stack:
    """Lanes that train together (ghosts included): ``run()`` yields ``(lane, summary)`` as
    each live lane ends."""

    def __init__(self, lanes: list[_Lane]):
        self.lanes = lanes
        self.live = [lane for lane in lanes if not lane.ghost]

    def run(self):
        from scaling.train.session import Session

        try:
            for pos, lane in enumerate(self.live):
                lane.resolved["stacked"] = {"lanes": len(self.lanes), "lane": self.lanes.index(lane)}
                lane.session = Session(lane.cfg, lane.out, lane.resolved, lane.lease)
            yield from self._train()
        except (ConfigError, LeaseLost):
            raise
        except BaseException as err:
            for lane in self.live:
                s = lane.session
                if s is not None and s.summary.get("state") in (None, "running"):
                    with contextlib.suppress(Exception):
                        s.finish("failed", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            for lane in reversed(self.live):
                if lane.session is not None:
                    lane.session.close()

    def _set_up(self):
        """Every live lane's session set up and restored; the compiled stacked step."""
        from scaling import sharding
        from scaling.train import stack

        for lane in self.live:
            s = lane.session
            lane.state = s._set_up()
            lane.state, lane.tally = s._restore(lane.state)
            s._open_outputs(lane.tally)
            s.summary["stacked"] = len(self.lanes)
            s.params0 = s.rest0 = None  # the initial copy: a stack holds one state per lane, not two
        # every compiled setting must agree (ConfigError naming the field otherwise)
        stack.stacked_hparams([lane.cfg.optim for lane in self.lanes], [lane.cfg.model for lane in self.lanes])
        first = self.live[0].session
        mesh = first.mesh
        accum, shards = sharding.accumulation(first.cfg.data, mesh)
        self.step_fn = stack.make_stacked_train_step(first.graphdef, first.cfg.optim, first.cfg.model, accum=accum,
                                                     shards=shards, gns_every=loop.gns_every(first.cfg))
        self.batch_sharding = NamedSharding(mesh, P(None, *sharding.batch_sharding(mesh).spec))
        self.state_sharding = jax.tree.map(lambda a: _leading(a, mesh), self.live[0].state)

    def _restack(self, members: list[_Lane], old: list[_Lane], state_K):
        """The stacked state and hyperparameters of ``members`` (live lanes' states from the old
        stack or their own; ghosts: a live lane's, never read), built on the host lane by lane
        so no second stacked copy is held on the device."""
        from scaling.train import stack

        host: dict[int, object] = {}
        for pos, lane in enumerate(old):
            if not lane.ghost and lane in members:
                host[id(lane)] = jax.device_get(jax.tree.map(lambda x, pos=pos: x[pos], state_K))
        del state_K
        for lane in members:
            if not lane.ghost and id(lane) not in host:
                host[id(lane)] = jax.device_get(lane.state)
                lane.state = None
        template = next(host[id(lane)] for lane in members if not lane.ghost)
        states = [host.get(id(lane), template) for lane in members]
        stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)
        del states, host
        state_K = jax.device_put(stacked, self.state_sharding)
        hp_K = stack.stacked_hparams([lane.cfg.optim for lane in members], [lane.cfg.model for lane in members])
        return state_K, hp_K

    def _train(self):
        self._set_up()
        active = []
        for lane in self.live:
            if lane.tally.step < lane.session.total_steps:
                active.append(lane)
            else:  # resumed from its final checkpoint: nothing to train
                yield lane, lane.session._finish_done(lane.state, lane.tally)
        compiled: set[int] = set()
        members: list[_Lane] = []
        state_K = hp_K = None
        while active:
            now_step = min(lane.tally.step for lane in active)
            want = [lane for lane in self.lanes if lane in active or (lane.ghost and now_step < lane.ghost_until)]
            if want != members:  # (re)stack: the width is the lanes still training, ghosts included
                state_K, hp_K = self._restack(want, members, state_K)
                members = want
            width = len(members)
            batches = [None if lane.ghost else next(lane.session.iterator) for lane in members]
            blank = next(b for b in batches if b is not None)
            batch_K = jax.device_put({k: np.stack([(blank if b is None else b)[k] for b in batches])
                                      for k in ("inputs", "targets")}, self.batch_sharding)
            wants = [_takes_statistics(lane, now_step) for lane in members]
            gns = any(wants)  # one branch for all lanes: a lane that did not ask logs none (below)
            live_mask = np.array([not lane.ghost for lane in members])
            fresh = width not in compiled
            if fresh and compiled:  # another width compiles: time the steps before it, not the compile
                jax.block_until_ready(state_K)
                now = time.perf_counter()
                for lane in active:
                    lane.tally.close(now)
            state_K, m_K = self.step_fn(state_K, batch_K, hp_K, live_mask, gns)
            for lane in active:
                lane.tally.step += 1
            faults.point("train_step", active[0].tally.step)
            if fresh:
                jax.block_until_ready(m_K)
                compiled.add(width)
                for lane in active:
                    lane.tally.compiled = True
                    lane.tally.restart(lane.tally.step)
            dues = {id(lane): lane.session._due(lane.tally) for lane in active}
            if not any(d.logging or d.evaluating or d.saving for d in dues.values()):
                continue
            m_host = jax.device_get(m_K)
            now = time.perf_counter()
            dts = {id(lane): lane.tally.close(now) for lane in active}  # every lane's clock stops while any lane works
            for pos, lane in enumerate(members):
                if lane.ghost:
                    continue
                m = {k: v[pos] for k, v in m_host.items() if wants[pos] or not k.startswith("gns_")}
                ended = self._after_step(lane, dues[id(lane)], dts[id(lane)], m,
                                         lambda pos=pos: jax.tree.map(lambda x: x[pos], state_K))
                if ended is not None:
                    active.remove(lane)
                    yield lane, ended
            for lane in active:
                lane.tally.restart(lane.tally.step)

    @staticmethod
    def _after_step(lane: _Lane, due, dt: float, m: dict, lane_state) -> dict | None:
        """The lane's work on a step where it logs, evaluates or saves (``Session._log_step``,
        as a run alone does); its summary when it leaves the stack (diverged or done), else None."""
        s, t = lane.session, lane.tally
        if not (due.logging or due.evaluating or due.saving):  # (a lane's last step always logs)
            return None
        stopped = s._log_step(lane_state, t, due, m, dt)
        if stopped is not None or t.step < s.total_steps:
            return stopped
        return s._finish_done(lane_state(), t)


def _takes_statistics(lane: _Lane, ghost_step: int) -> bool:
    """Whether the lane's next step takes noise-scale statistics (``scaling.train.step``'s
    rule: every ``gns_every`` steps and on the last); a ghost at the survivors' ``ghost_step``."""
    every = loop.gns_every(lane.cfg)
    nxt = (ghost_step if lane.ghost else lane.tally.step) + 1
    total = lane.total_steps if lane.ghost else lane.session.total_steps
    return bool(every) and (nxt % every == 0 or nxt == total)

