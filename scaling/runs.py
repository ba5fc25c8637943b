"""Reading run and sweep directories into tables: the owner of the fitted columns.

This module reads the files the trainer and the sweep store write (``manifest.json``,
``trial.json``, ``summary.json``, ``metrics.jsonl``, the ``lock`` lease) and never their code,
so the numpy-only fitter (``scaling.fit``) can read a sweep without importing jax or the sweep
runner. It never takes a lock: a trial is ``running`` when its lease (``scaling.lease``) is live.

The fitted columns are defined here and nowhere else:

- ``N``: active non-embedding parameters (``summary.json`` ``N``; planned count before it ran),
- ``D``: training tokens, ``C``: counted training FLOPs (``scaling.flops`` convention),
- ``loss``: the final mean held-out cross-entropy, nats per token, as a sampler sees the model
  (``summary.json`` ``final_eval_loss``; causal MoD routing, MoE without dropping),
  ``loss_se``: its standard error over the held-out chunks, ``causal``: false for
  expert-choice MoE (the fitter leaves such rows out unless asked),
- ``bpb``, ``bpb_se``: the same held-out loss in bits per UTF-8 byte of text
  (``final_eval_bpb``; tokenizer-independent, so runs with different tokenizers fit together),
- ``unique_tokens``: training tokens in one epoch of the corpus, ``epochs``: ``D / unique_tokens``,
  ``max_epochs``: the epochs of the most repeated mixture component (= ``epochs`` for one
  source), ``epochs/NAME`` per component, ``final_tasks/SUITE/METRIC`` (``eval_tasks``),
- ``tokenizer``, ``tokenizer_sha256``, ``text_sha256`` (the documents' text), ``corpus_sha256``
  (the token streams): tables that mix texts are refused unless asked (``allow_mixed_corpus``),
- ``schema_version``: the version (``scaling.schema``) the figures were written under,
- ``n_seeds``, ``loss_seed_std`` (``bpb_seed_std``): how many finished runs share the configuration but the seed,
  and the standard deviation of their ``loss`` (``bpb``) (the training noise; ``loss_se`` is the
  held-out-set noise of one run).

Layout read (see ``scaling.sweep.store`` for the writer)::

    runs/<sweep>/manifest.json, events.jsonl, <trial-id>/{trial.json, status.json, config.json,
    metrics.jsonl, summary.json, lock, ckpt/}

A single run directory (``scaling train --out``) reads as a one-row table.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterator

import pandas as pd

from scaling import lease, schema, storage
from scaling.errors import SchemaError, UsageError
from scaling.files import read_json, read_jsonl

STATES = ("pending", "running", "done", "diverged", "failed")
FINAL = ("done", "diverged")
MANIFEST = "manifest.json"

TRIAL_COLUMNS = ["trial_id", "state", "error", "N", "D", "C", "loss", "N_total", "N_active", "N_embedding", "flops_6n",
                 "bucket", "bucket_kind", "variant", "experiment", "shape", "d_model", "n_layers", "n_heads", "batch",
                 "seq_len", "lr", "E", "G", "capacity", "seed", "target_params", "steps", "final_train_loss",
                 "tokens_per_s", "mfu", "hfu", "hardware_flops", "wall_s", "epochs", "role", "main", "branch_step", "name", "schema_version",
                 "causal", "loss_se", "bpb", "bpb_se", "unique_tokens", "tokenizer", "vocab_size", "tokenizer_sha256",
                 "text_sha256", "corpus_sha256"]

STEP_COLUMNS = ["trial_id", "step", "tokens", "flops", "C", "loss", "eval_loss", "lr", "grad_norm", "gns_b_small",
                "gns_b_big", "gns_g_small_sq", "gns_g_big_sq", "tokens_per_s", "wall_s"]


def trial_state(trial_dir: str | Path) -> tuple[str, str | None]:
    """``(state, error)`` of a trial or run directory: ``done``/``diverged`` when its
    ``summary.json`` says so (final), ``running`` while a live process holds its lease,
    ``failed`` when the last attempt raised (the error is kept), else ``pending`` (never
    started, or interrupted: its checkpoints resume it). Reads files only."""
    d = storage.path(trial_dir)
    summary = read_json(d / "summary.json") or {}
    if summary.get("state") in FINAL:
        return summary["state"], summary.get("error")
    if isinstance(d, Path) and lease.is_running(d):  # runs on object stores hold no lease
        return "running", None
    status = read_json(d / "status.json") or {}
    if status.get("state") == "failed" or summary.get("state") == "failed":
        return "failed", status.get("error") or summary.get("error")
    return "pending", None


def _trial_dirs(path: Path) -> Iterator[tuple[Path, dict]]:
    """(trial_dir, description) for a sweep dir (via its manifest) or a single run dir."""
    m = read_json(path / MANIFEST)
    if isinstance(m, dict):
        if not isinstance(m.get("trials"), list):
            raise UsageError(f"{path / MANIFEST}: no 'trials' list; not a manifest written by scaling sweep")
        for row in m["trials"]:
            yield path / row["trial_id"], row
    elif (path / "summary.json").exists() or (path / "config.json").exists():
        yield path, read_json(path / "trial.json") or {"trial_id": path.name}
    else:
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            if (sub / "trial.json").exists() or (sub / "summary.json").exists():
                yield sub, read_json(sub / "trial.json") or {"trial_id": sub.name}


def _with_rescored(d: Path, summary: dict) -> dict:
    """The summary with ``scaling eval``'s re-scored figures (``rescored.json``) in place of
    the old ones when those are of the current schema version and the summary's are not."""
    r = read_json(d / "rescored.json")
    if not isinstance(r, dict) or summary.get("state") != "done":
        return summary
    if schema.version_of(r) != schema.SCHEMA_VERSION or schema.version_of(summary) == schema.SCHEMA_VERSION:
        return summary
    if r.get("step") != summary.get("steps"):  # re-scored before the run finished: not its final figures
        return summary
    keys = ("final_eval_loss", "final_eval_loss_se", "final_eval_bpb", "final_eval_bpb_se", "eval_sha256", "eval_tokens",
            "causal", "schema_version")
    return {**summary, **{k: r.get(k) for k in keys}, "rescored": True}


