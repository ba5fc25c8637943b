"""Critical batch size.

(i) ``noise_scale``: the simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` from
    gradient norms logged at two batch sizes, with McCandlish et al. 2018 (appendix A.1) unbiased
    estimators; |G|^2 and tr(Sigma) are smoothed separately over steps before taking the ratio,
    as the paper recommends (the ratio of noisy estimates is biased).
(ii) ``tradeoff``: from a batch-size sweep, the steps S needed to reach each target loss are fitted
    to ``S = S_min (1 + B_noise/B)``, i.e. ``(S/S_min - 1)(E/E_min - 1) = 1`` with E = B S;
    ``B_crit = E_min / S_min = B_noise``.
(iii) ``bcrit_law``: ``B_crit(L) = B* / L^(1/alpha_B)`` across targets (Kaplan et al. 2020, eq. 5.3).
(iv) ``branched_cbs``: the critical batch size over training from short branches at several batch
    sizes off one run's checkpoints (Merrill et al. 2025), and ``cbs = A * D^p`` in the tokens seen.

Batch sizes are in whatever unit the table uses (sequences or tokens); results keep that unit.

Over 400 lines: the two estimators of the critical batch size and the smoothing they share, kept
side by side so they are compared on the same footing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scaling.errors import UsageError
from scaling.fit import io, laws
from scaling.fit.parametric import FitResult, fit_law

GNS_COLS = ("gns_b_small", "gns_b_big", "gns_g_small_sq", "gns_g_big_sq")
# a trade-off fit's B_crit counts as measured within this factor of the batch sizes that reach the target
RESOLVED_FACTOR = 2.0


def two_batch_estimates(b_small, b_big, g_small_sq, g_big_sq) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased per-step estimates of ``|G|^2`` and ``tr(Sigma)`` (McCandlish et al. 2018, A.1).

    ``g_*_sq`` are squared norms of mean gradients over batches of ``b_*`` examples:
    ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``, solved from the two batch sizes.
    """
    bs, bb = np.asarray(b_small, float), np.asarray(b_big, float)
    gs, gb = np.asarray(g_small_sq, float), np.asarray(g_big_sq, float)
    if np.any(bb <= bs):
        raise UsageError("gns_b_big: must be larger than gns_b_small on every row")
    g2 = (bb * gb - bs * gs) / (bb - bs)
    tr = (gs - gb) / (1.0 / bs - 1.0 / bb)
    return g2, tr


def _ema(v: np.ndarray, decay: float) -> np.ndarray:
    """Bias-corrected exponential moving average along the first axis."""
    out = np.empty_like(v, dtype=float)
    acc, w = 0.0, 0.0
    for i, x in enumerate(v):
        acc = decay * acc + (1 - decay) * x
        w = decay * w + (1 - decay)
        out[i] = acc / w
    return out


def _runs_of(df: pd.DataFrame) -> str | None:
    """The column that tells runs apart in a per-step table (``run``, ``trial``, ``trial_id``
    from a sweep, ``name``), or None for one run."""
    return next((c for c in ("run", "trial", "trial_id", "name") if c in df.columns), None)


def _statistics_rows(data, columns, where, need=()) -> pd.DataFrame:
    """The per-step rows of ``data`` that carry the noise-scale statistics (``GNS_COLS`` and
    ``need``): steps that did not compute them are left out."""
    df, _ = io.load_table(data, columns=columns, where=where, steps=True)
    missing = [c for c in (*GNS_COLS, *need) if c not in df.columns]
    if missing:
        raise UsageError(f"noise scale: needs columns {', '.join((*GNS_COLS, *need))}; missing {', '.join(missing)} "
                         "(runs log them every optim.gns_every steps)")
    return df[np.isfinite(df[list(GNS_COLS)].astype(float)).all(axis=1)]


