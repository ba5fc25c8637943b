"""Chinchilla approaches 1-3 for the compute-optimal frontier ``N_opt ~ C^a``, ``D_opt ~ C^b``.

1. ``envelope(steps)``: the lower envelope of loss-vs-FLOPs curves from per-step logs; at each
   FLOP count the run with the lowest loss gives (N, D) (Hoffmann et al. 2022, approach 1).
2. ``isoflop(runs)``: per compute budget, the minimum of loss over model size, by a parabola in
   log N (Hoffmann) or an Akima spline of log loss (Porian et al. 2024); then a straight line in
   log-log through the minima.
3. ``parametric`` (``scaling.fit.chinchilla``): the frontier derived from the fitted L(N, D).
``compare`` runs whichever of them the data allows and reports all ``a`` and ``b`` side by side.

Units: C in FLOPs, N parameters, D tokens, loss in nats.

Over 400 lines: the three Chinchilla approaches share the frontier and line-fit helpers, and are
compared against each other in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scaling.errors import UsageError
from scaling.fit import io


def budget_groups(C: np.ndarray, tol_dex: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Cluster FLOP counts into budgets: sorted log10 C split where a gap exceeds ``tol_dex``.

    Returns ``labels[n]`` (0 = smallest budget) and the geometric-mean FLOPs of each budget.
    Counted FLOPs scatter around the nominal budget by a few percent, hence the tolerance.
    """
    lc = np.log10(np.asarray(C, float))
    order = np.argsort(lc)
    breaks = np.flatnonzero(np.diff(lc[order]) > tol_dex) + 1
    lab_sorted = np.zeros(len(lc), dtype=int)
    for b in breaks:
        lab_sorted[b:] += 1
    labels = np.empty_like(lab_sorted)
    labels[order] = lab_sorted
    centers = np.array([10 ** lc[labels == k].mean() for k in range(lab_sorted.max() + 1 if len(lc) else 0)])
    return labels, centers


# counted FLOPs scatter around their nominal budget by a few percent (whole steps); a cluster
# of C wider than this is not one budget but a continuum (e.g. Chinchilla's Fig. 4 runs)
MAX_BUDGET_SPAN_DEX = 0.15


def _renamed(col: str | None, columns) -> str | None:
    """A column named by its source name (``--columns C=flops --budget-column flops``) under its
    canonical name: renames apply before any column is looked up."""
    if col is None:
        return None
    renames = io.parse_columns(columns)
    return next((k for k, v in renames.items() if v == col), col)


def _budgets(df: pd.DataFrame, budget_col: str | None, tol_dex: float):
    if budget_col:
        io.require(df, [budget_col], what="--law isoflop")
        vals = df[budget_col].to_numpy(float)
        u = np.unique(vals)
        return np.searchsorted(u, vals), u
    C = df["C"].to_numpy(float)
    labels, centers = budget_groups(C, tol_dex)
    lc = np.log10(C)
    spans = [float(np.ptp(lc[labels == k])) for k in range(len(centers))]
    if spans and max(spans) > MAX_BUDGET_SPAN_DEX:
        k = int(np.argmax(spans))
        raise UsageError(
            f"C: the runs' FLOPs are not discrete budgets ({int((labels == k).sum())} runs span "
            f"{spans[k]:.2f} decades, {10 ** lc[labels == k].min():.3g}-{10 ** lc[labels == k].max():.3g} FLOPs, "
            f"with no gap over {tol_dex} decades); name each run's budget with --budget-column (budget_col=) "
            f"or fit --law chinchilla, which needs no budgets")
    return labels, centers