def _nan(x):
    return math.nan if x is None else x


def _measured_version(d: Path, summary: dict) -> float:
    """Schema version of a trial that has written figures (NaN for one that has not)."""
    if summary:
        return float(schema.version_of(summary))
    cfg = read_json(d / "config.json")
    return float(schema.version_of(cfg)) if cfg else math.nan


def check_schema(df: pd.DataFrame, *, allow_mixed: bool = False, where: str = "table") -> None:
    """Raise ``SchemaError`` when ``df``'s measured rows come from more than one schema version."""
    if allow_mixed or "schema_version" not in df or df.empty:
        return
    runs = df.drop_duplicates("trial_id") if "trial_id" in df else df
    if "state" in runs:  # only measured runs count: a failed or pending trial is not fitted
        runs = runs[runs["state"].astype(str).isin(FINAL)]
    counts = pd.to_numeric(runs["schema_version"], errors="coerce").dropna().astype(int).value_counts().sort_index()
    if len(counts) > 1:
        parts = " and ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in counts.items())
        raise SchemaError(f"schema_version: {where} mixes runs written under schema versions {parts}, whose "
                          f"figures may be defined differently; rerun the old runs, or load them together with "
                          f"allow_mixed=True (scaling fit/plot --allow-mixed-schema)")


def check_corpus(df: pd.DataFrame, *, allow_mixed_corpus: bool = False, where: str = "table") -> None:
    """Raise ``SchemaError`` when ``df``'s measured rows read different texts (``text_sha256``):
    installed files differ between machines, so the packages corpus of two machines may."""
    if allow_mixed_corpus or "text_sha256" not in df or df.empty:
        return
    runs = df[df["state"].astype(str).isin(FINAL)] if "state" in df else df
    texts = runs["text_sha256"].dropna().astype(str).value_counts()
    if len(texts) > 1:
        parts = " and ".join(f"{h[:12]} ({n} run{'s' if n > 1 else ''})" for h, n in texts.items())
        raise SchemaError(f"text_sha256: {where} mixes runs trained on different corpora, {parts}; keep one corpus, "
                          "or load them together with allow_mixed_corpus=True (scaling fit/plot --allow-mixed-corpus)")