def noise_scale(data, *, decay: float = 0.95, columns=None, where: str | None = None) -> pd.DataFrame:
    """Per-step ``B_simple`` from logged two-batch statistics (columns ``gns_*``; ``step``, ``loss``).

    Returns columns ``step, loss, g2, trace, B_simple`` (smoothed with an EMA of ``decay``) and
    ``B_simple_raw`` (per-step ratio, noisy), plus ``trial_id`` (or ``run``) when the table has
    several runs: each run is smoothed on its own, never across runs. Rows without statistics
    (steps that did not compute them) are left out. B_simple is in the unit of ``gns_b_*``
    (sequences, from the trainer).
    """
    if not 0 <= decay < 1:
        raise UsageError(f"decay: must be in [0, 1), got {decay}")
    df = _statistics_rows(data, columns, where)
    io.require(df, GNS_COLS, what="noise scale", min_points=1, positive=False)
    key = _runs_of(df)
    parts = []
    for run, g in (df.groupby(key, sort=True) if key else [(None, df)]):
        g = g.sort_values("step") if "step" in g.columns else g
        g2, tr = two_batch_estimates(*(g[c].to_numpy(float) for c in GNS_COLS))
        g2s, trs = _ema(g2, decay), _ema(tr, decay)
        out = pd.DataFrame({"step": g["step"].to_numpy() if "step" in g else np.arange(len(g))})
        if key:
            out.insert(0, key, run)
        if "loss" in g:
            out["loss"] = g["loss"].to_numpy(float)
        out["g2"], out["trace"] = g2s, trs
        with np.errstate(divide="ignore", invalid="ignore"):
            out["B_simple"] = trs / g2s
            out["B_simple_raw"] = tr / g2
        parts.append(out)
    return pd.concat(parts, ignore_index=True)


def noise_scale_window(data, *, start: float = 0.5, end: float = 1.0, n_boot: int = 1000, seed: int = 0,
                       columns=None, where: str | None = None) -> pd.DataFrame:
    """One ``B_simple`` per run: ``mean(tr(Sigma)) / mean(|G|^2)`` over the run's statistics rows
    with step in ``[start, end]`` x its last step (fractions of the run; the second half by
    default), with a 95% bootstrap interval over those rows (``B_simple_lo``, ``_hi``).

    Returns ``trial_id`` (or ``run``), ``B_simple``, its interval (NaN when the estimate is not
    positive: |G|^2 unresolved), ``n`` (rows used), ``step_lo``,
    ``step_hi``, ``loss`` (mean over the window) and ``B`` (``gns_b_big``, the run's batch).
    Runs are never pooled. Units: those of ``gns_b_*``."""
    if not (0 <= start < end <= 1):
        raise UsageError(f"window: need 0 <= start < end <= 1 (fractions of each run), got {start}, {end}")
    df = _statistics_rows(data, columns, where, need=("step",))
    key = _runs_of(df)
    rng = np.random.default_rng(seed)
    rows = []
    for run, g in (df.groupby(key, sort=True) if key else [(None, df)]):
        last = float(g["step"].max())
        w = g[(g["step"] >= start * last) & (g["step"] <= end * last)]
        if len(w) < 2:
            continue
        g2, tr = two_batch_estimates(*(w[c].to_numpy(float) for c in GNS_COLS))
        est = tr.mean() / g2.mean()
        idx = rng.integers(0, len(w), size=(n_boot, len(w)))
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = tr[idx].mean(1) / g2[idx].mean(1)
        boot = boot[np.isfinite(boot)]
        # a non-positive estimate means |G|^2 is not resolved over the window: no interval
        lo, hi = (np.percentile(boot, [2.5, 97.5]) if len(boot) and est > 0 else (np.nan, np.nan))
        row = {"B_simple": float(est), "B_simple_lo": float(lo), "B_simple_hi": float(hi), "n": int(len(w)),
               "step_lo": float(w["step"].min()), "step_hi": float(w["step"].max()),
               "loss": float(w["loss"].mean()) if "loss" in w else np.nan, "B": float(w["gns_b_big"].iloc[0])}
        rows.append({key: run, **row} if key else row)
    if not rows:
        raise UsageError("noise scale: no run has 2 statistics rows in the window; widen it or log them more often "
                         "(optim.gns_every)")
    return pd.DataFrame(rows)


