"""Forecasts chosen by leave-future-out: which law and fit window predict the next budget.

The quantity forecast is the compute frontier: the lowest loss reached at a budget (the best
run of each budget, budgets clustered as ``isoflop.budget_groups`` does). Candidate laws:

- ``saturating``: ``L*(C) = E + A C^-alpha`` on the per-budget best losses,
- ``powerlaw``:   ``L*(C) = A C^-alpha`` on the per-budget best losses,
- ``chinchilla``: ``L(N, D)`` on every run of the window, its frontier ``min_N L(N, C / (k N))``;
- ``kaplan``: Kaplan et al.'s ``L(N, D) = ((N_c/N)^(a_N/a_D) + D_c/D)^a_D`` likewise, its
  frontier minimised over a grid of N (``k`` the median ``C / (N D)`` of the window's runs);
- ``data_constrained``: Muennighoff et al.'s law (``scaling.fit.data_constrained``) on runs with
  unique tokens ``U``; its frontier assumes the corpus stays as it is: a run of ``D`` tokens sees
  ``min(D, U_max)`` unique ones, ``U_max`` the most any run of the window saw. It needs 3
  repeating and 6 single-epoch runs in the window; elsewhere it is not a candidate;

each with a fit window of the last ``w`` budgets (``all``, or e.g. 3, 4). For a configuration
(law, window), **leave-future-out** fits it on budgets ``<= k`` and scores the best loss of a
later budget ``j``, for every ``k`` it can fit at: errors are ``ln(predicted / observed)``.

**Horizon.** By default (``horizon="match"``) ``j`` is the budget whose distance from ``k``
(in log C) is nearest the forecast's own distance from the largest budget (the largest ``at_C``),
within ``HORIZON_TOL_DEX``; budgets with no such ``j`` are not scored. A 4x forecast is thus
calibrated by 4x-ahead backtests: on the tuned CPU IsoFLOP study, one-budget-ahead (1.5x)
errors of 1.4% gave a ±4.4% interval that a 4x forecast missed by 7.3%, while the 4x-ahead
errors were 2-5% (docs/results/isoflop_cpu_tuned). ``horizon=1`` (an int h: ``j = k + h``)
scores the next budget, as this module did before. Near the end of the data several backtests
may score the same (last) budget from different starts; each counts in ``n``. With several
``at_C`` in match mode, all are calibrated at the largest one's reach (one chosen configuration,
one half-width), and a warning says so: forecast each budget alone for its own reach.

**Nested choice.** The configuration used to predict a fit's target budget (``k + 1`` with
``horizon=1``) is chosen by leave-future-out on budgets ``<= k`` only (smallest mean ``|error|``), so the score of the whole procedure never
uses the budget it predicts. Its interval is ``exp(+- t_{n-1} s sqrt(1 + 1/n))`` around the
prediction, ``s`` the RMS of the chosen configuration's own backtest errors (``n`` of them).
The procedure's **coverage** is the share of those outer predictions whose observation falls in
their interval, with a 95% Clopper-Pearson interval for that share (95% whatever ``level``). The final forecast at the
asked budgets uses the configuration chosen on all budgets; its interval is widened by the
factor that would have made the outer backtests cover at the nominal level (conformal: the
``level`` quantile of ``|error| / half-width``), when that factor exceeds 1.

numpy / scipy / pandas only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from scaling.errors import UsageError

LAWS = ("saturating", "powerlaw", "chinchilla", "kaplan", "data_constrained")
DEFAULT_LAWS = ("saturating", "powerlaw", "chinchilla")
MIN_BUDGETS = {"powerlaw": 3, "saturating": 4, "chinchilla": 3, "kaplan": 3, "data_constrained": 3}  # budgets a fit needs
RUN_LAWS = ("chinchilla", "kaplan", "data_constrained")  # fitted on every run of the window, not on the frontier
MIN_BACKTESTS = 2  # a configuration with fewer scored budgets is not chosen
HORIZON_TOL_DEX = 0.15  # how far (decades of C) a backtest's reach may be from the forecast's


@dataclass(frozen=True)
class Config:
    law: str
    window: int | None  # last w budgets; None = all

    @property
    def label(self) -> str:
        return f"{self.law}/{'all' if self.window is None else self.window}"


def frontier(df: pd.DataFrame, tol_dex: float = 0.1) -> pd.DataFrame:
    """Per budget (sorted): ``C`` (geometric mean of its runs), ``loss`` (the best run),
    ``n_runs``; each row of ``df`` gets its budget index in ``df["_budget"]``. Budgets are the
    clusters of ``isoflop.budget_groups``; when FLOPs form a continuum instead (every
    checkpoint of a sweep as a point), bins of ``tol_dex`` decades."""
    from scaling.fit.isoflop import MAX_BUDGET_SPAN_DEX, budget_groups

    C = df["C"].to_numpy(float)
    labels, centers = budget_groups(C, tol_dex)
    span = max((np.ptp(np.log10(C[labels == k])) for k in range(len(centers))), default=0.0)
    if span > MAX_BUDGET_SPAN_DEX:
        b = np.floor(np.log10(C) / tol_dex).astype(int)
        _, labels = np.unique(b, return_inverse=True)
        centers = np.array([10 ** np.log10(C[labels == k]).mean() for k in range(labels.max() + 1)])
    df["_budget"] = labels
    rows = [{"C": float(c), "loss": float(df.loc[labels == k, "loss"].min()), "n_runs": int((labels == k).sum())}
            for k, c in enumerate(centers)]
    return pd.DataFrame(rows)


def _fit_predict(cfg: Config, df: pd.DataFrame, front: pd.DataFrame, upto: int, at_C: np.ndarray,
                 cache: dict | None = None) -> np.ndarray | None:
    """Fit ``cfg`` on budgets ``<= upto`` (its window) and predict the frontier at ``at_C``;
    None when the window holds too little for the law. Fits are kept in ``cache`` by the budgets
    they used, so the nested loops refit nothing."""
    from scaling.fit import parametric

    lo = 0 if cfg.window is None else max(0, upto + 1 - cfg.window)
    if upto + 1 - lo < MIN_BUDGETS[cfg.law]:
        return None
    key = (cfg.law, lo, upto)
    cache = {} if cache is None else cache
    if key not in cache:
        with np.errstate(all="ignore"):
            if cfg.law in RUN_LAWS:
                runs = df[(df["_budget"] >= lo) & (df["_budget"] <= upto)]
                cache[key] = _fit_runs(cfg.law, runs)
            else:
                pts = front.iloc[lo:upto + 1][["C", "loss"]].reset_index(drop=True)
                fit = parametric.saturating if cfg.law == "saturating" else parametric.powerlaw
                cache[key] = fit(pts, x="C")
    r = cache[key]
    if r is None:
        return None
    with np.errstate(all="ignore"):
        if callable(r):
            return r(at_C)
        return r.predict(C=at_C)["loss"].to_numpy(float)


def _fit_runs(law: str, runs: pd.DataFrame):
    """A fit of a per-run law on ``runs`` (None when they cannot support it): a result with
    ``predict(C=)`` (Chinchilla) or a function ``C -> frontier loss``."""
    from scaling.fit import data_constrained, parametric

    if len(runs) < 6 or not {"N", "D"} <= set(runs.columns):
        return None
    runs = runs.reset_index(drop=True)
    if law == "chinchilla":
        return parametric.chinchilla(runs[["N", "D", "C", "loss"]])
    N, D = runs["N"].to_numpy(float), runs["D"].to_numpy(float)
    k = float(np.median(runs["C"].to_numpy(float) / (N * D)))
    grid_N = np.logspace(np.log10(N.min()) - 2, np.log10(N.max()) + 3, 400)
    if law == "kaplan":
        fit = parametric.kaplan(runs[["N", "D", "loss"]])
        return _grid_frontier(lambda N_, D_: fit.predict(N=N_.ravel(), D=D_.ravel())["loss"].to_numpy(float), k, grid_N)
    # data_constrained: the columns were checked once for the whole table (forecast() calls
    # data_constrained._columns), so a UsageError here is a window too thin for the fit
    N_, D_, U, y = data_constrained._columns(runs)
    U_max = float(U.max())
    try:
        fit = data_constrained.fit(pd.DataFrame({"N": N_, "D": D_, "U": U, "loss": y}))
    except UsageError:  # too few repeating or single-epoch runs in this window
        return None
    return _grid_frontier(lambda N_, D_: data_constrained.predict(N_, D_, np.minimum(D_, U_max), fit.R_D_star,
                                                                  fit.R_N_star, fit.base), k, grid_N)


def _grid_frontier(loss_of, k: float, grid_N: np.ndarray):
    """``C -> min over grid_N of loss_of(N, C / (k N))`` (``loss_of`` takes [n_C, n_N] arrays)."""
    def frontier_loss(C):
        D_ = np.asarray(C, float)[:, None] / (k * grid_N[None, :])
        L = np.asarray(loss_of(np.broadcast_to(grid_N, D_.shape), D_), float).reshape(D_.shape)
        return np.nanmin(L, axis=1)
    return frontier_loss


def _targets(front: pd.DataFrame, horizon, at_C: np.ndarray):
    """``target(k, upto)``: the budget a fit on budgets ``<= k`` is scored on (``<= upto``), or None."""
    C = front["C"].to_numpy(float)
    if horizon == "match":
        reach = math.log(float(np.max(at_C)) / C[-1])
        tol = HORIZON_TOL_DEX * math.log(10)

        def target(k: int, upto: int):
            if k >= upto:
                return None
            d = np.log(C[k + 1:upto + 1] / C[k])
            i = int(np.argmin(np.abs(d - reach)))
            return k + 1 + i if abs(d[i] - reach) <= tol else None
        return target
    h = int(horizon)
    return lambda k, upto: k + h if k + h <= upto else None


def leave_future_out(cfg: Config, df, front, upto: int, cache: dict | None = None, target=None) -> list[dict]:
    """Backtests of ``cfg`` using budgets ``<= upto``: fit on ``<= k``, score ``target(k, upto)``
    (default: ``k + 1``)."""
    target = target or _targets(front, 1, None)
    out = []
    for k in range(upto):
        j = target(k, upto)
        if j is None:
            continue
        pred = _fit_predict(cfg, df, front, k, front["C"].to_numpy(float)[j:j + 1], cache)
        if pred is None or not np.isfinite(pred[0]) or pred[0] <= 0:
            continue
        obs = float(front["loss"].iloc[j])
        out.append({"fit_upto_C": float(front["C"].iloc[k]), "C": float(front["C"].iloc[j]), "predicted": float(pred[0]),
                    "observed": obs, "log_err": float(np.log(pred[0] / obs))})
    return out


def _choose(configs, df, front, upto: int, cache: dict, target=None):
    """The configuration with the smallest mean |log error| on budgets ``<= upto`` and its backtests."""
    best = None
    table = []
    for cfg in configs:
        bt = leave_future_out(cfg, df, front, upto, cache, target)
        score = float(np.mean([abs(b["log_err"]) for b in bt])) if len(bt) >= MIN_BACKTESTS else math.inf
        status = "candidate" if score < math.inf else f"fewer than {MIN_BACKTESTS} backtests"
        # a configuration that cannot be fitted on the window ending at `upto` cannot make the
        # forecast it would be chosen for (e.g. data_constrained with no single-epoch run there)
        if score < math.inf and _fit_predict(cfg, df, front, upto, front["C"].to_numpy(float)[upto:upto + 1], cache) is None:
            score = math.inf
            status = "cannot fit the last window"
        table.append({"config": cfg.label, "n_backtests": len(bt),
                      "mean_abs_log_err": float(np.mean([abs(b["log_err"]) for b in bt])) if bt else None,
                      "bias": float(np.mean([b["log_err"] for b in bt])) if bt else None, "status": status})
        if score < math.inf and (best is None or score < best[1]):
            best = (cfg, score, bt)
    return best, table


def _half_width(errors: list[float], level: float) -> float:
    """Prediction half-width in log space from backtest errors (Student t, RMS)."""
    n = len(errors)
    s = math.sqrt(float(np.mean(np.square(errors))))
    return float(stats.t.ppf(0.5 + level / 2, max(n - 1, 1)) * s * math.sqrt(1 + 1 / n))


@dataclass
class ForecastResult:
    chosen: str
    level: float
    forecasts: list
    selection: list  # every configuration's leave-future-out score on all budgets
    backtests: list  # the chosen configuration's backtests on all budgets
    nested: list  # the whole procedure's outer predictions
    coverage: float | None
    coverage_ci: tuple | None
    widening: float
    budgets: list
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    horizon: str | int = "match"

    def to_dict(self) -> dict:
        return {"law": f"forecast ({self.chosen})", "chosen": self.chosen, "level": self.level, "horizon": self.horizon,
                "forecasts": self.forecasts,
                "selection": self.selection, "backtests": self.backtests, "nested": self.nested,
                "coverage": self.coverage, "coverage_ci": self.coverage_ci, "widening": self.widening,
                "budgets": self.budgets, "notes": self.notes, "warnings": self.warnings}


def forecast(data, at_C, *, laws=DEFAULT_LAWS, windows=(None, 3, 4), level: float = 0.9, tol_dex: float = 0.1,
             columns=None, where=None, horizon: str | int = "match") -> ForecastResult:
    """Forecast the frontier loss (nats) at ``at_C`` FLOPs from the runs in ``data`` (module
    docstring). ``windows``: fit windows in budgets (None = all). ``horizon``: ``"match"``
    (backtests reach as far as the forecast does) or an int h (score the budget h steps ahead).
    Raises ``UsageError`` for fewer than 4 budgets, a forecast budget inside the data, an unknown
    law or horizon, or too few backtests at the horizon."""
    from scaling.fit import io

    if not (0 < level < 1):
        raise UsageError(f"--level: must be in (0, 1), got {level}")
    if horizon != "match" and not (isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 1):
        raise UsageError(f"--horizon: 'match' or a whole number of budgets >= 1, got {horizon!r}")
    unknown = [law for law in laws if law not in LAWS]
    if unknown or not laws:
        raise UsageError(f"--laws: {', '.join(unknown) or 'none given'}: choose from {', '.join(LAWS)}")
    at_C = np.atleast_1d(np.asarray(at_C, float))
    df, notes = io.load_table(data, columns=columns, where=where)
    io.require(df, ["C", "loss"], what="scaling forecast", min_points=4)
    df = df.reset_index(drop=True)
    if "data_constrained" in laws:  # a data problem (no U, NaN, U > D) is the user's to fix, not a thin window
        from scaling.fit import data_constrained

        data_constrained._columns(df)
    front = frontier(df, tol_dex)
    m = len(front)
    if m < 4:
        raise UsageError(f"scaling forecast: {m} compute budget(s) in the data; leave-future-out needs at least 4")
    inside = at_C[at_C <= front["C"].max() * 10 ** tol_dex]
    if len(inside):
        raise UsageError(f"--at: C={inside[0]:.3g} is inside the data (largest budget {front['C'].max():.3g}); "
                         "a forecast is for a larger budget (fit the data itself with scaling fit)")
    configs = [Config(law, w) for law in laws for w in windows]
    cache: dict = {}
    target = _targets(front, horizon, at_C)
    best, table = _choose(configs, df, front, m - 1, cache, target)
    if best is None:
        reach = f"{float(np.max(at_C)) / front['C'].iloc[-1]:.3g}x ahead" if horizon == "match" else f"{horizon} budget(s) ahead"
        way = (", or forecast nearer (--horizon 1 scores one budget ahead, which under-states the error of a "
               "longer reach)") if horizon != 1 else ""
        raise UsageError(f"scaling forecast: no law and window could be backtested twice {reach}; add budgets or "
                         f"widen --windows{way}")
    cfg, _, bt = best
    nested, covered, z = [], [], []
    for k in range(2, m - 1):  # choose on budgets <= k, predict target(k)
        j = target(k, m - 1)
        if j is None:
            continue
        inner, _ = _choose(configs, df, front, k, cache, target)
        if inner is None:
            continue
        icfg, _, ibt = inner
        pred = _fit_predict(icfg, df, front, k, front["C"].to_numpy(float)[j:j + 1], cache)
        if pred is None or not np.isfinite(pred[0]) or pred[0] <= 0:
            continue
        hw = _half_width([b["log_err"] for b in ibt], level)
        obs = float(front["loss"].iloc[j])
        err = float(np.log(pred[0] / obs))
        inside_ = abs(err) <= hw
        nested.append({"C": float(front["C"].iloc[j]), "chosen": icfg.label, "predicted": float(pred[0]),
                       "observed": obs, "log_err": err, "lo": float(pred[0] * math.exp(-hw)),
                       "hi": float(pred[0] * math.exp(hw)), "covered": bool(inside_)})
        covered.append(inside_)
        z.append(abs(err) / hw if hw > 0 else math.inf)
    coverage = ci = None
    widening = 1.0
    if covered:
        n, x = len(covered), int(sum(covered))
        coverage = x / n
        ci = (float(stats.beta.ppf(0.025, x, n - x + 1)) if x > 0 else 0.0,
              float(stats.beta.ppf(0.975, x + 1, n - x)) if x < n else 1.0)
        widening = max(1.0, float(np.quantile(z, level)))
    hw = _half_width([b["log_err"] for b in bt], level) * widening
    pred = _fit_predict(cfg, df, front, m - 1, at_C, cache)
    forecasts = [{"C": float(c), "loss": float(p), "lo": float(p * math.exp(-hw)), "hi": float(p * math.exp(hw))}
                 for c, p in zip(at_C, pred)]
    warnings = []
    if covered and len(covered) < 5:
        warnings.append(f"coverage measured on {len(covered)} outer backtest(s) only: its interval is wide")
    if horizon == "match" and len(np.unique(at_C)) > 1:
        warnings.append(f"{len(np.unique(at_C))} budgets forecast together are all calibrated at the largest one's reach "
                        f"({float(np.max(at_C)) / front['C'].iloc[-1]:.3g}x): forecast each alone for its own law and interval")
    if not covered:
        warnings.append("coverage not measured: the budgets allow no nested backtest at this horizon (the interval rests "
                        f"on the chosen law's {len(bt)} backtests alone)")
    if widening > 1:
        notes.append(f"interval widened x{widening:.2f} so the outer backtests would cover at {level:.0%}")
    return ForecastResult(cfg.label, level, forecasts, table, bt, nested, coverage, ci, widening,
                          front.to_dict(orient="records"), notes, warnings, horizon)
