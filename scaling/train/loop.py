"""``run(cfg, out_dir)``: one budget-aware training run, resumable, writing

``out_dir/config.json``   the config plus ``resolved`` run facts (corpus hash, params, FLOPs),
``out_dir/metrics.jsonl`` one row per logged step (the source of truth),
``out_dir/summary.json``  final figures and the state: done | diverged | failed,
``out_dir/ckpt/``         orbax checkpoints (train state + data iterator state + metadata).

Budgets: ``flops`` / ``tokens`` / ``steps`` resolve to a step count through
``scaling.flops.steps_for_budget`` (the schedule ends exactly there). ``seconds``: after
compilation the step is timed on a throw-away copy of the state, the schedule is sized to
``floor(seconds / step_time)`` steps (stored in the checkpoint, so a resume keeps it), and the run
stops at that step or as soon as the training wall time (summed over resumes, compilation,
evaluation and checkpointing excluded) reaches the budget, whichever comes first.

Divergence is checked at every logging step (that step's loss): a NaN/inf loss, or, after warmup,
a loss above ``divergence_factor`` times the best logged loss so far, stops the run with state
``diverged`` and a message; ``run`` then returns normally (a sweep carries on).

Resume is exact: the same compiled step, the restored train state and grain iterator state, and
metrics rows beyond the restored step dropped, so an interrupted-then-resumed run reproduces the
uninterrupted one bit for bit (on the same machine and device count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling import faults, schema, storage
from scaling.config import ConfigError, TrainConfig, config_hash
from scaling.data.tokenize import bits_per_byte
from scaling.errors import LeaseLost, RunDirBusy
from scaling.files import read_json, write_json_atomic
from scaling.lease import RunLease
from scaling.progress import ProgressLine, train_text
from scaling.train import optim
from scaling.train import step as step_lib
from scaling.train.cache import enable_compilation_cache
from scaling.train.checkpoint import Checkpointer
from scaling.train.metrics import MetricsWriter, WandbMirror, hardware_flops_per_token, peak_flops, wandb_grouping

# fields that do not change what is computed: a rerun may differ in these
COSMETIC_FIELDS = ("wandb", "progress")
WALL_FIELDS = ("wall_s", "tokens_per_s", "mfu", "hfu", "step_time_s")  # differ between identical runs


# ----------------------------------------------------------------------------------------------
# run directory helpers
# ----------------------------------------------------------------------------------------------


def load_config(run_dir: str | Path) -> TrainConfig:
    """The ``TrainConfig`` stored in ``run_dir/config.json`` (without the recorded facts:
    ``resolved``, ``schema_version``, ``provenance``)."""
    d = json.loads((storage.path(run_dir) / "config.json").read_text())
    return TrainConfig.from_dict(schema.config_fields(d))


def read_summary(run_dir: str | Path) -> dict | None:
    s = read_json(storage.path(run_dir) / "summary.json")
    return s if isinstance(s, dict) else None


def _comparable(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    for k in COSMETIC_FIELDS:
        d.pop(k, None)
    # tuples -> lists, as read back from JSON; speed settings left out: a resume may change them
    return schema.without_unhashed(json.loads(json.dumps(d)))


def run_hash(cfg: TrainConfig) -> str:
    """Hash of everything that affects the computation (not wandb/progress)."""
    return config_hash(dataclasses.replace(cfg, wandb="off", progress=True))


def checkpoint_location(cfg: TrainConfig, out, recorded: dict | None = None) -> str | Path:
    """Where a run's checkpoints go: ``cfg.checkpoint_dir`` (a relative one made absolute), else
    ``OUT/ckpt``; ``recorded`` (a ``config.json``) gives the location the run recorded, which
    wins. A URL must be one orbax writes (``gs://``); a run directory on another store names
    ``checkpoint_dir``."""
    kept = ((recorded or {}).get("resolved") or {}).get("checkpoint_location")
    if kept:
        return kept if storage.is_url(kept) else Path(kept)
    if cfg.checkpoint_dir:
        where = cfg.checkpoint_dir if storage.is_url(cfg.checkpoint_dir) else storage.path(cfg.checkpoint_dir).absolute()
    else:
        where = str(out / "ckpt") if isinstance(out, storage.StorePath) else Path(out).absolute() / "ckpt"
    if storage.is_url(str(where)) and not str(where).startswith(ORBAX_SCHEMES):
        field = "checkpoint_dir" if cfg.checkpoint_dir else "out"
        raise ConfigError(f"{field}: orbax writes checkpoints to local paths and {', '.join(ORBAX_SCHEMES)}, not "
                          f"{str(where).split('://')[0]}://; set checkpoint_dir to a local directory or a gs:// URL")
    return where


ORBAX_SCHEMES = ("gs://",)  # what orbax/tensorstore write natively
CHECKPOINT_OWNER = "scaling_run.json"  # in a checkpoint_dir: the run directory it belongs to


def _steps_in(where) -> list[str]:
    """The checkpoint steps (orbax's numbered directories) at ``where``; [] when there is none."""
    p = storage.path(str(where))
    return sorted((c.name for c in p.iterdir() if c.name.isdigit()), key=int) if p.exists() else []


def _claim_checkpoint_dir(cfg: TrainConfig, out) -> None:
    """An explicit ``checkpoint_dir`` records its run directory on first use; another run
    directory pointed at it is refused (it would resume that run's checkpoints)."""
    where = checkpoint_location(cfg, out)
    old = read_json(out / "config.json")
    if isinstance(old, dict):  # a resume: the checkpoints stay where the run put them
        before = checkpoint_location(TrainConfig(), out, recorded=old)  # recorded, else OUT/ckpt
        if str(before) != str(where) and _steps_in(before):
            raise ConfigError(f"checkpoint_dir: this run's checkpoints are in {before}; resume with "
                              f"checkpoint_dir={before} (a new location would restart it from step 0)")
    if not cfg.checkpoint_dir:
        return
    owner = storage.path(str(where)) / CHECKPOINT_OWNER
    me = str(out) if isinstance(out, storage.StorePath) else str(Path(out).resolve())
    recorded = (read_json(owner) or {}).get("run_dir")  # every process reads: all refuse together
    if recorded is None:
        taken = _steps_in(where)
        if taken:  # another run's checkpoints without a claim (e.g. a run's own ckpt/)
            raise ConfigError(f"checkpoint_dir: {where} already holds checkpoints (steps {', '.join(taken)}) "
                              "of another run; give this run its own checkpoint_dir")
        if jax.process_index() == 0:
            write_json_atomic(owner, {"run_dir": me})
    elif recorded != me:
        raise ConfigError(f"checkpoint_dir: {where} holds the checkpoints of run {recorded}; give each run its own "
                          "checkpoint_dir")


def parse_init_from(text: str) -> tuple[Path, int]:
    """``"RUN_DIR@STEP"`` -> ``(the run's checkpoint directory, STEP)``."""
    if "@" not in text:
        raise ConfigError(f"init_from: expected RUN_DIR@STEP, got {text!r}")
    d, s = text.rsplit("@", 1)
    try:
        step = int(s)
    except ValueError:
        raise ConfigError(f"init_from: STEP must be an integer in RUN_DIR@STEP, got {s!r}") from None
    src = read_json(storage.path(d) / "config.json") or {}
    try:
        src_cfg = TrainConfig.from_dict(schema.config_fields(src)) if src else TrainConfig()
    except ConfigError:
        src_cfg = TrainConfig()
    ckpt = checkpoint_location(src_cfg, storage.path(d), recorded=src)
    if storage.is_url(str(ckpt)):
        from etils import epath

        exists = epath.Path(str(ckpt)) / str(step)
    else:
        exists = Path(ckpt) / str(step)
    if not exists.is_dir():
        raise ConfigError(f"init_from: no checkpoint at step {step} in {ckpt}; save one with checkpoint_at={step} in that run")
    return ckpt, step


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f"out: cannot write to {out} ({err.strerror or err}); choose another --out") from None


def _check_same_config(cfg: TrainConfig, out: Path) -> None:
    cfg_path = out / "config.json"
    if cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict) and schema.version_of(old) != schema.SCHEMA_VERSION:
            raise ConfigError(f"out: {out} was written under schema version {schema.version_of(old)} (this is "
                              f"{schema.SCHEMA_VERSION}: see scaling/schema.py); finish it with the version that "
                              f"started it, re-score it with `scaling eval {out}`, or use a new --out")
        if isinstance(old, dict):
            old = schema.config_fields(old)
            try:  # fields added since the run started take their defaults (what it ran with)
                old = TrainConfig.from_dict(old).to_dict()
            except ConfigError:
                pass
            old = json.loads(json.dumps(old))
            for k in COSMETIC_FIELDS:
                old.pop(k, None)
            old = schema.without_unhashed(old)
        if old != _comparable(cfg):
            raise ConfigError(f"out: {out} holds a run with a different config; use a new --out or delete that directory")