def _loss_column(df: pd.DataFrame) -> str:
    """The held-out ``eval_loss`` where the logs have it, else ``loss``."""
    if "eval_loss" in df.columns and pd.to_numeric(df["eval_loss"], errors="coerce").notna().any():
        return "eval_loss"
    return "loss"


def steps_to_target(steps, targets, *, run_col: str = "run", loss_col: str | None = None, columns=None,
                    where: str | None = None) -> pd.DataFrame:
    """From per-step logs of a batch-size sweep (columns ``run``, ``B``, ``step`` and the loss),
    the step at which each run's loss first reaches each target, interpolated linearly between
    the two logged points around the crossing.

    The loss is ``loss_col``, by default the held-out ``eval_loss`` where the logs have it (the
    training loss is one noisy batch: its running minimum reaches a target early, more so at small
    batches). Returns rows ``run, target, B, S, E`` (E = B * S examples); a run that never reaches
    a target, or reaches it at its first logged point (only an upper bound on S), has no row for it.
    """
    df, _ = io.load_table(steps, columns=columns, where=where, steps=True)
    io.require(df, [run_col], what="steps to target", numeric=False)
    col = loss_col or _loss_column(df)
    if col not in df.columns:
        raise UsageError(f"steps to target: needs a {col} column")
    df = df[pd.to_numeric(df[col], errors="coerce").notna()]  # rows of steps that did not evaluate
    io.require(df, ["B", "step", col], what="steps to target", min_points=2, positive=False)
    rows = []
    for run, g in df.groupby(run_col, sort=True):
        g = g.sort_values("step")
        s, L = g["step"].to_numpy(float), g[col].to_numpy(float)
        if len(s) < 2:
            continue
        B = float(g["B"].iloc[0])
        for t in np.atleast_1d(targets):
            hit = np.flatnonzero(L <= t)
            if hit.size == 0 or hit[0] == 0:
                continue
            i = hit[0]
            S = s[i - 1] + (s[i] - s[i - 1]) * (L[i - 1] - t) / max(L[i - 1] - L[i], 1e-300)
            rows.append({"run": run, "target": float(t), "B": B, "S": float(S), "E": float(B * S)})
    return pd.DataFrame(rows, columns=["run", "target", "B", "S", "E"])


def _per_step_runs(df: pd.DataFrame) -> tuple[pd.DataFrame, str, list[str]]:
    """Per-step logs of a sweep (``runs.load_steps``) with ``B`` in tokens per step where the
    table does not carry ``B``; the run column's name; notes."""
    run_col = _runs_of(df)
    if run_col is None:
        raise UsageError("--law bcrit: per-step logs need a run column (run, trial or trial_id)")
    notes = []
    if "batch_size" in df.columns:  # logged per row by runs with a data.batch_schedule
        varying = df.groupby(run_col)["batch_size"].nunique()
        if (varying > 1).any():
            raise UsageError(f"--law bcrit: run {varying[varying > 1].index[0]} changes its batch size during training "
                             "(data.batch_schedule); the trade-off needs one batch size per run")
    if "B" not in df.columns:
        if not {"tokens", "step"} <= set(df.columns):
            raise UsageError("--law bcrit: per-step logs need B (batch size) or tokens and step")
        per = (df["tokens"] / df["step"]).where(df["step"] > 0)
        df = df.assign(B=per.groupby(df[run_col]).transform("median"))
        notes.append("B in tokens per step")
    return df, run_col, notes


def _auto_targets(df: pd.DataFrame, run_col: str, col: str, n: int = 5) -> np.ndarray:
    """``n`` target losses, log-spaced, that at least 3 batch sizes reach: from just above the
    third-lowest of the batch sizes' best losses up to halfway to where every run starts (its
    highest logged loss), so the targets sit in the later part of training."""
    best_at_B = df.groupby(run_col)[col].min().groupby(df.groupby(run_col)["B"].first()).min().sort_values()
    floor = float(best_at_B.iloc[min(2, len(best_at_B) - 1)]) * 1.002
    start = float(df.groupby(run_col)[col].max().min())
    if not start > floor:
        return np.array([floor])
    return np.geomspace(floor + 0.5 * (start - floor), floor, n)