def _minimum(logN: np.ndarray, loss: np.ndarray, method: str) -> tuple[float, float, str]:
    """Argmin over log N of one budget's curve. Returns (log N*, loss*, flag) with flag ''
    (interior), 'boundary' (minimum at/beyond the sampled range) or 'no_minimum' (concave)."""
    if method == "parabola":
        p2, p1, p0 = np.polyfit(logN, loss, 2)
        if not p2 > 0:
            return np.nan, np.nan, "no_minimum"
        x = -p1 / (2 * p2)
        flag = "boundary" if (x <= logN.min() or x >= logN.max()) else ""
        return x, p0 + p1 * x + p2 * x * x, flag
    if method == "akima":
        from scipy.interpolate import Akima1DInterpolator

        spline = Akima1DInterpolator(logN, np.log(loss))
        grid = np.linspace(logN.min(), logN.max(), (len(logN) - 1) * 25 + 1)
        v = spline(grid)
        i = int(np.argmin(v))
        flag = "boundary" if i in (0, len(grid) - 1) else ""
        return grid[i], float(np.exp(v[i])), flag
    raise UsageError(f"--method: unknown IsoFLOP minimum method {method!r} (parabola|akima)")


def _best_per_size(N, loss, D, rel_tol: float = 1e-3):
    """Several runs at one size (e.g. a learning-rate sweep): keep the lowest loss, as Porian
    et al. do. Sizes within ``rel_tol`` of each other count as one (digitised tables carry
    near-duplicates such as 4.246096e8 / 4.246099e8, which would make a spline blow up).
    Returns arrays sorted by N."""
    from scaling.fit.select import close_groups

    order = np.argsort(N, kind="stable")
    N, loss, D = N[order], loss[order], D[order]
    group = close_groups(N, rel_tol)
    keep = [np.flatnonzero(group == k)[np.argmin(loss[group == k])] for k in np.unique(group)]
    return N[keep], loss[keep], D[keep]


# The parabola is fitted to the sizes within this many decades of a budget's best run: far from
# the minimum an IsoFLOP curve is not a parabola in log N, and fitting every size biased a by up
# to +0.07 on Porian et al.'s sweeps. 0.5 dex (a factor ~3.2 either side) was chosen before
# measuring. A window never keeps fewer than WINDOW_MIN_SIZES sizes, and budgets with fewer than
# WINDOW_FROM sizes are fitted whole: a parabola through 3 noisy points interpolates the noise
# (it dropped a budget of the quickstart and moved Marin's a by 0.04-0.07).
WINDOW_DEX = 0.5
WINDOW_MIN_SIZES = 5
WINDOW_FROM = 6


def _window(lN: np.ndarray, loss: np.ndarray, window_dex: float | None) -> np.ndarray:
    """Indices of the sizes the parabola uses: within ``window_dex`` decades of the lowest loss
    (at least the ``WINDOW_MIN_SIZES`` nearest in log N); every index when ``window_dex`` is
    None or the budget has fewer than ``WINDOW_FROM`` sizes."""
    if window_dex is None or len(lN) < WINDOW_FROM:
        return np.arange(len(lN))
    i = int(np.argmin(loss))
    dist = np.abs(lN - lN[i]) / np.log(10.0)
    keep = np.flatnonzero(dist <= window_dex)
    if len(keep) < WINDOW_MIN_SIZES:
        keep = np.sort(np.argsort(dist, kind="stable")[:WINDOW_MIN_SIZES])
    return keep


def _budget_minimum(N, loss, D, method, window_dex: float | None = WINDOW_DEX):
    """(N_opt, D_opt, loss_opt, n_sizes, flag) for one budget's runs. The parabola is fitted to
    the sizes in the window around the best one (``window_dex``; None: every size)."""
    N, loss, D = _best_per_size(N, loss, D)
    if len(N) < 3:
        return np.nan, np.nan, np.nan, len(N), "too_few_sizes"
    lN = np.log(N)
    if method == "parabola":
        k = _window(lN, loss, window_dex)
        x, lo, flag = _minimum(lN[k], loss[k], method)
    else:
        x, lo, flag = _minimum(lN, loss, method)
    if not np.isfinite(x):
        return np.nan, np.nan, lo, len(N), flag
    # D at the optimum: tokens move opposite to size at fixed C; interpolate in log-log
    s, i0 = np.polyfit(lN, np.log(D), 1)
    return float(np.exp(x)), float(np.exp(i0 + s * x)), lo, len(N), flag


