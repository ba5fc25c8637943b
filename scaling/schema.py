"""What a run directory's numbers mean: the schema version, and where a run came from.

``SCHEMA_VERSION`` changes whenever the meaning of a recorded figure changes (e.g. how the
fitted ``loss`` column is defined for sparse models, or a new unit), so runs measured before and
after cannot be fitted together by accident: ``scaling.runs.load`` refuses a table that mixes
versions unless asked (``allow_mixed=True``).

History (bump the number and add a line; never reuse one):

1. first wave: ``config.json`` without ``schema_version`` or ``provenance`` (read as 1).
2. ``config.json`` and ``summary.json`` carry ``schema_version``; ``config.json`` carries
   ``provenance``. Figures are defined as in version 1.
3. One held-out set (``data.eval_tokens``, default the whole split up to 2^18 tokens, in fixed
   chunks) for every batch size and mesh, instead of ``eval_batches x batch_size`` sequences:
   ``loss`` (``final_eval_loss``) is a mean over a different set than in versions 1-2.
   ``summary.json`` adds ``final_eval_loss_se``, ``eval_sha256`` and ``eval_tokens``.
   And the fitted loss is causal, as a sampler sees the model: MoD with each token's own
   routing decision (the top-k number, which looks ahead, is ``final_eval_loss_topk``), MoE
   token choice evaluated without dropping; ``causal`` is false for expert-choice MoE and for
   MoD with ``causal_aux="none"`` (which trains no causal decision: its top-k loss is stored),
   rows that fits leave out unless asked. A run directory of an older version is not resumed.
4. Causal attention FLOPs: ``flops`` / ``C``, ``budget.flops`` (so the step count of a FLOP
   budget) and MFU count ``QK^T`` and ``PV`` over the ``(L + 1) / 2`` unmasked keys per query,
   not the full ``L x L`` square (``scaling/flops.py``); a FLOP bucket now buys more steps.
   What the kernel computes is recorded apart: ``hardware_flops`` and ``hfu`` in summaries,
   ``hardware_flops_per_token`` in ``config.json``'s ``resolved``.

Standard library only.
"""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path

SCHEMA_VERSION = 4
UNVERSIONED = 1  # what a run directory without a schema_version field was written under

# Config fields added after trial ids were first published, with the value every earlier config
# had. They enter ``config.config_hash`` (trial ids) and ``runs.load``'s seed groups only when they
# differ from it, so adding a field never renames an existing sweep's trials or splits its groups.
LATE_FIELDS = {("model", "parametrization"): "sp", ("model", "mup_base_width"): None,
               ("model", "mup_base_head_dim"): None, ("data", "tokenizer"): "bytes", ("data", "include"): (),
               ("data", "exclude"): (), ("data", "packages"): (), ("data", "mixture"): (),
               ("data", "unique_tokens"): None, ("data", "microbatch"): None, ("optim", "gns_every"): None,
               ("data", "batch_schedule"): (), ("optim", "batch_lr_exponent"): 0.0,
               ("model", "scan_layers"): False, ("model", "blocks"): {}, ("model", "precision"): None,
               (None, "init"): {"upcycle": "none", "noise": 0.0, "data": "continue"}, ("data", "tasks"): (),
               ("data", "task_examples"): 200_000, (None, "eval_tasks"): (), (None, "eval_task_examples"): 200}
# Settings that change how fast a run goes, never what it computes: left out of trial ids and of
# the same-config check on resume, so a run can resume with a different value.
UNHASHED_FIELDS = {("data", "worker_count"), ("model", "remat"), ("model", "attention"), (None, "checkpoint_dir")}


# Display settings that change nothing a run computes but entered trial ids from the start:
# hashed at the value almost every earlier config had, whatever the config says, so that
# changing the default (wandb became offline) renames no trial and splits no seed group. A
# trial that set wandb=offline/online before got a new id then (it trains again).
# (progress is not pinned: sweeps always hashed progress=false, single runs true.)
PINNED_FIELDS = {(None, "wandb"): "off"}


def without_unhashed(config: dict) -> dict:
    """A copy of a config dict (its sections copied one level deep) without the
    ``UNHASHED_FIELDS``."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for section, name in UNHASHED_FIELDS:
        if section is None:  # a top-level field
            d.pop(name, None)
        elif isinstance(d.get(section), dict):
            d[section].pop(name, None)
    return d


def without_late_defaults(config: dict) -> dict:
    """A copy of a config dict without the ``LATE_FIELDS`` that hold their old value and without
    the ``UNHASHED_FIELDS``, the ``PINNED_FIELDS`` set to their pinned value."""
    d = without_unhashed(config)
    for (section, name), old in PINNED_FIELDS.items():
        if section is None and name in d:
            d[name] = old
    for (section, name), old in LATE_FIELDS.items():
        if section is None:  # a top-level field or section added late
            value = d.get(name, old)
            if (tuple(value) if isinstance(value, list) else value) == old:  # a tuple read back from JSON
                d.pop(name, None)
            continue
        sec = d.get(section)
        value = sec.get(name, old) if isinstance(sec, dict) else None
        if isinstance(value, list):  # a tuple read back from JSON
            value = tuple(value)
        if isinstance(sec, dict) and value == old:
            sec.pop(name, None)
    return d


PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def source_revision() -> dict:
    """``{"git_commit", "git_dirty"}`` of the checkout this package runs from, when it runs
    from a git checkout (an editable install), else Nones. Two seconds at most."""
    root = Path(__file__).resolve().parents[1]
    out = {"git_commit": None, "git_dirty": None}
    if not (root / ".git").exists():
        return out
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=2)
        if rev.returncode == 0:
            out["git_commit"] = rev.stdout.strip()
            st = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "scaling"],
                                capture_output=True, text=True, timeout=2)
            out["git_dirty"] = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


@functools.lru_cache(maxsize=1)
def _software() -> dict:
    return {"scaling": _version("scaling"), **{p: _version(p) for p in PACKAGES}}


def provenance(corpus: dict | None = None) -> dict:
    """Where a run came from: package versions (``scaling`` and the JAX stack), the git commit
    of the source when it is a checkout, and the corpus and tokenizer hashes (sha256 hex) from
    ``scaling.data.corpus.corpus_info``."""
    corpus = corpus or {}
    return {
        "versions": dict(_software()),
        **source_revision(),
        "corpus_sha256": corpus.get("sha256"),
        "tokenizer": corpus.get("tokenizer"),
        "tokenizer_sha256": corpus.get("tokenizer_sha256"),
    }


# keys of config.json that record facts about a run rather than configure it
RECORD_KEYS = ("schema_version", "provenance", "resolved")


def config_fields(config_json: dict) -> dict:
    """A run's ``config.json`` without the recorded facts: the ``TrainConfig`` fields only."""
    return {k: v for k, v in config_json.items() if k not in RECORD_KEYS}


def version_of(record: dict | None) -> int:
    """The schema version a ``config.json`` or ``summary.json`` dict was written under."""
    if not record:
        return UNVERSIONED
    try:
        return int(record.get("schema_version", UNVERSIONED))
    except (TypeError, ValueError):
        return UNVERSIONED