def _more_than_one_batch_size(df: pd.DataFrame, what: str) -> None:
    if df["B"].nunique() == 1:
        raise UsageError(f"--law bcrit: the {what} one batch size (B={float(df['B'].iloc[0]):g}); the trade-off "
                         "needs 3 or more")


def tradeoff(table, *, targets=None, bootstrap: int = 0, seed: int = 0, delta: float = 1e-3, columns=None,
             where=None) -> "BcritResult":
    """Fit ``S = S_min (1 + B_noise/B)`` for each target loss, then ``B_crit(L)``.

    ``table``: rows ``target`` (loss, nats), ``B`` (batch size), ``S`` (steps to reach the target),
    e.g. from ``steps_to_target``; or per-step logs (a sweep directory, or ``run, B, step`` and
    ``eval_loss``/``loss``), from which each run's steps to each target are read on its held-out
    curve and, per batch size, the best run (fewest steps: the best learning rate of a grid) is
    kept. ``targets`` (nats): the losses to measure at; default 5 that at least 3 batch sizes
    reach (``_auto_targets``).
    A target reached at fewer than 3 batch sizes is reported as unusable (a row with its reason),
    not fitted; one whose fitted B_crit lies more than ``RESOLVED_FACTOR`` beyond the batch sizes
    that reach it keeps its row with ``status`` "unresolved: ..." and stays out of B_crit(L).
    Batch sizes from a sweep directory are in tokens per step.
    """
    per_step = isinstance(table, (str, bytes)) or hasattr(table, "__fspath__") or isinstance(table, io.Source)
    df, notes = io.load_table(table, columns=columns, where=where, steps=per_step)
    if "target" not in df.columns and {"step"} <= set(df.columns):
        df, run_col, more = _per_step_runs(df)
        notes += more
        _more_than_one_batch_size(df, "runs have")
        col = _loss_column(df)
        if targets is None:
            targets = _auto_targets(df, run_col, col)
            notes.append(f"targets chosen from the logs ({col}): {', '.join(f'{t:.4g}' for t in targets)}")
        hits = steps_to_target(df, targets, run_col=run_col, loss_col=col)
        # per batch size the best run (a grid over lr): the fewest steps to each target
        df = hits.loc[hits.groupby(["target", "B"])["S"].idxmin()] if len(hits) else hits
        notes.append(f"steps to each target read on {col}, interpolated between logged points; best run per batch size")
    else:
        if "target" not in df.columns and "loss" in df.columns:
            df = df.rename(columns={"loss": "target"})
        io.require(df, ["target", "B", "S"], what="--law bcrit", min_points=0)
        _more_than_one_batch_size(df, "table has")
    rows, warnings = [], []
    law = laws.tradeoff()
    asked = sorted(set(np.atleast_1d(targets).astype(float)) if targets is not None else set(df["target"]), reverse=True)
    for t in asked:
        g = df[np.isclose(df["target"], t)]
        if g["B"].nunique() < 3:
            rows.append({"target": float(t), "n": int(g["B"].nunique()),
                         "status": f"unusable: reached at {g['B'].nunique()} batch size(s), 3 needed"})
            continue
        r = fit_law(law, g[["B", "S"]].reset_index(drop=True), bootstrap=bootstrap, seed=seed, delta=delta)
        row = {"target": float(t), "n": len(g), "S_min": r.params["S_min"], "B_crit": r.params["B_noise"],
               "status": "fitted"}
        b_lo, b_hi = float(g["B"].min()), float(g["B"].max())
        # S = S_min (1 + B_crit/B) is only resolved where the batch sizes run straddle its corner:
        # beyond them the fit extrapolates (all points in one regime), whatever its bootstrap says
        if not (b_lo / RESOLVED_FACTOR <= row["B_crit"] <= b_hi * RESOLVED_FACTOR):
            side = f"> {b_hi * RESOLVED_FACTOR:.4g}" if row["B_crit"] > b_hi else f"< {b_lo / RESOLVED_FACTOR:.4g}"
            row["status"] = (f"unresolved: B_crit {row['B_crit']:.3g} {side}, outside the batch sizes that reach the "
                             f"target ({b_lo:.4g}-{b_hi:.4g}) by more than {RESOLVED_FACTOR:g}x; not in B_crit(L)")
        row["E_min"] = row["S_min"] * row["B_crit"]
        for k, name in (("S_min", "S_min"), ("B_noise", "B_crit")):
            lo, hi = r.ci.get(k, (np.nan, np.nan))
            row[name + "_lo"], row[name + "_hi"] = lo, hi
        warnings += [f"target {t:.4g}: {w}" for w in r.warnings]
        rows.append(row)
    tab = pd.DataFrame(rows)
    for _, r in tab[tab["status"] != "fitted"].iterrows() if len(tab) else []:
        warnings.append(f"target {r['target']:.4g}: {r['status']}")
    measured = tab[tab["S_min"].notna()] if "S_min" in tab else tab.iloc[:0]
    if measured.empty:
        raise UsageError("--law bcrit: no target loss has runs at 3 or more batch sizes")
    measured = measured.sort_values("target", ascending=False).reset_index(drop=True)
    fitted = measured[measured["status"] == "fitted"]
    fit = None
    if len(fitted) >= 3:
        fit = bcrit_law(fitted.reset_index(drop=True), bootstrap=bootstrap, seed=seed)
    else:
        warnings.append(f"{len(fitted)} target(s) with a resolved B_crit: B_crit(L) law not fitted (needs 3)")
    unusable = tab[tab["S_min"].isna()] if "S_min" in tab else tab
    return BcritResult(measured, fit, warnings=warnings, notes=notes,
                       unusable=unusable[["target", "n", "status"]].to_dict(orient="records"))