def load(path: str | Path, *, allow_mixed: bool = False, allow_mixed_corpus: bool = False) -> pd.DataFrame:
    """One row per trial: ``N`` (active non-embedding params), ``D`` (training tokens), ``C``
    (counted training FLOPs), ``loss`` (final eval loss, nats), ``state``, ``schema_version``
    and the trial's settings (bucket FLOPs, shape, batch, lr, E, G, capacity, seed, ...). Trials
    that are not done carry their planned N and NaN for D, C and loss; fitters keep
    ``state == "done"``. Raises ``SchemaError`` when trials of different schema versions meet,
    unless ``allow_mixed``, or trials of different corpora (``text_sha256``), unless
    ``allow_mixed_corpus``."""
    path = storage.path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such sweep directory")
    rows = []
    for d, desc in _trial_dirs(path):
        s = _with_rescored(d, read_json(d / "summary.json") or {})
        if s and "tokenizer_sha256" not in s:  # written before summaries named it: config.json did
            corpus = ((read_json(d / "config.json") or {}).get("resolved") or {}).get("corpus") or {}
            s = {**s, "tokenizer": corpus.get("tokenizer"), "tokenizer_sha256": corpus.get("tokenizer_sha256"),
                 "vocab_size": corpus.get("vocab_size")}
        state, error = trial_state(d)
        row = {k: desc.get(k) for k in TRIAL_COLUMNS if k in desc}
        row.update(trial_id=desc.get("trial_id", d.name), state=state, error=error,
                   N=s.get("N", desc.get("N_planned")), N_total=s.get("N_total", desc.get("N_total")),
                   N_active=s.get("N_active"), N_embedding=s.get("N_embedding"),
                   D=_nan(s.get("D", s.get("tokens"))), C=_nan(s.get("C", s.get("flops"))),
                   loss=_nan(s.get("final_eval_loss")), loss_se=_nan(s.get("final_eval_loss_se")),
                   bpb=_nan(s.get("final_eval_bpb")), bpb_se=_nan(s.get("final_eval_bpb_se")),
                   unique_tokens=_nan(s.get("unique_tokens")), tokenizer=s.get("tokenizer"),
                   vocab_size=s.get("vocab_size"), tokenizer_sha256=s.get("tokenizer_sha256"),
                   text_sha256=s.get("text_sha256"), corpus_sha256=s.get("corpus_sha256"),
                   flops_6n=_nan(s.get("flops_6n")),
                   final_train_loss=_nan(s.get("final_train_loss")), tokens_per_s=_nan(s.get("tokens_per_s")),
                   mfu=_nan(s.get("mfu")), hfu=_nan(s.get("hfu")), hardware_flops=_nan(s.get("hardware_flops")),
                   wall_s=_nan(s.get("wall_s")), epochs=_nan(s.get("epochs")),
                   max_epochs=_nan(s.get("max_epochs", s.get("epochs"))),
                   steps=s.get("steps", desc.get("steps")), schema_version=_measured_version(d, s),
                   causal=s.get("causal"), rescored=bool(s.get("rescored", False)))
        if s.get("dense_tokens") is not None:  # an upcycled run: its dense stage (D1 tokens, C1 FLOPs, N1)
            row.update(D1=_nan(s.get("dense_tokens")), C1=_nan(s.get("dense_flops")), N1=s.get("dense_N"),
                       D2=_nan(s.get("tokens")))
        if "d_model" in desc:
            row["shape"] = f"d{desc['d_model']}L{desc['n_layers']}"
        row.update({k: v for k, v in s.items() if k.startswith("epochs/")})  # mixture components
        row.update({k: _nan(v) for k, v in s.items() if k.startswith("final_tasks/")})  # eval_tasks scores
        if isinstance(desc.get("config"), dict):  # trials that differ only in their seed share a group
            rest = {k: v for k, v in schema.without_late_defaults(desc["config"]).items() if k not in ("seed", "name")}
            if isinstance(rest.get("init_from"), str):  # a WSD branch names its seed's main run: keep the step
                rest["init_from"] = rest["init_from"].rsplit("@", 1)[-1]
            row["seed_group"] = hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:12]
        for k, v in desc.items():  # grid tags beyond the standard columns (e.g. a dotted key)
            if k not in row and k not in ("config", "resources", "group", "planned_flops"):
                row[k] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=TRIAL_COLUMNS)
    for c in ("N", "D", "C", "loss", "loss_se", "bpb", "bpb_se", "unique_tokens", "N_total", "N_active", "N_embedding", "flops_6n", "final_train_loss",
              "tokens_per_s", "mfu", "hfu", "hardware_flops", "wall_s", "epochs", "max_epochs", "schema_version", "D1", "C1"):
        if c in df:  # summaries write non-finite floats as strings ("nan")
            df[c] = pd.to_numeric(df[c], errors="coerce")
    check_schema(df, allow_mixed=allow_mixed, where=str(path))
    check_corpus(df, allow_mixed_corpus=allow_mixed_corpus, where=str(path))
    df = _seed_spread(df)
    cols = [c for c in TRIAL_COLUMNS if c in df.columns] + [c for c in df.columns if c not in TRIAL_COLUMNS]
    return df[cols].reset_index(drop=True)