def _check_vocab(cfg: TrainConfig, info: dict) -> None:
    need = int(info["vocab_size"])
    if cfg.model.vocab_size < need:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is below the {need} tokens of "
                          f"data.tokenizer={info['tokenizer']} (corpus {info['name']}); set model.vocab_size={need}")


def _recorded_corpus(run_dir: Path) -> dict:
    """The ``corpus_info`` a run recorded in its config.json ({} when there is none to read)."""
    try:
        return json.loads((storage.path(run_dir) / "config.json").read_text()).get("resolved", {}).get("corpus") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def check_tokenizer(run_dir: Path, tokenizer_sha256: str | None) -> None:
    """ConfigError when ``run_dir`` was trained with a tokenizer of another sha256 (for
    re-scoring and sampling, which must read and write the run's own tokens)."""
    rec = _recorded_corpus(run_dir).get("tokenizer_sha256")
    if rec and tokenizer_sha256 and rec != tokenizer_sha256:
        raise ConfigError(f"data.tokenizer: the tokenizer now has sha256 {tokenizer_sha256[:12]}, but {run_dir} was "
                          f"trained with {rec[:12]}; restore the original tokenizer file")


def _check_same_data(out: Path, info: dict) -> None:
    """A run resumes only on the tokens it started with: the same tokenizer and corpus hashes."""
    old = _recorded_corpus(out)
    for key, field_name, what in (("tokenizer_sha256", "data.tokenizer", "tokenizer"), ("sha256", "data", "corpus")):
        if old.get(key) and info.get(key) and old[key] != info[key]:
            raise ConfigError(f"{field_name}: the {what} now has sha256 {info[key][:12]}, but {out} was started with "
                              f"{old[key][:12]}; restore the original {what} or use a new --out")