@dataclass
class BcritResult:
    """Per-target trade-off fits and the B_crit(L) law.

    ``table``: one row per fitted target loss with ``S_min`` (steps), ``E_min`` (examples),
    ``B_crit`` (= B_noise, batch units), 95% intervals where bootstrapped, and ``status``
    ("fitted", or "unresolved: ..." where B_crit lies beyond the batch sizes run).
    ``law``: the fit ``B_crit = B_star * L^(-1/alpha_B)`` on the "fitted" rows (None with fewer
    than 3). ``unusable``: targets too few batch sizes reach, with the reason.
    """

    table: pd.DataFrame
    law: FitResult | None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    backtest: dict | None = None
    unusable: list = field(default_factory=list)  # targets not fitted, with the reason

    @property
    def params(self) -> dict[str, float]:
        if self.law is None:
            return {}
        A, k = self.law.params["A"], self.law.params["alpha"]
        return {"B_star": A, "alpha_B": float(1.0 / k) if k != 0 else float("inf")}

    @property
    def ci(self) -> dict:
        if self.law is None or not self.law.ci:
            return {}
        lo, hi = self.law.ci["alpha"]
        inv = sorted([1.0 / lo, 1.0 / hi]) if lo * hi > 0 else [float("nan")] * 2
        return {"B_star": self.law.ci["A"], "alpha_B": tuple(inv)}

    @property
    def objective(self) -> float | None:
        return None if self.law is None else self.law.objective

    def predict(self, loss) -> pd.DataFrame:
        """``B_crit`` at the given loss values (nats), with intervals when bootstrapped."""
        if self.law is None:
            raise UsageError("predict: B_crit(L) needs at least 3 target losses")
        return self.law.predict(loss=loss)

    def to_dict(self) -> dict:
        d = {
            "law": "bcrit",
            "formula": "S = S_min (1 + B_noise/B) per target; B_crit(L) = B_star / L^(1/alpha_B)",
            "params": self.params,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "objective": self.objective,
            "targets": self.table.replace({np.nan: None}).to_dict(orient="records"),
            "unusable_targets": self.unusable,
            "warnings": self.warnings,
            "notes": self.notes,
        }
        return io.with_results(d, self)


