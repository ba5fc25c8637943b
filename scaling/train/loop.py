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
import os
import socket
import sys
from pathlib import Path

import jax
import numpy as np

from scaling import schema, storage
from scaling.config import ConfigError, TrainConfig, config_hash
from scaling.errors import LeaseLost, RunDirBusy
from scaling.files import read_json, write_json_atomic
from scaling.lease import RunLease
from scaling.train import optim
from scaling.train.cache import enable_compilation_cache

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
    upcycled = None
    if cfg.init_from:
        parse_init_from(cfg.init_from)
        from scaling.models import upcycle

        if cfg.init.upcycle == "moe":
            upcycled = upcycle.plan(cfg)
        else:  # a branch continues the same model: a dense source and an MoE here is an upcycling
            from scaling import blocks

            try:
                src_ffn = blocks.ffn(upcycle.source_config(cfg.init_from).model)
            except ConfigError:  # no readable config.json: the restore itself decides
                src_ffn = blocks.ffn(cfg.model)
            if src_ffn != blocks.ffn(cfg.model):
                raise ConfigError(f"init_from: the checkpoint's model has model.ffn={src_ffn}, this one "
                                  f"{blocks.ffn(cfg.model)}; a branch continues the same model (to turn a dense "
                                  "checkpoint into an MoE set init.upcycle=moe)")
    if cfg.eval_tasks:
        from scaling.train.tasks_eval import suites_for_run

        suites_for_run(cfg)
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
        **({"upcycled_from": upcycled} if upcycled else {}),
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
    from scaling.train.session import Session

    try:
        session = Session(cfg, out, resolved, lease)  # ConfigErrors from mesh/data surface here
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
