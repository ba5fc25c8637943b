"""The trainer session: one process's part of a run, from built model to summary.

``scaling.train.loop.run`` leases the run directory, checks the config and data against what
the directory holds, then drives a ``Session``. Resume is exact: the same compiled step, the
restored train state and grain iterator state, metrics rows beyond the restored step dropped.

Over 400 lines: one class whose steps are methods, read in the order ``train`` calls them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling import faults, schema, storage
from scaling.config import ConfigError, TrainConfig
from scaling.data.tokenize import bits_per_byte
from scaling.files import read_json, write_json_atomic
from scaling.lease import RunLease
from scaling.progress import ProgressLine, train_text
from scaling.train import optim
from scaling.train import step as step_lib
from scaling.train.checkpoint import Checkpointer
from scaling.train.loop import _check_same_data, _check_vocab, checkpoint_location, gns_every, parse_init_from
from scaling.train.metrics import MetricsWriter, WandbMirror, hardware_flops_per_token, peak_flops, wandb_grouping


@dataclass
class _Tally:
    """Where the run stands: the step, the best logged loss, and the training clock (wall time
    summed over sessions, compilation, evaluation and checkpointing left out)."""

    step: int
    best: float
    train_s: float
    tokens_at: Callable[[int], int]  # training tokens before a step (the batch may change)
    seg_t: float  # start of the timed segment
    seg_step: int
    session_tokens: int = 0
    session_s: float = 0.0
    compiled: bool = False
    time_spent: bool = False
    eval_loss: float | None = None
    evals: dict = field(default_factory=dict)
    last_row: dict = field(default_factory=dict)

    def close(self, now: float) -> float:
        """End the timed segment at ``now``; its seconds (counted once a program is compiled)."""
        dt = now - self.seg_t
        if self.compiled:
            self.train_s += dt
            self.session_tokens += self.tokens_at(self.step) - self.tokens_at(self.seg_step)
            self.session_s += dt
        return dt

    def restart(self, step: int) -> None:
        self.seg_t, self.seg_step = time.perf_counter(), step

    def elapsed(self) -> float:
        """Training seconds so far, the open segment included."""
        return self.train_s + time.perf_counter() - self.seg_t


@dataclass(frozen=True)
class _Due:
    logging: bool
    evaluating: bool
    saving: bool
    over_time: bool


class Session:
    """Everything built for one process's part of a run (mesh, model, optimizer, data), and the
    run itself: ``Session(cfg, out, resolved, lease).train() -> summary``, then ``close()``.

    ``train`` reads as its steps: ``_set_up`` (plan the steps, build the compiled step, record
    config.json), ``_restore`` (own checkpoint, a branch point of another run, or fresh),
    ``_open_outputs``, then per step ``_advance`` (one compiled step and the clock) and, on the
    steps that log, evaluate or save, ``_row`` / ``_divergence`` / ``_evaluate`` /
    ``_checkpoint``, and ``_finish_done``."""

    def __init__(self, cfg: TrainConfig, out: Path, resolved: dict, lease: RunLease | None = None):
        from scaling import sharding
        from scaling.data import corpus, loader
        from scaling.models.transformer import Transformer

        self.cfg, self.out, self.resolved = cfg, out, resolved
        self.lease = lease
        # one writer per run directory: process 0 writes config, metrics, summary and wandb
        # (every process takes part in checkpoints, which orbax coordinates)
        self.writes = jax.process_index() == 0
        resolved["process_count"] = jax.process_count()
        resolved["device_count"] = jax.device_count()
        self.t_start = time.perf_counter()
        from scaling.data.batch_schedule import BatchSchedule

        from scaling.models.layers import attention_implementation

        self.mesh = sharding.make_mesh(cfg.mesh)
        # the attention kernel: a named one the backend lacks is a ConfigError before anything runs
        resolved["attention"] = attention_implementation(cfg.model, seq_len=cfg.data.seq_len)
        resolved["hardware_flops_per_token"] = hardware_flops_per_token(cfg.model, cfg.data.seq_len)
        if cfg.model.attention == "auto" and cfg.progress:
            print(f"{out}: attention kernel {resolved['attention']} (model.attention=auto on {jax.default_backend()}, "
                  f"{cfg.model.dtype})", file=sys.stderr)
        self.schedule = BatchSchedule.of(cfg.data)
        for b in self.schedule.batches:  # every batch of the schedule must split over the mesh
            sharding.validate(cfg.model, self._data_at(b), self.mesh)
        # one line instead of an XLA out-of-memory traceback (the largest batch decides)
        sharding.check_memory(dataclasses.replace(cfg, data=self._data_at(max(self.schedule.batches))), self.mesh)
        self.shard_index, self.shard_count = sharding.host_data_shard(self.mesh, cfg.data.batch_size)
        self.corpus = corpus.corpus_info(cfg.data)
        _check_vocab(cfg, self.corpus)
        _check_same_data(out, self.corpus)
        resolved["corpus"] = self.corpus
        # an upcycled run reads on in its dense run's data order (that run's seed)
        data_seed = (resolved.get("upcycled_from") or {}).get("data_seed", cfg.seed)
        self.iterator = loader.make_train_iterator(cfg.data, seed=data_seed, process_index=self.shard_index,
                                                   process_count=self.shard_count)
        self.eval = loader.eval_set(cfg.data)
        resolved["eval_set"] = self.eval.describe()
        from scaling.train.tasks_eval import suites_for_run

        self._task_suites = suites_for_run(cfg)  # checked in preflight already: cheap
        from scaling.models import mup
        # every chunk is padded (zero-weight rows) to rows the mesh and the hosts can split; the
        # set is fixed, so it is placed on the devices once, at the first evaluation
        rows = math.lcm(sharding.batch_rows_multiple(self.mesh), self.shard_count)
        self._eval_host = [loader.pad_rows(c, rows) for c in self.eval.chunks]
        self._eval_device: list[dict] | None = None
        self._sharding = sharding
        self.ctx = sharding.mesh_context(self.mesh)
        self.ctx.__enter__()
        model = sharding.create_sharded_model(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed)), self.mesh)
        self.graphdef, params, rest = step_lib.split_model(model)
        self.params0, self.rest0 = params, rest
        # per-tensor init std and LR multiplier, the forward multipliers (SP or μP)
        resolved["parametrization"] = mup.describe(cfg.model, params)
        where = checkpoint_location(cfg, out)
        # an explicit location is recorded (absolute); the default moves with the run directory
        resolved["checkpoint_location"] = str(where) if cfg.checkpoint_dir else None
        self.ckpt = Checkpointer(where, keep=cfg.checkpoint_keep, keep_steps=cfg.checkpoint_at)
        self.metrics = None
        self.wandb = None
        self.progress = None
        self.summary: dict[str, Any] = {}

    # ---- helpers ---------------------------------------------------------------------------
    def _data_at(self, batch: int):
        """``cfg.data`` with ``batch`` sequences per step (one segment of a batch schedule)."""
        d = self.cfg.data
        return d if batch == d.batch_size else dataclasses.replace(d, batch_size=batch, batch_schedule=())

    def step_for(self, batch: int):
        """The compiled train step for a global batch of ``batch`` sequences (one per batch size
        of the schedule: the number of accumulation passes is part of the program)."""
        fn = self._train_steps.get(batch)
        if fn is None:
            from scaling import sharding

            accum, shards = sharding.accumulation(self._data_at(batch), self.mesh)
            every = gns_every(self.cfg)
            if accum == 1 and every and batch % 2:
                raise ConfigError(f"data.microbatch: {self.cfg.data.microbatch} makes one pass per step, and a "
                                  f"statistics step splits an odd batch ({batch}) in halves; use an even batch "
                                  "or optim.gns_every=0")
            o = self.cfg.optim
            if o.batch_lr_exponent and batch != self.cfg.data.batch_size:
                o = dataclasses.replace(o, lr=o.lr * (batch / self.cfg.data.batch_size) ** o.batch_lr_exponent)
            fn = self._train_steps[batch] = step_lib.make_traced_train_step(
                self.graphdef, o, self.cfg.model, accum=accum, shards=shards, gns_every=every)
        return fn

    def put(self, batch: dict) -> dict:
        """Host-local batch -> global sharded arrays (inputs, targets and eval weights)."""
        keys = [k for k in ("inputs", "targets", "weights") if k in batch]
        return self._sharding.shard_batch({k: batch[k] for k in keys}, self.mesh)

    def put_global(self, batch: dict) -> dict:
        """A batch every host holds whole (a padded held-out chunk): this host's row block."""
        n = batch["inputs"].shape[0] // self.shard_count
        lo = self.shard_index * n
        return self.put({k: v[lo:lo + n] for k, v in batch.items()})

    def _build_step(self):
        tx = optim.make_optimizer(self.cfg.optim, model_cfg=self.cfg.model)  # the state's structure; the step traces the values
        self._train_steps = {}
        for b in self.schedule.batches:  # bad shapes fail before training, not at the switch
            self.step_for(b)
        self.train_step = self.step_for(self.cfg.data.batch_size)
        mod = self.cfg.model.mod
        # MoD trains with top-k over the whole sequence, which looks at later tokens and which a
        # sampler cannot use: the stored loss is each token's causal decision; the top-k number
        # is logged beside it as eval_loss_topk. MoE evaluates without dropping (causal).
        causal_mod = mod is not None and mod.causal_aux != "none"  # "none" trains no causal decision
        self.eval_step = step_lib.make_eval_step(self.graphdef, mod_routing="causal" if causal_mod else "topk")
        self.eval_step_topk = step_lib.make_eval_step(self.graphdef) if causal_mod else None
        return step_lib.init_state(self.params0, self.rest0, tx, mesh=self.mesh)

    def _estimate_steps_for_seconds(self, state) -> int:
        """Time a few compiled steps on a copy of the state (discarded)."""
        probe = jax.tree.map(jnp.copy, state)
        rows = self.cfg.data.batch_size // self.shard_count  # a batch of the training shape
        zeros = np.zeros((rows, self.cfg.data.seq_len), np.int32)
        batch = self.put({"inputs": zeros, "targets": zeros})
        probe, m = self.train_step(probe, batch)  # compile
        jax.block_until_ready(m)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            probe, m = self.train_step(probe, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        step_s = float(np.median(times))
        return max(1, int(self.cfg.budget.seconds // step_s))

    # ---- main ------------------------------------------------------------------------------
    def train(self) -> dict:
        """Train to the planned step (or the wall-clock budget); the summary dict."""
        state = self._set_up()
        state, t = self._restore(state)
        self._open_outputs(t)
        while t.step < self.total_steps and not t.time_spent:
            state, m = self._advance(state, t)
            due = self._due(t)
            if not (due.logging or due.evaluating or due.saving):
                continue
            m = jax.device_get(m)
            stopped = self._log_step(lambda: state, t, due, m, t.close(time.perf_counter()))
            if stopped is not None:
                return stopped
            if due.over_time:
                break
            t.restart(t.step)
        return self._finish_done(state, t)

    def _log_step(self, state_of: Callable[[], Any], t: "_Tally", due: "_Due", m: dict, dt: float) -> dict | None:
        """A step's work beyond training (it logs, evaluates or saves): the metrics row, the
        divergence check, the evaluation, the progress line, the checkpoint. ``state_of()``
        gives the train state (asked only when needed: a stack slices its lane); ``m`` the
        step's figures on the host, ``dt`` the timed segment's seconds. The summary when the
        run stopped diverged, else None. ``Session.train`` and stacked lanes share it."""
        row = self._row(t, m, dt)
        diverged = self._divergence(t, row["loss"])
        state = None
        if due.evaluating and diverged is None:
            state = state_of()
            t.evals = self._evaluate(state)
            row.update(t.evals)
            t.eval_loss = t.evals["eval_loss"]
            row["eval_bpb"] = bits_per_byte(t.eval_loss, self.eval.bytes_per_token)
            topk = t.evals.get("eval_loss_topk")
            extra = f" (top-k MoD routing, looks ahead: {topk:.4f})" if topk is not None else ""
            self.progress.message(f"step {t.step}/{self.total_steps}: eval loss {t.eval_loss:.4f} nats{extra}")
        if due.logging or due.evaluating:
            self._check_lease()
            self.metrics.write(row)
            self.wandb.log(row)
            t.last_row = row
        seg_steps = t.step - t.seg_step
        remaining = (self.total_steps - t.step) * (dt / seg_steps if seg_steps else 0.0)
        self.progress.update(train_text(loss=row["loss"], tokens_per_s=row["tokens_per_s"], mfu=row["mfu"],
                                        eta_s=remaining), n=t.step)
        if diverged is not None:
            return self._stop_diverged(t, diverged)
        if due.saving:
            self._checkpoint(state if state is not None else state_of(), t)
        return None

    def _set_up(self):
        """Plan the step count (the budget's, a previous session's for a seconds budget, else
        timed), build the compiled step and the initial state, record config.json."""
        cfg, resolved = self.cfg, self.resolved
        total_steps = resolved["total_steps"]
        if total_steps is None:
            latest_meta = self._peek_meta()
            total_steps = latest_meta["total_steps"] if latest_meta else None
        state = self._build_step()
        mem = self._sharding.memory_report(state["params"], state["opt_state"], cfg, self.mesh)
        resolved["memory_per_device"] = mem
        if cfg.progress:
            print(f"{self.out}: {self._sharding.format_memory_report(mem)}", file=sys.stderr)
        if total_steps is None:
            total_steps = self._estimate_steps_for_seconds(state)
        resolved["total_steps"] = self.total_steps = total_steps
        self._check_lease()
        if self.writes:
            write_json_atomic(self.out / "config.json", {**json.loads(cfg.to_json()), "resolved": resolved,
                                                         "schema_version": schema.SCHEMA_VERSION,
                                                         "provenance": schema.provenance(self.corpus)})
        return state

    def _restore(self, state):
        """Own checkpoint, else a branch point of another run (``init_from``), else fresh; the
        state and the run's tally from there."""
        cfg, out, total_steps = self.cfg, self.out, self.total_steps
        meta = {"step": 0, "best_loss": None, "train_s": 0.0, "total_steps": total_steps}
        restored = self.ckpt.restore_latest(state)
        if restored is not None:
            step, state, data_state, meta = restored
            self.iterator.set_state(data_state)
            print(f"{out}: resuming from checkpoint step {step}/{total_steps}", file=sys.stderr)
        elif cfg.init_from and cfg.init.upcycle == "moe":
            state = self._restore_upcycled(state)
        elif cfg.init_from:
            state, meta = self._restore_branch_point(state, meta)
        # the run's own length drives the schedule (a branch restores another run's total)
        state["total_steps"] = jnp.asarray(total_steps, jnp.int32)
        step = int(meta["step"])
        best = meta.get("best_loss")
        train_s = float(meta.get("train_s", 0.0))
        # hardware FLOPs add up per session: a resumed run may run another kernel or remat policy
        # (they are not part of the config hash); a checkpoint without the figure: this session's rate
        hw = meta.get("hardware_flops")
        self.hw_base = (step, float(hw) if hw is not None else self.schedule.tokens_before(step)
                        * self.resolved["hardware_flops_per_token"])
        if step > total_steps:
            raise ConfigError(f"init_from: step {step} is beyond this run's {total_steps} steps; raise the budget")
        t = _Tally(step=step, best=float(best) if best is not None else math.inf, train_s=train_s,
                   tokens_at=self.schedule.tokens_before, seg_t=time.perf_counter(), seg_step=step)
        t.time_spent = cfg.budget.kind == "seconds" and train_s >= cfg.budget.seconds  # resumed after the end
        return state, t

    def _restore_branch_point(self, state, meta: dict):
        """``init_from``: another run's checkpoint at a step (converted when it was written in
        the other block layout, scanned or loop)."""
        cfg, out = self.cfg, self.out
        ckpt_dir, at = parse_init_from(cfg.init_from)
        src = Checkpointer(ckpt_dir, read_only=True)
        src_run = storage.path(cfg.init_from.rsplit("@", 1)[0])
        src_scan = bool(((read_json(src_run / "config.json") or {}).get("model") or {}).get("scan_layers"))
        if src_scan != cfg.model.scan_layers:  # the other block layout: restore as written, then convert
            from scaling.models import layout

            written, data_state, src_meta = src.restore(at, layout.convert(state, cfg.model, to_scan=src_scan))
            state = jax.device_put(layout.convert(written, cfg.model, to_scan=cfg.model.scan_layers),
                                   jax.tree.map(lambda a: a.sharding, state))
            print(f"{out}: converted {cfg.init_from} from the {'scanned' if src_scan else 'loop'} block layout",
                  file=sys.stderr)
        else:
            state, data_state, src_meta = src.restore(at, state)
        src.close()
        self.iterator.set_state(data_state)
        meta.update(step=at, best_loss=src_meta.get("best_loss"), hardware_flops=src_meta.get("hardware_flops"))
        print(f"{out}: starting from {cfg.init_from}", file=sys.stderr)
        return state, meta

    def _restore_upcycled(self, state):
        """``init.upcycle=moe``: the dense run's parameters at ``init_from`` become this MoE's
        (``scaling.models.upcycle``); the optimizer and the step start fresh; the data reads on
        from the dense run's position unless ``init.data=restart``."""
        from scaling.models import upcycle
        from scaling.models.transformer import Transformer

        cfg, out = self.cfg, self.out
        src_cfg = upcycle.source_config(cfg.init_from)
        ckpt_dir, at = parse_init_from(cfg.init_from)
        dense = self._sharding.create_sharded_model(lambda: Transformer(src_cfg.model, rngs=nnx.Rngs(0)), self.mesh)
        _, d_params, d_rest = step_lib.split_model(dense)
        d_tx = optim.make_optimizer(src_cfg.optim, model_cfg=src_cfg.model)
        template = step_lib.init_state(d_params, d_rest, d_tx, mesh=self.mesh)
        src = Checkpointer(ckpt_dir, read_only=True)
        written, data_state, _ = src.restore(at, template)
        src.close()
        dense_params = written["params"]
        del dense, d_params, d_rest, template, written  # only the dense parameters are needed from here
        params = upcycle.upcycle_params(dense_params, state["params"], cfg.model, cfg.init.noise, seed=cfg.seed)
        if cfg.init.data == "continue":
            self.iterator.set_state(data_state)
        print(f"{out}: upcycled {cfg.init_from} into {cfg.model.moe.n_routed} experts (noise {cfg.init.noise:g}, "
              f"data {cfg.init.data})", file=sys.stderr)
        # the state built for this run is fresh (step 0, zero optimizer moments): only the
        # parameters change
        return {**state, "params": params}

    def _open_outputs(self, t: "_Tally") -> None:
        """metrics.jsonl (rows beyond the restored step dropped), the wandb mirror, the progress
        line and the per-run constants the rows use."""
        cfg, out, resolved, step = self.cfg, self.out, self.resolved, t.step
        self.metrics = MetricsWriter(out / "metrics.jsonl", keep_through_step=step, read_only=not self.writes)
        wandb_dir = out if isinstance(out, Path) else Path(tempfile.gettempdir()) / "scaling-wandb" / resolved["config_hash"]
        self.wandb = WandbMirror(cfg.wandb if self.writes else "off", run_dir=wandb_dir, run_id=resolved["config_hash"],
                                 name=cfg.name, **wandb_grouping(cfg, out),
                                 config={**cfg.to_dict(), "resolved": resolved})
        self.progress = ProgressLine(self.total_steps, enabled=cfg.progress and self.writes)
        self.peak = peak_flops(len(self.mesh.devices.flat))
        self.warmup = optim.warmup_steps(cfg.optim, self.total_steps)
        self.unique_tokens = float(self.corpus.get("unique_tokens") or self.corpus.get("n_train_tokens") or 0)
        self.summary = self._base_summary(step, self.total_steps)
        self.ran_batches: set[int] = set()
        t.last_row = self.metrics.kept[-1] if self.metrics.kept else {}

    def _advance(self, state, t: "_Tally"):
        """One compiled training step; the first step at a batch size compiles its program,
        which the clock leaves out."""
        batch = self.put(next(self.iterator))
        b_now = self.schedule.batch_at(t.step)
        fresh = b_now not in self.ran_batches
        if fresh and t.compiled:  # a batch-schedule switch: time the steps before it, not the compile
            jax.block_until_ready(state)
            t.close(time.perf_counter())
        state, m = self.step_for(b_now)(state, batch)
        t.step += 1
        faults.point("train_step", t.step)
        if fresh:
            jax.block_until_ready(m)  # compilation is not counted as training time
            t.compiled = True
            self.ran_batches.add(b_now)
            t.restart(t.step)
        return state, m

    def _due(self, t: "_Tally") -> "_Due":
        """What this step does beyond training: log, evaluate, save (all of them once a
        seconds budget is spent)."""
        cfg, step, every = self.cfg, t.step, gns_every(self.cfg)
        last = step == self.total_steps
        over_time = cfg.budget.kind == "seconds" and t.elapsed() >= cfg.budget.seconds
        logging = step % cfg.log_every == 0 or last or bool(every and step % every == 0)  # every statistic is logged
        evaluating = step % cfg.eval_every == 0 or last
        saving = step % cfg.checkpoint_every == 0 or last or step in cfg.checkpoint_at
        if over_time:
            return _Due(True, True, True, True)
        return _Due(logging, evaluating, saving, False)

    def _row(self, t: "_Tally", m: dict, dt: float) -> dict:
        """The metrics row of step ``t.step`` (the compiled step's figures ``m`` on the host)."""
        tokens_at, step, seg_steps = t.tokens_at, t.step, t.step - t.seg_step
        fpt = self.resolved["train_flops_per_token"]
        tok_s = (tokens_at(step) - tokens_at(t.seg_step)) / dt if dt > 0 and seg_steps else float("nan")
        row = {"step": step, "tokens": tokens_at(step), "flops": tokens_at(step) * fpt,
               "wall_s": t.train_s, "tokens_per_s": tok_s, "mfu": tok_s * fpt / self.peak,
               "hfu": tok_s * self.resolved["hardware_flops_per_token"] / self.peak,
               "epochs": tokens_at(step) / self.unique_tokens if self.unique_tokens else None}
        if not self.schedule.constant:
            row["batch_size"] = self.schedule.batch_at(step - 1)
        # the noise-scale statistics are NaN on steps that did not compute them: not logged
        row.update({k: float(v) for k, v in m.items() if not (k.startswith("gns_") and not math.isfinite(float(v)))})
        row["loss_bpb"] = bits_per_byte(row["loss"], self.corpus.get("train_bytes_per_token"))  # the corpus mean
        return row

    def _divergence(self, t: "_Tally", loss: float) -> str | None:
        """Why the run diverged at this step (NaN/inf, or after warmup above
        ``divergence_factor`` x the best loss so far), or None; keeps the best loss."""
        cfg, diverged = self.cfg, None
        if not math.isfinite(loss):
            diverged = f"loss is {loss} at step {t.step}"
        elif t.step > self.warmup and loss > cfg.divergence_factor * t.best:
            diverged = (f"loss {loss:.4g} at step {t.step} exceeds divergence_factor={cfg.divergence_factor:g} x "
                        f"best loss so far {t.best:.4g}")
        if math.isfinite(loss):
            t.best = min(t.best, loss)
        return diverged

    def _stop_diverged(self, t: "_Tally", diverged: str) -> dict:
        msg = f"run diverged: {diverged}; stopped (lower optim.lr={self.cfg.optim.lr:g}, or raise divergence_factor)"
        self.progress.message(msg)
        print(msg, file=sys.stderr)
        self.summary.update(self._figures(t))
        return self.finish("diverged", error=msg)

    def _checkpoint(self, state, t: "_Tally") -> None:
        self._check_lease()
        meta = {"step": t.step, "best_loss": t.best if math.isfinite(t.best) else None, "train_s": t.train_s,
                "total_steps": self.total_steps, "config_hash": self.resolved["config_hash"],
                "hardware_flops": self._hardware_flops(t.step)}
        self.ckpt.save(t.step, state, self.iterator.get_state(), meta)

    def _finish_done(self, state, t: "_Tally") -> dict:
        """The final summary: figures, the last evaluation's standard errors and mixture
        components, epochs; state ``done``."""
        self.progress.close()
        if t.eval_loss is None:  # resumed from the final checkpoint: nothing trained, still evaluate
            t.evals = self._evaluate(state)
            t.eval_loss = t.evals["eval_loss"]
        evals, s = t.evals, self.summary
        s.update(self._figures(t))
        s["final_eval_loss_se"] = evals.get("eval_loss_se")
        s["final_eval_bpb_se"] = bits_per_byte(evals.get("eval_loss_se"), self.eval.bytes_per_token)
        for k, v in evals.items():
            if k.startswith(("eval_loss/", "eval_bpb/")):
                s[f"final_{k}"] = v
        for name, comp in (self.corpus.get("components") or {}).items():  # epochs of each mixture component
            if comp.get("n_train_tokens"):
                s[f"epochs/{name}"] = s["tokens"] * comp["weight"] / comp["n_train_tokens"]
        per = [v for k, v in s.items() if k.startswith("epochs/")]
        # the most repeated component: what a data-constrained law must see (epochs averages it away)
        s["max_epochs"] = max(per) if per else s.get("epochs")
        if "eval_loss_topk" in evals:
            s["final_eval_loss_topk"] = evals["eval_loss_topk"]
        if self.cfg.eval_tasks:
            self._score_tasks(state, t.step)
        return self.finish("done")

    def _score_tasks(self, state, step: int) -> None:
        """Score ``cfg.eval_tasks`` on the final model (the code path of ``scaling eval --tasks``):
        ``tasks.json`` and ``final_tasks/SUITE/METRIC`` summary keys. Before the summary says
        done, so a run killed while scoring scores again when resumed."""
        from scaling.data.corpus import tokenizer_for
        from scaling.train.tasks_eval import score_suites, summary_keys, tasks_record

        params, rest = jax.device_get((state["params"], state["rest"]))  # one process (checked at start)
        model = nnx.merge(self.graphdef, params, rest)
        suites = score_suites(model, tokenizer_for(self.cfg.data), self._task_suites, context=self.cfg.data.seq_len)
        if self.writes:
            write_json_atomic(self.out / "tasks.json", tasks_record(step, suites, seed=0))
        self.summary.update(summary_keys(suites))

    def _evaluate(self, state) -> dict[str, float]:
        """Mean held-out cross-entropy (nats/token) as a sampler sees the model, ``eval_loss``,
        and its standard error over the chunks, ``eval_loss_se``; for MoD also the top-k
        routing number ``eval_loss_topk`` (it looks at later tokens)."""
        if self._eval_device is None:
            self._eval_device = [self.put_global(c) for c in self._eval_host]
        placed = lambda chunk: chunk  # noqa: E731
        out = {}
        sums, counts = step_lib.chunk_sums(self.eval_step, state["params"], state["rest"], self._eval_device, placed)
        out["eval_loss"], out["eval_loss_se"] = step_lib.mean_and_se(sums, counts)
        if self.eval.groups is not None:  # a mixture: each component's own held-out loss, nats and bits per byte
            for g in self.eval.group_tokens:
                pick = [i for i, name in enumerate(self.eval.groups) if name == g]
                loss = step_lib.mean_and_se([sums[i] for i in pick], [counts[i] for i in pick])[0]
                out[f"eval_loss/{g}"] = loss
                nb = self.eval.group_bytes[g]
                out[f"eval_bpb/{g}"] = bits_per_byte(loss, nb / self.eval.group_tokens[g] if nb else None)
        if self.eval_step_topk is not None:
            out["eval_loss_topk"] = step_lib.evaluate_chunks(
                self.eval_step_topk, state["params"], state["rest"], self._eval_device, placed)[0]
        return out

    def _peek_meta(self) -> dict | None:
        """Metadata of the newest checkpoint (for a seconds budget's planned step count)."""
        steps = self.ckpt.steps()
        for s in reversed(steps):
            p = self.ckpt.directory / str(s) / "meta" / "metadata"
            try:
                return json.loads(p.read_text())
            except (OSError, ValueError):
                continue
        return None

    def _base_summary(self, step: int, total_steps: int) -> dict:
        r = self.resolved
        pc = r["params"]
        return {
            "state": "running", "error": None, "steps": step, "total_steps": total_steps,
            "N": pc.get("active_non_embedding"), "N_total": pc.get("total"), "N_active": pc.get("active"),
            "N_embedding": pc.get("embedding"), "config_hash": r["config_hash"],
            "corpus_sha256": self.corpus.get("sha256"), "eval_sha256": self.eval.sha256,
            "eval_tokens": self.eval.n_tokens, "eval_bytes": self.eval.n_bytes, "causal": self.cfg.model.causal_eval,
            "text_sha256": self.corpus.get("text_sha256"), "tokenizer": self.corpus.get("tokenizer"),
            "tokenizer_sha256": self.corpus.get("tokenizer_sha256"), "vocab_size": self.corpus.get("vocab_size"),
            "unique_tokens": self.corpus.get("unique_tokens"),
            # an upcycled run: its dense stage (D1 tokens, FLOPs); tokens/flops count this stage only
            **({"dense_tokens": r["upcycled_from"]["tokens"], "dense_flops": r["upcycled_from"]["flops"],
                "dense_N": r["upcycled_from"]["params"]} if r.get("upcycled_from") else {}),
        }

    def _hardware_flops(self, step: int) -> float:
        """Hardware FLOPs of steps ``0..step``: earlier sessions' (from the checkpoint) plus this
        session's at its own kernels' rate."""
        base_step, base = self.hw_base
        tokens = self.schedule.tokens_before(step) - self.schedule.tokens_before(base_step)
        return base + tokens * self.resolved["hardware_flops_per_token"]

    def _figures(self, t: "_Tally") -> dict:
        r, peak, step, eval_loss, last_row, train_s = self.resolved, self.peak, t.step, t.eval_loss, t.last_row, t.train_s
        tokens = self.schedule.tokens_before(step)
        tok_s = t.session_tokens / t.session_s if t.session_s > 0 else float("nan")
        n_train = float(self.corpus.get("unique_tokens") or self.corpus.get("n_train_tokens") or 0)
        return {
            "steps": step, "tokens": tokens, "D": tokens,
            "flops": tokens * r["train_flops_per_token"], "C": tokens * r["train_flops_per_token"],
            "flops_6n": tokens * r["six_n_flops_per_token"],
            "final_eval_loss": eval_loss, "final_train_loss": last_row.get("loss"),
            "final_eval_bpb": bits_per_byte(eval_loss, self.eval.bytes_per_token),
            "final_train_bpb": bits_per_byte(last_row.get("loss"), self.corpus.get("train_bytes_per_token")),
            "tokens_per_s": tok_s, "mfu": tok_s * r["train_flops_per_token"] / peak,
            "hardware_flops": self._hardware_flops(step),
            "hfu": tok_s * r["hardware_flops_per_token"] / peak,
            "wall_s": train_s, "total_s": time.perf_counter() - self.t_start,
            "epochs": tokens / n_train if n_train else None,
        }

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()

    def finish(self, state: str, error: str | None = None) -> dict:
        self._check_lease()
        self.summary.update(state=state, error=error, schema_version=schema.SCHEMA_VERSION)
        if not self.writes:  # every process returns the summary; process 0 records it
            return self.summary
        try:
            write_json_atomic(self.out / "summary.json", self.summary)
        except OSError as err:
            if state != "failed":
                raise
            # recording a failure must not bury it (e.g. the disk is full): say it in one line
            print(f"{self.out}: could not record state failed in summary.json ({err.strerror or err})", file=sys.stderr)
        if self.wandb is not None:
            self.wandb.summary(self.summary)
        return self.summary

    def close(self) -> None:
        for thing in (self.progress, self.metrics, self.wandb, self.ckpt, self.iterator):
            if thing is not None:
                try:
                    thing.close()
                except Exception:
                    pass
        self.ctx.__exit__(None, None, None)