def _seed_spread(df: pd.DataFrame) -> pd.DataFrame:
    """``n_seeds`` (finished runs of the same configuration but the seed) and ``loss_seed_std``
    (their sample standard deviation of ``loss``, nats; NaN below two seeds) on every row."""
    if "seed_group" not in df:
        df["n_seeds"], df["loss_seed_std"], df["bpb_seed_std"] = 1, math.nan, math.nan
        return df
    done = df["state"].isin(["done"]) & df["loss"].notna()
    stats = df[done].groupby("seed_group")["loss"].agg(["count", "std"])
    df["n_seeds"] = df["seed_group"].map(stats["count"]).fillna(0).astype(int)
    df["loss_seed_std"] = df["seed_group"].map(stats["std"]).astype(float)
    # the same spread in bits per byte, so a fit of bpb (--columns loss=bpb) keeps one unit
    df["bpb_seed_std"] = df["seed_group"].map(df[done].groupby("seed_group")["bpb"].std()).astype(float)
    return df


def load_steps(path: str | Path, *, allow_mixed: bool = False) -> pd.DataFrame:
    """One row per logged step of every trial: ``trial_id, step, tokens, flops`` (= ``C``,
    cumulative training FLOPs), ``loss``, ``eval_loss`` (NaN off eval steps), ``lr``, the
    gradient-noise-scale statistics, plus the trial's ``N, batch, bucket, peak_lr, seed, shape,
    schema_version``. A step logged twice (a resumed run repeating steps after its last
    checkpoint) appears once: the last write wins. Unreadable lines are skipped
    (``scaling.files.read_jsonl``)."""
    path = storage.path(path)
    frames = []
    for d, desc in _trial_dirs(path):
        rows = read_jsonl(d / "metrics.jsonl")
        if not rows:
            continue
        # the trainer writes non-finite floats as strings ("nan", "inf"): make them numbers again
        f = pd.DataFrame(rows).replace({"nan": math.nan, "inf": math.inf, "-inf": -math.inf})
        for c in f.columns[f.dtypes == object]:
            try:
                f[c] = pd.to_numeric(f[c])
            except (TypeError, ValueError):
                pass  # a genuinely non-numeric column
        if "step" not in f:
            continue  # no logged steps (rows of another kind)
        f = f.drop_duplicates(subset="step", keep="last").sort_values("step")
        f.insert(0, "trial_id", desc.get("trial_id", d.name))
        if "flops" in f:
            f["C"] = f["flops"]
        s = read_json(d / "summary.json") or {}
        for k, v in (("N", s.get("N", desc.get("N_planned"))), ("batch", desc.get("batch")), ("bucket", desc.get("bucket")),
                     ("peak_lr", desc.get("lr")), ("seed", desc.get("seed")), ("variant", desc.get("variant")),
                     ("shape", f"d{desc['d_model']}L{desc['n_layers']}" if "d_model" in desc else None),
                     ("schema_version", _measured_version(d, s))):
            f[k] = v
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=STEP_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    for c in STEP_COLUMNS:
        if c not in df:
            df[c] = math.nan
    check_schema(df, allow_mixed=allow_mixed, where=str(path))
    cols = STEP_COLUMNS + [c for c in df.columns if c not in STEP_COLUMNS]
    return df[cols].reset_index(drop=True)