def minima(df: pd.DataFrame, labels: np.ndarray, centers: np.ndarray, method: str = "parabola",
           window_dex: float | None = WINDOW_DEX) -> pd.DataFrame:
    """Per-budget minimum: columns ``C, N_opt, D_opt, loss_opt, n_points, flag`` (flag '' = usable)."""
    N, L, D = (df[c].to_numpy(float) for c in ("N", "loss", "D"))
    rows = []
    for k, c in enumerate(centers):
        m = labels == k
        n_opt, d_opt, l_opt, n, flag = _budget_minimum(N[m], L[m], D[m], method, window_dex)
        rows.append(dict(C=float(c), N_opt=n_opt, D_opt=d_opt, loss_opt=l_opt, n_points=n, flag=flag))
    return pd.DataFrame(rows)


def _loglog(C, y) -> tuple[float, float]:
    """Slope and intercept of log y = slope * log C + intercept (least squares)."""
    s, i = np.polyfit(np.log(C), np.log(y), 1)
    return float(s), float(i)


@dataclass
class FrontierResult:
    """``N_opt = exp(n_icpt) * C^a`` and ``D_opt = exp(d_icpt) * C^b`` (C FLOPs) with 95% intervals."""

    approach: str
    method: str
    a: float
    b: float
    n_icpt: float
    d_icpt: float
    table: pd.DataFrame  # per budget (approach 2) or per grid FLOP count (approach 1)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    n_boot: int = 0
    window_dex: float | None = None  # the parabola's window (approach 2, method parabola)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    backtest: dict | None = None
    boot: np.ndarray | None = field(default=None, repr=False)  # [n_boot, 4]: a, b, n_icpt, d_icpt
    data: pd.DataFrame | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)  # budget index of each row of data

    @property
    def params(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "N_coef": float(np.exp(self.n_icpt)), "D_coef": float(np.exp(self.d_icpt))}

    @property
    def objective(self) -> float:
        """Sum of squared log residuals of N_opt and D_opt about the fitted lines."""
        t = self.table[self.table["used"]] if "used" in self.table else self.table
        lc = np.log(t["C"].to_numpy(float))
        rn = np.log(t["N_opt"].to_numpy(float)) - (self.a * lc + self.n_icpt)
        rd = np.log(t["D_opt"].to_numpy(float)) - (self.b * lc + self.d_icpt)
        return float((rn**2).sum() + (rd**2).sum())

    def predict(self, C) -> pd.DataFrame:
        """Compute-optimal ``N_opt`` (params) and ``D_opt`` (tokens) at ``C`` FLOPs, with intervals."""
        C = np.atleast_1d(np.asarray(C, float))
        if not (np.isfinite(C).all() and (C > 0).all()):
            raise UsageError("predict: C must be finite and positive")
        lc = np.log(C)
        out = pd.DataFrame({"C": C, "N_opt": np.exp(self.a * lc + self.n_icpt), "D_opt": np.exp(self.b * lc + self.d_icpt)})
        for name, (si, ii) in (("N_opt", (0, 2)), ("D_opt", (1, 3))):
            if self.boot is not None and len(self.boot):
                v = np.exp(self.boot[:, si, None] * lc[None] + self.boot[:, ii, None])
                out[name + "_lo"], out[name + "_hi"] = np.percentile(v, 2.5, axis=0), np.percentile(v, 97.5, axis=0)
            else:
                out[name + "_lo"] = out[name + "_hi"] = np.nan
        return out

    def to_dict(self) -> dict:
        d = {
            "law": f"isoflop-{self.approach}",
            "method": self.method,
            "params": self.params,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "objective": self.objective,
            "a": self.a,
            "b": self.b,
            "n_boot": self.n_boot,
            "table": self.table.replace({np.nan: None}).to_dict(orient="records"),
            "warnings": self.warnings,
            "notes": self.notes,
        }
        return io.with_results(d, self)


