"""Observational scaling laws (Ruan et al. 2024): benchmark scores -> a few principal capability
measures -> a target benchmark through a sigmoid, checked held out by compute.

``observational(df, target, benchmarks, n_components=3, compute="C", holdout_fraction=0.2)``:

1. the models with known compute are split at a compute quantile: the largest
   ``holdout_fraction`` are held out;
2. the ``benchmarks`` scores (the target excluded) are standardised with the fit models' means
   and standard deviations (a missing score takes the fit mean) and projected on the fit models'
   first ``n_components`` principal components: the capability measures ``S``;
3. ``y = floor + (1 - floor) sigmoid(w . S + b)`` is fitted to the fit models' target scores
   (least squares); the held-out models' targets are predicted from their own measures;
4. a baseline uses ``log10(compute)`` alone as the measure (the same sigmoid), which is what a
   compute-only law could do.

Returns an ``ObservationalResult`` with per-model predictions and the held-out mean squared and
absolute errors of both. numpy/scipy/pandas only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scaling.errors import UsageError


@dataclass(frozen=True)
class ObservationalResult:
    """Held-out-by-compute check of an observational law (module docstring)."""

    target: str
    benchmarks: tuple[str, ...]
    n_components: int
    explained: tuple[float, ...]  # variance fraction of each component (fit models)
    cutoff: float  # compute at and above which models are held out
    w: tuple[float, ...]
    b: float
    table: pd.DataFrame = field(repr=False)  # model, compute, split, y, pred, pred_compute_only
    mse: float = 0.0
    mae: float = 0.0
    mse_compute_only: float = 0.0
    mae_compute_only: float = 0.0

    def to_dict(self) -> dict:
        return {"target": self.target, "benchmarks": list(self.benchmarks), "n_components": self.n_components,
                "explained": list(self.explained), "cutoff": self.cutoff, "w": list(self.w), "b": self.b,
                "n_fit": int((self.table["split"] == "fit").sum()), "n_heldout": int((self.table["split"] == "heldout").sum()),
                "mse": self.mse, "mae": self.mae, "mse_compute_only": self.mse_compute_only,
                "mae_compute_only": self.mae_compute_only}


def _sigmoid_fit(S_NxC: np.ndarray, y_N: np.ndarray, floor: float) -> tuple[np.ndarray, float]:
    from scipy.optimize import least_squares

    def resid(theta):
        z = S_NxC @ theta[:-1] + theta[-1]
        return floor + (1 - floor) / (1 + np.exp(-z)) - y_N

    best = None
    for scale in (0.5, 1.0, 3.0):  # a few starts: the sigmoid's slope is not known in advance
        r = least_squares(resid, np.r_[np.full(S_NxC.shape[1], scale), 0.0], method="lm")
        if best is None or r.cost < best.cost:
            best = r
    return best.x[:-1], float(best.x[-1])


def _predict(S_NxC, w, b, floor):
    return floor + (1 - floor) / (1 + np.exp(-(S_NxC @ w + b)))


def observational(df: pd.DataFrame, target: str, benchmarks: list[str], *, n_components: int = 3,
                  compute: str = "C", model: str | None = None, holdout_fraction: float = 0.2,
                  floor: float = 0.0) -> ObservationalResult:
    """The held-out-by-compute check (module docstring). ``df``: one row per model with the
    ``benchmarks`` and ``target`` scores (fractions in [0, 1]) and ``compute`` (FLOPs, any unit);
    ``floor``: the target's chance level. UsageError naming the problem for missing columns,
    too few models or components."""
    need = [target, compute, *benchmarks]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UsageError(f"observational: column(s) {missing} not in the table")
    bench = [b for b in benchmarks if b != target]
    if not 1 <= n_components <= len(bench):
        raise UsageError(f"observational: n_components must be between 1 and {len(bench)} (the benchmarks other than "
                         f"the target), got {n_components}")
    if not 0 < holdout_fraction < 1:
        raise UsageError(f"observational: holdout_fraction must be in (0, 1), got {holdout_fraction}")
    d = df[df[compute].notna() & (df[compute] > 0) & df[target].notna()].reset_index(drop=True)
    if len(d) < n_components + 4:
        raise UsageError(f"observational: {len(d)} models with compute and {target}; need at least {n_components + 4}")
    cutoff = float(np.quantile(d[compute], 1 - holdout_fraction))
    fit_rows = (d[compute] < cutoff).to_numpy()
    X = d[bench].to_numpy(float)
    mu, sd = np.nanmean(X[fit_rows], axis=0), np.nanstd(X[fit_rows], axis=0)
    Z = (np.where(np.isnan(X), mu, X) - mu) / np.where(sd > 0, sd, 1.0)
    _, sv, vt = np.linalg.svd(Z[fit_rows], full_matrices=False)
    comps = vt[:n_components]
    # orient each component so that higher means better on average (readable signs)
    comps = comps * np.sign(comps.sum(axis=1, keepdims=True) + 1e-12)
    S = Z @ comps.T
    y = d[target].to_numpy(float)
    w, b = _sigmoid_fit(S[fit_rows], y[fit_rows], floor)
    pred = _predict(S, w, b, floor)
    lc = np.log10(d[compute].to_numpy(float))[:, None]
    wc, bc = _sigmoid_fit(lc[fit_rows], y[fit_rows], floor)
    pred_c = _predict(lc, wc, bc, floor)
    table = pd.DataFrame({"model": d[model] if model else d.index, "compute": d[compute], "y": y, "pred": pred,
                          "pred_compute_only": pred_c, "split": np.where(fit_rows, "fit", "heldout")})
    held = ~fit_rows
    explained = tuple(float(v) for v in (sv ** 2 / np.sum(sv ** 2))[:n_components])
    return ObservationalResult(target, tuple(bench), n_components, explained, cutoff, tuple(float(v) for v in w), b,
                               table, mse=float(np.mean((pred[held] - y[held]) ** 2)),
                               mae=float(np.mean(np.abs(pred[held] - y[held]))),
                               mse_compute_only=float(np.mean((pred_c[held] - y[held]) ** 2)),
                               mae_compute_only=float(np.mean(np.abs(pred_c[held] - y[held]))))
