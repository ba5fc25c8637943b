"""Extrapolation checks: fit on the smaller budgets, predict the largest.

``backtest`` holds out the runs of the largest ``k`` compute budgets, refits the same law on the
rest and reports how far the predictions land from what was observed. A law that cannot
predict its own largest budgets should not be trusted one order of magnitude further out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scaling.errors import UsageError
from scaling.fit import io
from scaling.fit.isoflop import budget_groups, minima
from scaling.fit.isoflop import isoflop as fit_isoflop


def _holdout_split(df: pd.DataFrame, k: int, budget_col: str | None, tol_dex: float):
    if k < 1:
        raise UsageError(f"--holdout-largest: must be >= 1, got {k}")
    if budget_col:
        labels = np.unique(df[budget_col].to_numpy(float), return_inverse=True)[1]
        centers = np.unique(df[budget_col].to_numpy(float))
    else:
        io.require(df, ["C"], what="--holdout-largest")
        labels, centers = budget_groups(df["C"].to_numpy(float), tol_dex)
    if len(centers) <= k:
        raise UsageError(f"--holdout-largest: {len(centers)} compute budget(s); cannot hold out {k} and still fit")
    test = labels >= len(centers) - k
    return df[~test].reset_index(drop=True), df[test].reset_index(drop=True), centers[-k:]


def backtest(data, law: str = "chinchilla", k: int = 1, *, budget_col: str | None = None, tol_dex: float = 0.1, columns=None, where=None, **fit_kw) -> dict:
    """Fit ``law`` without the largest ``k`` budgets and score predictions on them.

    Parametric laws: per held-out run, predicted vs observed loss (nats): ``mae``, ``mape``
    (percent), ``max_abs_err``, ``bias`` (mean predicted - observed). IsoFLOP: per held-out
    budget, predicted vs observed N_opt and D_opt (``log_err`` = ln(pred/obs)).
    """
    from scaling.fit import parametric

    df, _ = io.load_table(data, columns=columns, where=where)
    train, test, held = _holdout_split(df, k, budget_col, tol_dex)
    out = {"holdout_budgets": [float(c) for c in held], "n_train": len(train), "n_test": len(test)}
    if law == "isoflop":
        r = fit_isoflop(train, budget_col=budget_col, tol_dex=tol_dex, **fit_kw)
        lab, cen = (
            (np.unique(test[budget_col], return_inverse=True)[1], np.unique(test[budget_col]))
            if budget_col
            else budget_groups(test["C"].to_numpy(float), tol_dex)
        )
        if "D" not in test.columns:
            test = test.assign(D=test["C"] / (6.0 * test["N"]))
        obs = minima(test, lab, cen, fit_kw.get("method", "parabola"))
        pred = r.predict(obs["C"].to_numpy(float))
        rows = []
        for o, p in zip(obs.itertuples(), pred.itertuples()):
            rows.append(
                {
                    "C": o.C,
                    "N_opt_obs": o.N_opt,
                    "N_opt_pred": p.N_opt,
                    "D_opt_obs": o.D_opt,
                    "D_opt_pred": p.D_opt,
                    "log_err_N": float(np.log(p.N_opt / o.N_opt)) if np.isfinite(o.N_opt) else None,
                    "log_err_D": float(np.log(p.D_opt / o.D_opt)) if np.isfinite(o.D_opt) else None,
                    "flag": o.flag,
                }
            )
        out["rows"] = rows
        errs = [abs(r_["log_err_N"]) for r_ in rows if r_["log_err_N"] is not None and not r_["flag"]]
        out["mean_abs_log_err_N"] = float(np.mean(errs)) if errs else None
        return out
    fitters = {
        "chinchilla": parametric.chinchilla,
        "powerlaw": parametric.powerlaw,
        "saturating": parametric.saturating,
        "kaplan": parametric.kaplan,
        "krajewski": parametric.krajewski,
        "clark": parametric.clark,
    }
    if law not in fitters:
        raise UsageError(f"--holdout-largest: not available for --law {law}")
    r = fitters[law](train, **fit_kw)
    needed = list(r.law_obj.inputs)
    io.require(test, needed + ["loss"], what="--holdout-largest")
    pred = r.predict(**{c: test[c].to_numpy(float) for c in needed})
    err = pred["loss"].to_numpy() - test["loss"].to_numpy(float)
    out.update(
        mae=float(np.abs(err).mean()),
        mape=float(100 * np.abs(err / test["loss"].to_numpy(float)).mean()),
        max_abs_err=float(np.abs(err).max()),
        bias=float(err.mean()),
        fit_params=r.params,
    )
    return out