def gns_every(cfg: TrainConfig) -> int:
    """Steps between gradient-noise statistics: ``optim.gns_every``, by default every logging
    step (``log_every``); 0 = never."""
    return cfg.log_every if cfg.optim.gns_every is None else cfg.optim.gns_every


def preflight(cfg: TrainConfig) -> dict:
    """Checks that need no device work; returns the resolved run facts (steps may be None for a
    seconds budget). Raises ``ConfigError`` naming the field."""
    from scaling import flops

    d = cfg.data
    if d.source == "local_text" and d.path and not Path(d.path).is_dir():
        raise ConfigError(f"data.path: {d.path} is not a directory; point it at a directory of text files")
    if d.batch_size % 2 and d.microbatch is None and gns_every(cfg):
        raise ConfigError(f"data.batch_size: must be even (a statistics step splits the batch in two halves for the "
                          f"gradient-noise statistics), got {d.batch_size}; or set optim.gns_every=0 or data.microbatch")
    if cfg.init_from:
        parse_init_from(cfg.init_from)
    counts = flops.param_counts(cfg.model)
    train_fpt = float(flops.train_flops_per_token(cfg.model, d.seq_len))
    total_steps = None
    if cfg.budget.kind != "seconds":
        total_steps = int(flops.steps_for_budget(cfg))
        if total_steps < 1:
            one = {"flops": train_fpt * cfg.tokens_per_step, "tokens": cfg.tokens_per_step, "steps": 1}[cfg.budget.kind]
            raise ConfigError(f"budget.{cfg.budget.kind}: {cfg.budget.value:g} is less than one step "
                              f"({one:g} {cfg.budget.kind} per step); raise the budget or shrink the model/batch")
    warnings = []
    if total_steps is not None and cfg.optim.warmup_steps is not None and cfg.optim.warmup_steps > total_steps:
        warnings.append(f"optim.warmup_steps: {cfg.optim.warmup_steps} is longer than the run's {total_steps} steps, so "
                        f"the learning rate never reaches optim.lr={cfg.optim.lr:g}; lower it or raise the budget")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return {
        "warnings": warnings,
        "config_hash": run_hash(cfg),
        "params": dataclasses.asdict(counts) if dataclasses.is_dataclass(counts) else dict(counts._asdict()),
        "train_flops_per_token": train_fpt,
        "forward_flops_per_token": float(flops.forward_flops_per_token(cfg.model, d.seq_len)),
        "six_n_flops_per_token": float(flops.six_n_flops_per_token(cfg.model)),
        "tokens_per_step": cfg.tokens_per_step,
        "total_steps": total_steps,
        "budget_kind": cfg.budget.kind,
    }


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def run(cfg: TrainConfig, out_dir: str | Path) -> dict:
    """Train ``cfg`` into ``out_dir`` until its budget is spent; return the summary dict.

    Returns at once with the stored summary if the run already finished (done or diverged).
    The run directory's lease (``scaling.lease``) is held throughout (by process 0 of a
    multi-host run): a second trainer on a busy directory raises ``RunDirBusy`` before it writes
    anything. Raises ``ConfigError`` for bad input before training; for any other error writes
    state ``failed`` (with the error) to summary.json and re-raises.
    """
    out = storage.path(out_dir)
    enable_compilation_cache()
    _check_writable(out)
    prev = read_summary(out)
    if prev and prev.get("state") in ("done", "diverged"):
        loss = prev.get("final_eval_loss")
        print(f"{out}: run already {prev['state']} at step {prev.get('steps')} "
              f"(final eval loss {loss}); nothing to do", file=sys.stderr)
        return prev
    from scaling import sharding

    process_index, process_count = sharding.initialize_distributed()  # no-op for one process; before any jax work
    if process_index == 0 and isinstance(out, storage.StorePath):
        # a lease needs an atomic lock the store may not offer: one trainer per directory is on you
        print(f"{out}: on an object store the run directory has no lease; start one trainer for it",
              file=sys.stderr)
    local = not isinstance(out, storage.StorePath)
    lease = RunLease(out, join=True) if process_index == 0 and local else contextlib.nullcontext()
    if process_count == 1:
        with lease as held:
            return _run_leased(cfg, out, held)
    with contextlib.ExitStack() as stack:  # several processes: all learn whether process 0 got the lease
        held, busy = None, None
        try:
            held = stack.enter_context(lease)
        except RunDirBusy as err:
            busy = err
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(busy is None))):
            raise busy or RunDirBusy(f"{out}: another trainer holds this run directory's lease (process 0 found it "
                                     "busy); wait for it or use another --out")
        return _run_leased(cfg, out, held)