def _fit_minima(df, labels, centers, method, window_dex=WINDOW_DEX):
    m = minima(df, labels, centers, method, window_dex)
    m["used"] = (m["flag"] == "") & np.isfinite(m["N_opt"]) & np.isfinite(m["D_opt"])
    u = m[m["used"]]
    if len(u) < 2:
        return m, None
    a, ni = _loglog(u["C"], u["N_opt"])
    b, di = _loglog(u["C"], u["D_opt"])
    return m, (a, b, ni, di)


def isoflop(
    data,
    *,
    method: str = "parabola",
    bootstrap: int = 0,
    seed: int = 0,
    budget_col: str | None = None,
    tol_dex: float = 0.1,
    seed_noise: float = 0.0,
    columns=None,
    where: str | None = None,
    window_dex: float | None = WINDOW_DEX,
) -> FrontierResult:
    """Chinchilla approach 2 on a table of final runs (columns C, N, D, loss).

    Budgets come from ``budget_col`` (a source name renamed by ``columns`` works too; a sweep's
    ``bucket`` column is used when present), else from clusters of C within ``tol_dex`` decades,
    refused when the runs' FLOPs are not discrete budgets. The parabola is fitted to the sizes
    within ``window_dex`` decades of each budget's best run (``WINDOW_DEX``; None: all sizes).
    Minima at the edge of a budget's sampled sizes, or concave parabolas, are reported and left
    out of the fit.
    ``bootstrap`` resamples runs within each budget; with ``seed_noise`` > 0 it instead keeps
    every run and multiplies each loss by exp(N(0, seed_noise)) (Porian et al. 2024's seed-noise
    bootstrap; seed_noise ~ the relative loss spread between seeds, e.g. 0.002-0.01).
    """
    if isinstance(seed_noise, str):
        raise UsageError("--seed-noise: 'measured' is for parametric laws (chinchilla, powerlaw, ...); give a number for --law isoflop")
    if seed_noise < 0:
        raise UsageError(f"--seed-noise: must be >= 0, got {seed_noise}")
    df, notes = io.load_table(data, columns=columns, where=where)
    what = "--law isoflop"
    if "D" not in df.columns and "C" in df.columns and "N" in df.columns:
        df["D"] = df["C"] / (6.0 * df["N"])
        notes.append("no D column: using D = C / (6 N)")
    io.require(df, ["C", "N", "D", "loss"], what=what, min_points=6)
    if budget_col is None:
        # a sweep store names each trial's nominal budget; counted FLOPs scatter around it
        budget_col = next((c for c in ("budget", "bucket") if c in df.columns and pd.api.types.is_numeric_dtype(df[c])), None)
    budget_col = _renamed(budget_col, columns)
    labels, centers = _budgets(df, budget_col, tol_dex)
    if len(centers) < 2:
        raise UsageError(
            f"{what}: all {len(df)} runs share one compute budget (C~{centers[0]:.3g} FLOPs); "
            "an IsoFLOP fit needs runs at two or more budgets"
        )
    m, fit = _fit_minima(df, labels, centers, method, window_dex)
    warnings = [
        f"budget C={r.C:.3g}: {r.flag.replace('_', ' ')} ({r.n_points} sizes); left out of the fit"
        for r in m.itertuples()
        if r.flag
    ]
    if fit is None:
        raise UsageError(
            f"{what}: only {int(m['used'].sum())} budget(s) have an interior minimum; need 2 "
            "(add model sizes on both sides of the optimum, or name the budget column: budget_col=/--budget-column)"
        )
    a, b, ni, di = fit
    res = FrontierResult("2", method, a, b, ni, di, m, warnings=warnings, notes=notes, data=df, labels=labels)
    res.window_dex = window_dex if method == "parabola" else None
    if bootstrap:
        rng = np.random.default_rng(seed)
        N, L, D = (df[c].to_numpy(float) for c in ("N", "loss", "D"))
        per = [(N[labels == k], L[labels == k], D[labels == k]) for k in range(len(centers))]
        lc = np.log(centers)
        boots = []
        for _ in range(bootstrap):
            mins = []
            for (n_, l_, d_) in per:
                if seed_noise > 0:
                    ix = np.arange(len(n_))
                    l_b = l_ * np.exp(rng.normal(0.0, seed_noise, len(l_)))
                else:
                    ix = rng.integers(0, len(n_), len(n_))
                    l_b = l_[ix]
                mins.append(_budget_minimum(n_[ix], l_b, d_[ix], method, window_dex))
            ok = np.array([m[4] == "" and np.isfinite(m[0]) and np.isfinite(m[1]) for m in mins])
            if ok.sum() < 2:
                continue
            nn = np.log([m[0] for m in mins])[ok]
            dd = np.log([m[1] for m in mins])[ok]
            a_, ni_ = np.polyfit(lc[ok], nn, 1)
            b_, di_ = np.polyfit(lc[ok], dd, 1)
            boots.append((a_, b_, ni_, di_))
        res.boot = np.array(boots).reshape(-1, 4)
        res.n_boot = len(boots)
        if len(boots):
            res.ci = {
                "a": tuple(np.percentile(res.boot[:, 0], [2.5, 97.5])),
                "b": tuple(np.percentile(res.boot[:, 1], [2.5, 97.5])),
            }
    return res