def bcrit_law(table: pd.DataFrame, *, bootstrap: int = 0, seed: int = 0) -> FitResult:
    """``B_crit(L) = B_star * L^(-1/alpha_B)`` from columns ``target`` (loss) and ``B_crit``.

    Fitted as a power law ``B_crit = A * L^-k`` (least squares in log-log, as the Huber delta is
    made large); ``B_star = A``, ``alpha_B = 1/k``.
    """
    t = table.rename(columns={"target": "loss"})[["loss", "B_crit"]].reset_index(drop=True)
    law = laws.powerlaw("loss", "B_crit", name="bcrit")
    law = laws.LSELaw(
        name="bcrit",
        formula="B_crit = B_star / L^(1/alpha_B)",
        inputs=law.inputs,
        target=law.target,
        params=(laws.Param("a", "A", True, (0.0, 10.0, 20.0)), laws.Param("alpha", "alpha", False, (0.0, 2.0, 5.0, 10.0))),
        features=law.features,
    )
    return fit_law(law, t, bootstrap=bootstrap, seed=seed, delta=10.0)


def to_minimum_compute(runs: pd.DataFrame, bcrit: BcritResult) -> pd.DataFrame:
    """Kaplan et al. 2020 eqs. 5.4-5.5: the steps and compute a run would have needed at
    ``B << B_crit`` / ``B >> B_crit``: ``S_min = S / (1 + B_crit(L)/B)``, ``C_min = C / (1 + B/B_crit(L))``.

    ``runs`` needs ``loss`` (nats), ``B`` (same unit as the fit) and ``C`` (FLOPs) and/or ``S``
    (steps). Returns a copy with ``B_crit``, ``C_min``, ``S_min`` added; fit ``L(C_min)`` with
    ``fit.powerlaw(out, x="C_min")``.
    """
    io.require(runs, ["loss", "B"], what="C_min")
    out = runs.copy()
    out["B_crit"] = bcrit.predict(out["loss"].to_numpy(float))["B_crit"].to_numpy()
    if "C" in out:
        out["C_min"] = out["C"] / (1.0 + out["B"] / out["B_crit"])
    if "S" in out:
        out["S_min"] = out["S"] / (1.0 + out["B_crit"] / out["B"])
    return out


# ----------------------------------------------------------------------------------------------
# (iv) branched critical batch size (Merrill et al. 2025) and B_crit against the tokens seen
# ----------------------------------------------------------------------------------------------

CBS_TOLERANCE = 0.01  # relative loss excess over the smallest batch still counted as "no harm"
CBS_COLS = ("cbs_at_tokens", "cbs_batch")


@dataclass
class CbsResult:
    """Critical batch size per branch point and its power law in the tokens seen.

    ``table``: one row per branch point with ``D`` (tokens seen when the branches start),
    ``cbs`` (tokens per step; interpolated in log batch where the loss excess over the smallest
    batch crosses ``tolerance``), ``cbs_grid`` (the largest batch run within tolerance),
    the branches' batch sizes and excesses, and ``status`` ("resolved", or "lower bound" when
    every batch run stays within tolerance). ``law``: ``cbs = A * D^p`` on the resolved rows,
    least squares in log-log with a t-interval on ``p`` (None with fewer than 3 rows).
    """

    table: pd.DataFrame
    law: dict | None
    tolerance: float
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    backtest: dict | None = None

    @property
    def params(self) -> dict[str, float]:
        return {} if self.law is None else {"A": self.law["A"], "p": self.law["p"]}

    @property
    def ci(self) -> dict:
        return {} if self.law is None else {"p": self.law["p_ci"]}

    @property
    def objective(self) -> float | None:
        return None if self.law is None else self.law["rss"]

    def predict(self, D) -> pd.DataFrame:
        """The critical batch (tokens per step) after ``D`` training tokens, from the law."""
        if self.law is None:
            raise UsageError("predict: cbs(D) needs at least 3 resolved branch points")
        D = np.atleast_1d(np.asarray(D, float))
        return pd.DataFrame({"D": D, "cbs": self.law["A"] * D ** self.law["p"]})

    def to_dict(self) -> dict:
        d = {
            "law": "cbs",
            "formula": "cbs(D) = largest batch whose loss after the branch is within tolerance of the smallest; "
                       "cbs = A * D^p",
            "tolerance": self.tolerance,
            "params": self.params,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "ci_level": 0.95,
            "objective": self.objective,
            "branch_points": self.table.replace({np.nan: None}).to_dict(orient="records"),
            "warnings": self.warnings,
            "notes": self.notes,
        }
        return io.with_results(d, self)