def _run_leased(cfg: TrainConfig, out: Path, lease: RunLease | None) -> dict:
    if jax.process_count() > 1 and cfg.budget.kind == "seconds":  # every process raises it alike
        raise ConfigError("budget.seconds: a wall-clock budget needs one clock, and each process of a multi-process "
                          "run keeps its own; use budget.steps, budget.tokens or budget.flops")
    _check_same_config(cfg, out)
    _claim_checkpoint_dir(cfg, out)  # a store orbax cannot write, another run's: ConfigError first
    prev = read_summary(out)  # another trainer may have finished it while we waited for the lease
    if prev and prev.get("state") in ("done", "diverged"):
        return prev
    resolved = preflight(cfg)
    try:
        session = _Session(cfg, out, resolved, lease)  # ConfigErrors from mesh/data surface here
    except ConfigError:
        raise
    except BaseException as err:
        if lease is not None:
            lease.check()  # LeaseLost: the directory is someone else's now, write nothing
        if jax.process_index() != 0:  # process 0 records the run's state
            raise
        write_json_atomic(out / "summary.json", {"state": "failed", "error": f"{type(err).__name__}: {err}",
                                                 "config_hash": resolved["config_hash"],
                                                 "schema_version": schema.SCHEMA_VERSION})
        raise
    try:
        return session.train()
    except (ConfigError, LeaseLost):
        raise  # bad input, or the directory is someone else's now: write nothing
    except BaseException as err:
        session.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        session.close()