def envelope(
    steps,
    *,
    run_col: str = "run",
    n_grid: int = 200,
    bootstrap: int = 0,
    seed: int = 0,
    columns=None,
    where: str | None = None,
) -> FrontierResult:
    """Chinchilla approach 1 from per-step logs (columns ``run``, ``C`` cumulative FLOPs, ``N``,
    ``loss``; ``D`` tokens so far, else D = C/(6N)).

    At each of ``n_grid`` log-spaced FLOP counts, each run's loss is interpolated (log-log); the
    run with the lowest loss gives N_opt and D_opt. Points won by the smallest or largest model
    are edge-biased and left out of the fit.
    """
    df, notes = io.load_table(steps, columns=columns, where=where, steps=True)
    what = "approach 1 (envelope)"
    if run_col not in df.columns:
        for alt in ("trial", "trial_id", "run_id", "name"):
            if alt in df.columns:
                run_col = alt
                break
    if "D" not in df.columns and "tokens" in df.columns:
        df["D"] = df["tokens"]
    if "D" not in df.columns and {"C", "N"} <= set(df.columns):
        df["D"] = df["C"] / (6.0 * df["N"])
    io.require(df, [run_col], what=what, numeric=False)
    io.require(df, ["C", "N", "D", "loss"], what=what, min_points=4)
    runs = [g.sort_values("C") for _, g in df.groupby(run_col)]
    if len(runs) < 3:
        raise UsageError(f"{what}: {len(runs)} run(s); the envelope needs at least 3 runs of different sizes")
    res = _envelope_fit(runs, n_grid)
    if res is None:
        raise UsageError(f"{what}: fewer than 2 FLOP counts where an interior model size wins; add model sizes")
    a, b, ni, di, table = res
    out = FrontierResult("1", "envelope", a, b, ni, di, table, notes=notes, data=df)
    if bootstrap:
        rng = np.random.default_rng(seed)
        boots = []
        for _ in range(bootstrap):
            pick = rng.integers(0, len(runs), len(runs))
            r = _envelope_fit([runs[i] for i in pick], n_grid)
            if r is not None:
                boots.append(r[:4])
        out.boot = np.array(boots).reshape(-1, 4)
        out.n_boot = len(boots)
        if boots:
            out.ci = {"a": tuple(np.percentile(out.boot[:, 0], [2.5, 97.5])), "b": tuple(np.percentile(out.boot[:, 1], [2.5, 97.5]))}
    return out


