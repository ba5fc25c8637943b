"""Keep the best-tuned run of each size and budget (Porian et al. 2024).

A sweep that tunes a hyperparameter per size (``rules: {lr: {grid: ...}}``, or any grid of
learning rates, warmups or batches) trains several runs at each ``(N, C)``; a law fitted through
all of them mixes a size's best run with its mistuned ones. ``best_per`` keeps, for every group
of rows that share the keys, the configuration with the lowest loss (its mean over seeds when
the table has several seeds of it: choosing among single seeds would pick the luckiest one and
bias every minimum low).

Grouping: ``N`` and ``D`` match within a relative 1e-3 (digitised tables carry near-duplicates);
``C`` matches by the run's ``bucket`` when the table has one, else within 0.1 dex
(``scaling.fit.isoflop.budget_groups``); any other key (``E``, ``G``, ``batch``, ...) matches
exactly. Rows of different ``variant``, ``experiment`` or ``parametrization`` never compete.
Seeds are averaged where the table says which rows are seeds of one configuration
(``seed_group``, written by ``scaling.runs.load`` for sweeps); in a plain CSV without it every row
is its own candidate, so give one row per configuration (the seed mean) there.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scaling.errors import UsageError

# settings whose rows answer different questions: they never compete for one (N, C)
NEVER_COMPETE = ("variant", "experiment", "parametrization")


def parse_keys(text) -> tuple[str, ...]:
    """``"N,C"`` -> ``("N", "C")`` (UsageError for an empty list)."""
    if isinstance(text, (list, tuple)):
        keys = tuple(str(k).strip() for k in text)
    else:
        keys = tuple(k.strip() for k in str(text).split(",") if k.strip())
    if not keys:
        raise UsageError("--best-per: give the columns that define one size and budget, e.g. N,C")
    return keys


def close_groups(x: np.ndarray, rel_tol: float) -> np.ndarray:
    """Integer labels (0 = smallest) of positive values, a new label wherever the next value up
    is more than ``rel_tol`` away in log space."""
    order = np.argsort(x, kind="stable")
    lx = np.log(x[order])
    labels_sorted = np.cumsum(np.r_[True, np.diff(lx) > rel_tol]) - 1
    labels = np.empty(len(x), int)
    labels[order] = labels_sorted
    return labels


def best_per(df: pd.DataFrame, keys=("N", "C"), *, rel_tol: float = 1e-3) -> tuple[pd.DataFrame, str]:
    """``(kept rows, a note)``: per group of ``keys`` (see the module), the rows of the
    configuration with the lowest mean ``loss``. Adds ``n_candidates`` (configurations that
    competed in the row's group). UsageError naming a key the table lacks."""
    keys = parse_keys(keys)
    missing = [k for k in (*keys, "loss") if k not in df.columns]
    if missing:
        raise UsageError(f"--best-per: column(s) {missing} not in the table (have: {', '.join(map(str, df.columns))})")
    if df.empty:
        return df, "--best-per: no rows"
    work = df.reset_index(drop=True).copy()
    labels = []
    for k in keys:
        if k in ("N", "D"):
            v = pd.to_numeric(work[k], errors="coerce").to_numpy(float)
            if not np.all(np.isfinite(v) & (v > 0)):
                raise UsageError(f"--best-per: column {k} must be positive numbers in every row")
            labels.append(close_groups(v, rel_tol))
        elif k == "C" and "bucket" in work.columns and pd.to_numeric(work["bucket"], errors="coerce").notna().all():
            labels.append(pd.factorize(pd.to_numeric(work["bucket"]))[0])
        elif k == "C":
            from scaling.fit.isoflop import budget_groups

            c = pd.to_numeric(work["C"], errors="coerce").to_numpy(float)
            if not np.all(np.isfinite(c) & (c > 0)):
                raise UsageError("--best-per: column C must be positive numbers in every row")
            labels.append(budget_groups(c)[0])
        else:
            labels.append(pd.factorize(work[k].astype(str))[0])
    for k in NEVER_COMPETE:
        if k in work.columns and k not in keys:
            labels.append(pd.factorize(work[k].astype(str))[0])
    group = pd.Series(pd.factorize(pd.Series([str(t) for t in zip(*labels)]))[0], index=work.index)
    # one candidate per configuration: the rows that differ only in their seed (a row without a
    # seed group is its own candidate)
    own = pd.Series("row" + work.index.astype(str), index=work.index)
    candidate = work["seed_group"].where(work["seed_group"].notna(), own).astype(str) if "seed_group" in work.columns else own
    loss = pd.to_numeric(work["loss"], errors="coerce")
    mean = loss.groupby([group, candidate]).mean().dropna()  # a run without a loss cannot be the best
    if mean.empty:
        raise UsageError("--best-per: no row has a numeric loss")
    best = mean.groupby(level=0).idxmin().map(lambda gc: gc[1])
    n_cand = mean.groupby(level=0).size()
    keep = (candidate == group.map(best)) & loss.notna()
    out = work[keep].copy()
    out["n_candidates"] = group[keep].map(n_cand).astype(int)
    n_groups = len(n_cand)
    note = (f"--best-per {','.join(keys)}: kept the best configuration of each of {n_groups} group(s), "
            f"{len(mean)} configuration(s) in all ({len(out)} of {len(work)} rows)")
    return out.reset_index(drop=True), note


def duplicated_sizes(df: pd.DataFrame, keys=None) -> int:
    """How many rows share their size and data (``N`` and ``D`` within 1e-3, else ``N`` and the
    budget) with another configuration (0 when each has one run, or the table lacks the
    columns): fitters note it so an LR grid fitted without ``--best-per`` does not go unnoticed.
    ``D`` first: runs of one size at continuous budgets (Chinchilla's) are not a grid."""
    if keys is None:
        keys = ("N", "D") if "D" in df.columns else ("N", "C")
        # runs of one (N, D) on corpora of different sizes (a data-constrained study) are no grid
        keys = (*keys, *[k for k in ("U", "unique_tokens") if k in df.columns][:1])
    if any(k not in df.columns for k in (*keys, "loss")) or df.empty:
        return 0
    try:
        kept, _ = best_per(df, keys)
    except Exception:  # a table best_per cannot group (odd types, no losses): nothing to note
        return 0
    return int(len(df) - len(kept))