class _Session:
    """Everything built for one process's part of a run (mesh, model, optimizer, data)."""

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
        self.iterator = loader.make_train_iterator(cfg.data, seed=cfg.seed, process_index=self.shard_index,
                                                   process_count=self.shard_count)
        self.eval = loader.eval_set(cfg.data)
        resolved["eval_set"] = self.eval.describe()
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
        cfg, out, resolved = self.cfg, self.out, self.resolved
        # the planned step count: from the budget, or from a previous session (seconds budget)
        latest_meta = None
        total_steps = resolved["total_steps"]
        if total_steps is None:
            latest_meta = self._peek_meta()
            total_steps = latest_meta["total_steps"] if latest_meta else None
        state = self._build_step()
        mem = self._sharding.memory_report(state["params"], state["opt_state"], cfg, self.mesh)
        resolved["memory_per_device"] = mem
        if cfg.progress:
            print(f"{out}: {self._sharding.format_memory_report(mem)}", file=sys.stderr)
        if total_steps is None:
            total_steps = self._estimate_steps_for_seconds(state)
        resolved["total_steps"] = total_steps
        self.total_steps = total_steps
        self._check_lease()
        if self.writes:
            write_json_atomic(out / "config.json", {**json.loads(cfg.to_json()), "resolved": resolved,
                                                    "schema_version": schema.SCHEMA_VERSION,
                                                    "provenance": schema.provenance(self.corpus)})

        # restore: own checkpoint, else a branch point of another run, else fresh
        meta = {"step": 0, "best_loss": None, "train_s": 0.0, "total_steps": total_steps}
        restored = self.ckpt.restore_latest(state)
        if restored is not None:
            step, state, data_state, meta = restored
            self.iterator.set_state(data_state)
            print(f"{out}: resuming from checkpoint step {step}/{total_steps}", file=sys.stderr)
        elif cfg.init_from:
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
        # the run's own length drives the schedule (a branch restores another run's total)
        state["total_steps"] = jnp.asarray(total_steps, jnp.int32)
        step = int(meta["step"])
        best = meta.get("best_loss")
        best = float(best) if best is not None else math.inf
        train_s = float(meta.get("train_s", 0.0))
        # hardware FLOPs add up per session: a resumed run may run another kernel or remat policy
        # (they are not part of the config hash); a checkpoint without the figure: this session's rate
        hw = meta.get("hardware_flops")
        self.hw_base = (step, float(hw) if hw is not None else self.schedule.tokens_before(step)
                        * resolved["hardware_flops_per_token"])
        if step > total_steps:
            raise ConfigError(f"init_from: step {step} is beyond this run's {total_steps} steps; raise the budget")

        self.metrics = MetricsWriter(out / "metrics.jsonl", keep_through_step=step, read_only=not self.writes)
        wandb_dir = out if isinstance(out, Path) else Path(tempfile.gettempdir()) / "scaling-wandb" / resolved["config_hash"]
        self.wandb = WandbMirror(cfg.wandb if self.writes else "off", run_dir=wandb_dir, run_id=resolved["config_hash"],
                                 name=cfg.name, **wandb_grouping(cfg, out),
                                 config={**cfg.to_dict(), "resolved": resolved})
        self.progress = ProgressLine(total_steps, enabled=cfg.progress and self.writes)
        fpt = resolved["train_flops_per_token"]
        tokens_at = self.schedule.tokens_before  # training tokens before a step (the batch may change)
        peak = peak_flops(len(self.mesh.devices.flat))
        warm = optim.warmup_steps(cfg.optim, total_steps)
        unique_tokens = float(self.corpus.get("unique_tokens") or self.corpus.get("n_train_tokens") or 0)
        train_bpt = self.corpus.get("train_bytes_per_token")  # the corpus mean: loss_bpb is approximate

        self.summary = self._base_summary(step, total_steps)
        last_row: dict[str, Any] = self.metrics.kept[-1] if self.metrics.kept else {}
        eval_loss = None
        evals: dict[str, float] = {}
        seg_t = time.perf_counter()  # start of the current timed training segment
        seg_step = step
        session_tokens, session_s = 0, 0.0
        compiled = False

        def close_segment(now: float) -> float:
            nonlocal seg_t, seg_step, train_s, session_tokens, session_s
            dt = now - seg_t
            if compiled:
                train_s += dt
                session_tokens += tokens_at(step) - tokens_at(seg_step)
                session_s += dt
            return dt

        time_spent = cfg.budget.kind == "seconds" and train_s >= cfg.budget.seconds  # resumed after the end
        every = gns_every(cfg)
        ran_batches: set[int] = set()
        while step < total_steps and not time_spent:
            batch = self.put(next(self.iterator))
            b_now = self.schedule.batch_at(step)
            fresh = b_now not in ran_batches  # the first step at a batch size compiles its program
            if fresh and compiled:  # a batch-schedule switch: time the steps before it, not the compile
                jax.block_until_ready(state)
                close_segment(time.perf_counter())
            state, m = self.step_for(b_now)(state, batch)
            step += 1
            faults.point("train_step", step)
            if fresh:
                jax.block_until_ready(m)  # compilation is not counted as training time
                compiled = True
                ran_batches.add(b_now)
                seg_t, seg_step = time.perf_counter(), step
            logging = step % cfg.log_every == 0 or step == total_steps
            logging = logging or bool(every and step % every == 0)  # every statistic computed is logged
            evaluating = step % cfg.eval_every == 0 or step == total_steps
            saving = step % cfg.checkpoint_every == 0 or step == total_steps or step in cfg.checkpoint_at
            over_time = cfg.budget.kind == "seconds" and (train_s + time.perf_counter() - seg_t) >= cfg.budget.seconds
            if over_time:
                logging = evaluating = saving = True
            if not (logging or evaluating or saving):
                continue
            m = jax.device_get(m)
            now = time.perf_counter()
            seg_steps = step - seg_step
            dt = close_segment(now)
            tok_s = (tokens_at(step) - tokens_at(seg_step)) / dt if dt > 0 and seg_steps else float("nan")
            loss = float(m["loss"])
            row = {"step": step, "tokens": tokens_at(step), "flops": tokens_at(step) * fpt,
                   "wall_s": train_s, "tokens_per_s": tok_s, "mfu": tok_s * fpt / peak,
                   "hfu": tok_s * self.resolved["hardware_flops_per_token"] / peak,
                   "epochs": tokens_at(step) / unique_tokens if unique_tokens else None}
            if not self.schedule.constant:
                row["batch_size"] = self.schedule.batch_at(step - 1)
            # the noise-scale statistics are NaN on steps that did not compute them: not logged
            row.update({k: float(v) for k, v in m.items() if not (k.startswith("gns_") and not math.isfinite(float(v)))})
            row["loss_bpb"] = bits_per_byte(loss, train_bpt)
            diverged = None
            if not math.isfinite(loss):
                diverged = f"loss is {loss} at step {step}"
            elif step > warm and loss > cfg.divergence_factor * best:
                diverged = (f"loss {loss:.4g} at step {step} exceeds divergence_factor={cfg.divergence_factor:g} x "
                            f"best loss so far {best:.4g}")
            if math.isfinite(loss):
                best = min(best, loss)
            if evaluating and diverged is None:
                evals = self._evaluate(state)
                row.update(evals)
                eval_loss = evals["eval_loss"]
                row["eval_bpb"] = bits_per_byte(eval_loss, self.eval.bytes_per_token)
                extra = f" (top-k MoD routing, looks ahead: {evals['eval_loss_topk']:.4f})" if "eval_loss_topk" in evals else ""
                self.progress.message(f"step {step}/{total_steps}: eval loss {eval_loss:.4f} nats{extra}")
            if logging or evaluating:
                self._check_lease()
                self.metrics.write(row)
                self.wandb.log(row)
                last_row = row
            remaining = (total_steps - step) * (dt / seg_steps if seg_steps else 0.0)
            self.progress.update(train_text(loss=loss, tokens_per_s=tok_s, mfu=row["mfu"], eta_s=remaining), n=step)
            if diverged is not None:
                msg = (f"run diverged: {diverged}; stopped (lower optim.lr={cfg.optim.lr:g}, "
                       f"or raise divergence_factor)")
                self.progress.message(msg)
                print(msg, file=sys.stderr)
                self.summary.update(self._figures(step, last_row, eval_loss, session_tokens, session_s, train_s, peak))
                return self.finish("diverged", error=msg)
            if saving:
                self._check_lease()
                meta = {"step": step, "best_loss": best if math.isfinite(best) else None, "train_s": train_s,
                        "total_steps": total_steps, "config_hash": resolved["config_hash"],
                        "hardware_flops": self._hardware_flops(step)}
                self.ckpt.save(step, state, self.iterator.get_state(), meta)
            if over_time:
                break
            seg_t, seg_step = time.perf_counter(), step

        self.progress.close()
        if eval_loss is None:  # resumed from the final checkpoint: nothing trained, still evaluate
            evals = self._evaluate(state)
            eval_loss = evals["eval_loss"]
        self.summary.update(self._figures(step, last_row, eval_loss, session_tokens, session_s, train_s, peak))
        self.summary["final_eval_loss_se"] = evals.get("eval_loss_se")
        self.summary["final_eval_bpb_se"] = bits_per_byte(evals.get("eval_loss_se"), self.eval.bytes_per_token)
        for k, v in evals.items():
            if k.startswith(("eval_loss/", "eval_bpb/")):
                self.summary[f"final_{k}"] = v
        for name, comp in (self.corpus.get("components") or {}).items():  # epochs of each mixture component
            if comp.get("n_train_tokens"):
                self.summary[f"epochs/{name}"] = self.summary["tokens"] * comp["weight"] / comp["n_train_tokens"]
        per = [v for k, v in self.summary.items() if k.startswith("epochs/")]
        # the most repeated component: what a data-constrained law must see (epochs averages it away)
        self.summary["max_epochs"] = max(per) if per else self.summary.get("epochs")
        if "eval_loss_topk" in evals:
            self.summary["final_eval_loss_topk"] = evals["eval_loss_topk"]
        return self.finish("done")

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
        }

    def _hardware_flops(self, step: int) -> float:
        """Hardware FLOPs of steps ``0..step``: earlier sessions' (from the checkpoint) plus this
        session's at its own kernels' rate."""
        base_step, base = self.hw_base
        tokens = self.schedule.tokens_before(step) - self.schedule.tokens_before(base_step)
        return base + tokens * self.resolved["hardware_flops_per_token"]

    def _figures(self, step, last_row, eval_loss, session_tokens, session_s, train_s, peak) -> dict:
        r = self.resolved
        tokens = self.schedule.tokens_before(step)
        tok_s = session_tokens / session_s if session_s > 0 else float("nan")
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
