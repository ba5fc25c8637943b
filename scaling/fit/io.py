"""Loading and checking fit inputs: DataFrames, CSV/JSONL tables and sweep directories.

Canonical columns: ``N`` (parameters), ``D`` (tokens), ``C`` (FLOPs), ``loss`` (nats), and where
relevant ``B`` (batch size), ``S`` (steps), ``E`` (experts), ``G`` (granularity), ``lr``, ``run``.
Anything that would make a fit silently wrong (missing columns, NaN/inf, non-positive values,
too few points, every run diverged) raises ``UsageError`` naming the problem and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scaling.errors import UsageError


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """``"N=N_params,D=D_tokens"`` -> ``{"N": "N_params", "D": "D_tokens"}`` (canonical=source)."""
    if spec is None or isinstance(spec, dict):
        return dict(spec or {})
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise UsageError(f"--columns: expected CANONICAL=SOURCE pairs like N=N_params, got {part!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        if not k or not v:
            raise UsageError(f"--columns: empty name in {part!r}")
        out[k] = v
    return out


# columns that are counts (parameters, tokens, FLOPs, batch, steps, unique tokens): read as float64
COUNT_COLUMNS = ("N", "D", "C", "B", "S", "U", "N_total", "N_active", "N_embedding", "flops_6n", "steps", "tokens", "flops")


class Source:
    """A table path with reading options, accepted wherever a fitter takes ``data``:
    ``fit.chinchilla(io.Source("runs/x", allow_mixed_schema=True))``."""

    def __init__(self, path, *, allow_mixed_schema: bool = False, allow_noncausal: bool = False, best_per=None,
                 allow_mixed_corpus: bool = False):
        self.path = path
        self.allow_mixed_corpus = allow_mixed_corpus
        self.allow_mixed_schema = allow_mixed_schema
        self.allow_noncausal = allow_noncausal
        self.best_per = best_per  # e.g. ("N", "C"): keep the best-tuned run of each (scaling.fit.select)

    def __str__(self) -> str:
        return str(self.path)


def read_table(src, *, steps: bool = False, allow_mixed_schema: bool = False,
               allow_mixed_corpus: bool = False) -> pd.DataFrame:
    """A DataFrame from a DataFrame, a ``.csv``/``.jsonl``/``.json`` file or a sweep directory.

    A sweep or run directory is read with ``scaling.runs.load`` (one row per trial), or
    ``runs.load_steps`` (one row per logged step) when ``steps`` is true; runs written under
    different schema versions are refused unless ``allow_mixed_schema``, runs on different
    corpora unless ``allow_mixed_corpus``.
    """
    if isinstance(src, pd.DataFrame):
        return src.copy()
    if isinstance(src, Source):
        allow_mixed_schema = allow_mixed_schema or src.allow_mixed_schema
        allow_mixed_corpus = allow_mixed_corpus or src.allow_mixed_corpus
        src = src.path
    from scaling import storage  # fsspec paths for URLs (gs://, memory://), pathlib otherwise

    path = storage.path(src)
    if not path.exists():
        raise UsageError(f"input: {path} does not exist (give a CSV/JSONL table or a sweep directory)")
    if path.is_dir():
        from scaling import runs  # the store's table format (pandas + json), not the sweep code

        if steps:
            return runs.load_steps(path, allow_mixed=allow_mixed_schema)
        return runs.load(path, allow_mixed=allow_mixed_schema, allow_mixed_corpus=allow_mixed_corpus)
    if isinstance(path, storage.StorePath):
        raise UsageError(f"input: {path}: on an object store give a run or sweep directory (tables: download them)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            return pd.read_json(path)
    except (ValueError, pd.errors.ParserError) as err:
        raise UsageError(f"input: cannot parse {path}: {str(err).splitlines()[0]}")
    raise UsageError(f"input: unsupported file type {suffix!r} for {path} (use .csv, .jsonl or a sweep directory)")


def _check_one_tokenizer(df: pd.DataFrame, renames: dict) -> None:
    """Nats per token of different tokenizers are different units: refuse to fit them together
    (bits per byte, ``--columns loss=bpb``, are one unit)."""
    if "loss" not in df or "tokenizer_sha256" not in df or renames.get("loss") not in (None, "loss"):
        return
    done = df[df["state"].astype(str) == "done"] if "state" in df else df
    toks = done["tokenizer_sha256"].dropna().astype(str).unique()
    if len(toks) > 1:
        names = ", ".join(sorted(done["tokenizer"].dropna().astype(str).unique())) if "tokenizer" in done else ""
        raise UsageError(f"loss: the runs use {len(toks)} tokenizers ({names}), whose nats per token are not one "
                         "unit; fit bits per byte instead with --columns loss=bpb")


def load_table(src, *, columns=None, where: str | None = None, steps: bool = False,
               allow_mixed_schema: bool = False, allow_noncausal: bool = False,
               best_per=None, keep_states=("done",)) -> tuple[pd.DataFrame, list[str]]:
    """Read ``src``, apply ``--columns`` renames, the ``--where`` filter, the run-state filter
    (rows whose ``state`` is not in ``keep_states`` are left out; a diverged run is a result
    for the branched critical batch, which reads it as a failure)
    and the causality filter (runs whose ``causal`` is false, i.e. expert-choice MoE whose
    loss looks at later tokens, are left out unless ``allow_noncausal``), then, given
    ``best_per`` keys (``("N", "C")``), keep the best-tuned run of each (``scaling.fit.select``).

    Returns the table and a list of notes (e.g. how many diverged runs were excluded).
    """
    if isinstance(src, Source):
        allow_noncausal = allow_noncausal or src.allow_noncausal
        best_per = best_per or src.best_per
    df = read_table(src, steps=steps, allow_mixed_schema=allow_mixed_schema)
    notes: list[str] = []
    renames = parse_columns(columns)
    missing = [v for v in renames.values() if v not in df.columns]
    if missing:
        raise UsageError(f"--columns: source column(s) {missing} not in the table (have: {', '.join(map(str, df.columns))})")
    for k, v in list(renames.items()):  # a loss's noise columns follow it (loss=bpb brings bpb_se)
        for suffix in ("_se", "_seed_std"):
            if k == v or f"{k}{suffix}" in renames:
                continue
            if f"{v}{suffix}" in df.columns:
                renames[f"{k}{suffix}"] = f"{v}{suffix}"
            elif f"{k}{suffix}" in df.columns and k in df.columns:  # the replaced column's noise, in its unit
                df = df.drop(columns=[f"{k}{suffix}"])
                notes.append(f"--columns {k}={v}: dropped {k}{suffix}, which measured the replaced {k} column")
    # a renamed-onto column replaces the one of that name (no two "loss" columns)
    df = df.drop(columns=[k for k, v in renames.items() if k in df.columns and k != v and k not in renames.values()])
    df = df.rename(columns={v: k for k, v in renames.items()})
    if where:
        from scaling.fit import where as where_lib  # our own parser: a filter never runs code

        n_before = len(df)
        df = where_lib.apply(df, where)
        if n_before and df.empty:
            raise UsageError(f"--where: {where!r} keeps none of the {n_before} rows; loosen the filter")
        notes.append(f"--where {where!r}: {len(df)} rows kept")
    _check_one_tokenizer(df, renames)
    if "causal" in df.columns and not allow_noncausal:
        leaky = df["causal"].astype(object).map(lambda v: v is False or v == 0 or str(v).lower() == "false")
        if leaky.all() and len(df):
            raise UsageError("causal: every run's loss looks at later tokens (expert-choice MoE); "
                             "fit them anyway with --allow-noncausal")
        if leaky.any():
            notes.append(f"excluded {int(leaky.sum())} run(s) whose loss is not causal (expert-choice MoE); "
                         f"--allow-noncausal keeps them")
            df = df[~leaky]
    if "state" in df.columns:
        bad = ~df["state"].astype(str).isin(keep_states)
        if bad.all() and len(df):
            states = ", ".join(f"{k}={v}" for k, v in df["state"].astype(str).value_counts().items())
            raise UsageError(f"state: no run finished ('done'): {states}; nothing to fit")
        if bad.any():
            notes.append(f"excluded {int(bad.sum())} run(s) whose state is not {' or '.join(keep_states)} "
                         "(diverged/failed/running)")
            df = df[~bad]
    for c in COUNT_COLUMNS:
        # counts multiplied together (C / (N D)) overflow int64: W&B exports give integer columns
        if c in df.columns and pd.api.types.is_integer_dtype(df[c]):
            df[c] = df[c].astype(np.float64)
    from scaling.fit import select

    if best_per and not steps:
        df, note = select.best_per(df, best_per)
        notes.append(note)
    elif not steps:
        n = select.duplicated_sizes(df)
        if n:
            notes.append(f"{n} run(s) share their size and data (N, D and the corpus size U where recorded) with another "
                         f"configuration: if that is a hyperparameter grid, "
                         f"--best-per N,C keeps the best-tuned run of each (Porian et al.); seeds of one "
                         f"configuration are averaged by it, never picked")
    return df.reset_index(drop=True), notes


def require(df: pd.DataFrame, cols, *, what: str, min_points: int = 1, positive=True, numeric=True) -> pd.DataFrame:
    """Check that ``cols`` exist, are finite and (by default) positive, with enough rows.

    ``what`` names the fit in the messages (e.g. ``"--law chinchilla"``).
    """
    cols = list(cols)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        have = ", ".join(map(str, df.columns))
        raise UsageError(
            f"{what}: missing column(s) {', '.join(missing)} (have: {have}); map them with --columns {missing[0]}=<name>"
        )
    for c in cols if numeric else ():
        try:
            v = pd.to_numeric(df[c], errors="raise").to_numpy(dtype=float)
        except (ValueError, TypeError):
            raise UsageError(f"{what}: column {c} is not numeric")
        if not np.isfinite(v).all():
            k = int((~np.isfinite(v)).sum())
            raise UsageError(f"{what}: column {c} has {k} NaN/inf value(s); drop those rows (e.g. --where \"{c} == {c}\")")
        if positive and (v <= 0).any():
            k = int((v <= 0).sum())
            raise UsageError(f"{what}: column {c} has {k} non-positive value(s); scaling laws need {c} > 0")
    if len(df) < min_points:
        raise UsageError(f"{what}: {len(df)} usable row(s), need at least {min_points} for this fit")
    return df


def inputs(df: pd.DataFrame, cols) -> dict[str, np.ndarray]:
    return {c: df[c].to_numpy(dtype=float) for c in cols}


def with_results(d: dict, result) -> dict:
    """``d`` (a fit's ``to_dict``) with the result's ``predictions`` and ``backtest`` when set."""
    if getattr(result, "predictions", None):
        d["predictions"] = result.predictions
    if getattr(result, "backtest", None) is not None:
        d["backtest"] = result.backtest
    return d