def _crossing(batches: np.ndarray, excess: np.ndarray, tol: float) -> tuple[float, float, str]:
    """``(cbs, cbs_grid, status)`` for one branch point: batches ascending, excess[0] = 0."""
    grid = float(batches[0])
    for i in range(1, len(batches)):
        e = excess[i]
        if e <= tol:
            grid = float(batches[i])
            continue
        lo, e_lo = float(batches[i - 1]), float(excess[i - 1])
        if not np.isfinite(e):  # a diverged branch: nothing to interpolate towards
            return lo, grid, "resolved"
        frac = (tol - e_lo) / (e - e_lo)
        return float(np.exp(np.log(lo) + frac * (np.log(batches[i]) - np.log(lo)))), grid, "resolved"
    return grid, grid, "lower bound"


def cbs_power_law(D, cbs, level: float = 0.95) -> dict | None:
    """``cbs = A * D^p`` by least squares in log-log; ``p_ci`` the two-sided Student-t interval
    at ``level`` (n - 2 degrees of freedom). None with fewer than 3 points."""
    from scipy import stats

    x, y = np.log(np.asarray(D, float)), np.log(np.asarray(cbs, float))
    n = len(x)
    if n < 3:
        return None
    X = np.column_stack([np.ones(n), x])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    rss = float(resid @ resid)
    dof = n - 2
    se = np.sqrt(rss / dof / float(((x - x.mean()) ** 2).sum())) if dof > 0 else np.inf
    t = float(stats.t.ppf(0.5 + level / 2, dof)) if dof > 0 else np.inf
    p = float(coef[1])
    return {"A": float(np.exp(coef[0])), "p": p, "p_ci": (p - t * se, p + t * se), "p_se": float(se), "n": n,
            "rss": rss}


def _arm_of(df: pd.DataFrame) -> pd.Series:
    """Per branch row, the main run's configuration apart from its seed (seeds of one design are
    replicates and get averaged): from the main run's own row where the table has it, else the
    main run's id."""
    if "main" not in df.columns:
        return pd.Series("all", index=df.index)
    cols = [c for c in ("variant", "shape", "batch", "seq_len", "lr") if c in df.columns]
    mains = df[df.get("role", pd.Series(index=df.index, dtype=object)) == "main"] if "role" in df.columns else df.iloc[:0]
    if "trial_id" in df.columns and len(mains) and cols:
        arm = {tid: " ".join(f"{c}={mains.loc[i, c]}" for c in cols) for i, tid in mains["trial_id"].items()}
    else:
        arm = {}
    return df["main"].map(lambda m: arm.get(m, f"main={m}"))