def _envelope_fit(runs, n_grid):
    lc_all = np.concatenate([np.log(r["C"].to_numpy(float)) for r in runs])
    grid = np.linspace(lc_all.min(), lc_all.max(), n_grid)
    L = np.full((len(runs), n_grid), np.inf)
    LD = np.full((len(runs), n_grid), np.nan)
    Ns = np.array([float(r["N"].iloc[0]) for r in runs])
    for i, r in enumerate(runs):
        lc = np.log(r["C"].to_numpy(float))
        inside = (grid >= lc.min()) & (grid <= lc.max())
        L[i, inside] = np.interp(grid[inside], lc, np.log(r["loss"].to_numpy(float)))
        LD[i, inside] = np.interp(grid[inside], lc, np.log(r["D"].to_numpy(float)))
    ncand = np.isfinite(L).sum(axis=0)
    win = np.argmin(L, axis=0)
    ok = ncand >= 2
    # a winner that is the smallest or largest model among the candidates is an edge effect
    lo = np.array([Ns[np.isfinite(L[:, j])].min() if ok[j] else np.nan for j in range(n_grid)])
    hi = np.array([Ns[np.isfinite(L[:, j])].max() if ok[j] else np.nan for j in range(n_grid)])
    Nw = Ns[win]
    used = ok & (Nw > lo) & (Nw < hi)
    table = pd.DataFrame(
        {"C": np.exp(grid), "N_opt": Nw, "D_opt": np.exp(LD[win, np.arange(n_grid)]), "loss_opt": np.exp(L[win, np.arange(n_grid)]), "used": used}
    )
    if used.sum() < 2 or len(np.unique(Nw[used])) < 2:
        return None
    u = table[used]
    a, ni = _loglog(u["C"], u["N_opt"])
    b, di = _loglog(u["C"], u["D_opt"])
    return a, b, ni, di, table


def parametric(fit) -> dict:
    """Approach 3 from a Chinchilla ``FitResult``: a = beta/(alpha+beta), b = alpha/(alpha+beta)."""
    return {"approach": "3", "method": "parametric L(N,D)", "a": fit.a, "b": fit.b, "a_ci": fit.ci.get("a"), "b_ci": fit.ci.get("b")}


def compare(runs=None, steps=None, *, bootstrap: int = 0, seed: int = 0, method: str | None = None,
            budget_col: str | None = None, columns=None, where: str | None = None) -> pd.DataFrame:
    """a and b from every approach the data allows, one row each (approach, method, a, b, CIs):
    approach 2 by the windowed parabola and by Akima unless ``method`` names one."""
    from scaling.fit.parametric import chinchilla

    rows = []
    if steps is not None:
        r = envelope(steps, bootstrap=bootstrap, seed=seed)
        rows.append({"approach": "1", "method": "envelope", "a": r.a, "b": r.b, "a_ci": r.ci.get("a"), "b_ci": r.ci.get("b")})
    if runs is not None:
        for m in (method,) if method else ("parabola", "akima"):
            try:
                r = isoflop(runs, method=m, bootstrap=bootstrap, seed=seed, budget_col=budget_col, columns=columns, where=where)
            except UsageError as err:  # e.g. FLOPs that are not discrete budgets: the other approaches still answer
                rows.append({"approach": "2", "method": m, "a": np.nan, "b": np.nan, "a_ci": None, "b_ci": None,
                             "error": str(err)})
                continue
            rows.append({"approach": "2", "method": m, "a": r.a, "b": r.b, "a_ci": r.ci.get("a"), "b_ci": r.ci.get("b")})
        rows.append(parametric(chinchilla(runs, bootstrap=bootstrap, seed=seed, columns=columns, where=where)))
    return pd.DataFrame(rows)