def branched_cbs(table, *, tolerance: float = CBS_TOLERANCE, columns=None, where=None) -> CbsResult:
    """The critical batch size over training from branches (a ``strategy: cbs_branch`` sweep
    directory, or rows with ``cbs_at_tokens`` (tokens), ``cbs_batch`` (sequences), ``seq_len``,
    ``loss`` (nats; the held-out loss at the branch's end) and ``main``).

    Per branch point the branches' losses are compared with the smallest batch's: excess =
    loss / loss_smallest - 1; a diverged branch counts as failing. The CBS is where the excess
    first crosses ``tolerance`` (log-linear between the two batches around it); it and ``D``
    are in tokens. Main runs that differ only in their seed are replicates: their branches'
    losses are averaged per (point, batch) (``n_seeds``). Status per point: "resolved"; "lower
    bound" (every batch within tolerance); "incomplete: ..." when a branch the crossing depends
    on has not finished (pending, running, failed, or no loss), never a silently shorter grid.
    Only resolved points enter ``cbs = A D^p``, fitted per design (no law across designs).
    A point planned with one batch size is a UsageError.
    """
    if not 0 < tolerance < 1:
        raise UsageError(f"--tolerance: must be a relative loss excess in (0, 1), e.g. 0.01; got {tolerance}")
    df, notes = io.load_table(table, columns=columns, where=where,
                              keep_states=("done", "diverged", "pending", "running", "failed"))
    # branches share their model and tokens by design: the grid note of load_table is not for them
    notes = [n for n in notes if "share their size and data" not in n]
    missing = [c for c in (*CBS_COLS, "loss") if c not in df.columns]
    if missing:
        raise UsageError(f"--law cbs: the table has no {', '.join(missing)} column(s); it reads the branches of a "
                         "strategy: cbs_branch sweep")
    df = df.assign(arm=_arm_of(df))
    df = df[df["cbs_at_tokens"].notna() & df["cbs_batch"].notna()].copy()
    if df.empty:
        raise UsageError("--law cbs: no branches in the table")
    seq = df["seq_len"].astype(float) if "seq_len" in df.columns else 1.0
    if "seq_len" not in df.columns:
        notes.append("no seq_len column: batch sizes in sequences")
    df["B_tokens"] = df["cbs_batch"].astype(float) * seq
    df["loss"] = pd.to_numeric(df["loss"], errors="coerce")
    state = df["state"].astype(str) if "state" in df.columns else pd.Series("done", index=df.index)
    df.loc[state == "diverged", "loss"] = np.inf
    df["finished"] = (state == "diverged") | ((state == "done") & df["loss"].notna())
    rows, warnings = [], []
    for (arm, at), g in df.groupby(["arm", "cbs_at_tokens"], sort=True):
        at = float(at)
        per_b = g.groupby("B_tokens").agg(loss=("loss", "mean"), finished=("finished", "all"), n=("loss", "size"))
        if len(per_b) < 2:
            raise UsageError(f"--law cbs: branch point at {at:g} tokens has one batch size; run at least two factors")
        batches = per_b.index.to_numpy(float)
        done = per_b["finished"].to_numpy(bool)
        row = {"arm": arm, "D": at, "batches": batches.tolist(), "n_seeds": int(per_b["n"].max()),
               "excess": [None] * len(batches), "unfinished": batches[~done].tolist()}
        if not done[0]:
            rows.append({**row, "cbs": np.nan, "cbs_grid": np.nan, "reference_loss": np.nan,
                         "status": "incomplete: the smallest batch's branch has not finished"})
            continue
        ref = float(per_b["loss"].iloc[0])
        if not np.isfinite(ref):
            warnings.append(f"branch point at {at:g} tokens: the smallest batch diverged; no CBS")
            continue
        n_done = int(np.argmin(done)) if not done.all() else len(done)  # the finished prefix
        excess = per_b["loss"].to_numpy(float)[:n_done] / ref - 1.0
        cbs, grid, status = _crossing(batches[:n_done], excess, tolerance)
        if status == "lower bound" and n_done < len(batches):
            unfinished = ", ".join(f"{b:g}" for b in batches[~done])
            status = f"incomplete: branches at {unfinished} tokens per step have not finished"
        row["excess"] = [float(e) if np.isfinite(e) else None for e in excess] + [None] * (len(batches) - n_done)
        rows.append({**row, "cbs": cbs, "cbs_grid": grid, "status": status, "reference_loss": ref})
    out = pd.DataFrame(rows)
    if out.empty:
        return CbsResult(out, None, tolerance, warnings, notes)
    if out["n_seeds"].max() > 1:
        notes.append(f"losses averaged over up to {int(out['n_seeds'].max())} seeds per point and batch")
    ok = out[out["status"] == "resolved"]
    law = None
    if out["arm"].nunique() > 1:
        notes.append("several designs (main runs that differ beyond the seed): one CBS table, no pooled law; "
                     "select one with --where")
    else:
        law = cbs_power_law(ok["D"], ok["cbs"])
    if law is None and len(ok) < 3:
        notes.append(f"cbs(D) needs 3 resolved branch points, have {len(ok)}")
    notes.append("cbs and D in tokens")
    return CbsResult(out, law, tolerance, warnings, notes)
