"""Fitting scaling laws: from logged runs to laws with intervals, frontiers and backtests.

Depends only on numpy, scipy, pandas and matplotlib (plots, imported on use). Inputs are a
pandas DataFrame, a CSV/JSONL path, or a sweep directory (read with ``scaling.runs``),
with canonical columns ``N`` (parameters), ``D`` (tokens), ``C`` (FLOPs), ``loss`` (nats) and,
where relevant, ``B`` (batch size), ``S`` (steps), ``E`` (experts), ``G`` (granularity).
Every fitter takes ``columns="N=N_params,D=D_tokens"`` (renames) and ``where="..."`` (a row
filter of comparisons and and/or/not, ``scaling.fit.where``; never evaluated as Python). Rows
whose ``state`` is not ``done`` are dropped with a note. Bad input raises
``scaling.errors.UsageError`` (a ``ValueError``) naming the problem.

Parametric laws (Huber delta 1e-3 on log residuals, summed; batched multi-start L-BFGS with
analytic gradients; ``bootstrap=N`` resamples runs for 95% percentile intervals + covariance):

    fit.chinchilla(df, bootstrap=1000)  # L = E + A/N^alpha + B/D^beta, Epoch's 4,500-start grid;
                                        # .a, .b = compute-optimal exponents (approach 3)
    fit.saturating(df, x="C")           # L = E + A x^-alpha   (x = C, N or D)
    fit.powerlaw(df, x="C", y="loss")   # y = A x^-alpha
    fit.kaplan(df)                      # Kaplan L(N, D); L(C) = (C_c/C)^alpha_C without D
    fit.clark(df) / fit.krajewski(df)   # MoE laws in (N, E) / (N, D, G)
    fit.upcycling(df)                   # L = A D1^-a1 D2^(-a2 + a3 ln D1) + E (Liew et al. 2025)
    fit.fp_quant(df)                    # L(N, D, E, M, B), Sun et al. 2025; laws.best_split(bits, delta, nu)

Downstream: ``scaling.fit.observational.observational(df, target, benchmarks)`` (Ruan et al. 2024:
principal capability measures -> sigmoid, checked held out by compute) and
``scaling.fit.two_step.two_step(df)`` (Bhagia et al. 2024: compute -> task loss -> accuracy).
    fit.fit_law(fit.laws.<law>(), df)   # any law in scaling.fit.laws

-> ``FitResult`` with ``.params`` (natural units), ``.ci`` (95%), ``.cov``, ``.objective``,
``.converged``/``.n_converged``/``.warnings`` (non-convergence, init-grid boundary hits),
``.predict(N=..., D=...)`` or ``.predict(C=...)`` (compute-optimal N_opt, D_opt, loss) with
``*_lo``/``*_hi`` bootstrap prediction intervals, and ``.to_dict()``.

Compute-optimal frontier (Chinchilla approaches; all report ``a`` in N_opt ~ C^a, ``b`` in D_opt ~ C^b):

    fit.envelope(steps_df)                     # approach 1, per-step logs (run, C, N, loss, [D])
    fit.isoflop(df, method="parabola"|"akima") # approach 2, per-budget minima -> power laws
    fit.chinchilla(df).a                       # approach 3
    fit.compare(runs=df, steps=steps_df)       # all of them side by side

-> ``FrontierResult`` with ``.a``, ``.b``, ``.ci``, ``.table`` (minima), ``.predict(C)``, ``.to_dict()``.

Critical batch size (``scaling.fit.batch``):

    fit.noise_scale(steps_df)   # B_simple = tr(Sigma)/|G|^2 from two-batch logs (McCandlish et al. 2018), per run
    fit.noise_scale_window(steps_df)  # one B_simple per run over a window of its steps, with an interval
    fit.tradeoff(table)         # S = S_min(1 + B_noise/B) per target loss, then B_crit(L) = B*/L^(1/alpha_B)
    fit.branched_cbs(sweep_dir) # critical batch per checkpoint from branches (Merrill et al. 2025), cbs ~ D^p
    fit.to_minimum_compute(runs, bcrit)  # Kaplan C_min, S_min; then fit.powerlaw(out, x="C_min") = L(C_min)

Extrapolation: ``fit.backtest(df, law="chinchilla", k=1)`` refits without the largest k budgets
and scores the predictions on them. Figures: ``fit.plots.frontier / isoflop / nopt / bcrit / moe``.
"""

from __future__ import annotations

import importlib

from scaling.fit import laws, robust
from scaling.fit.batch import branched_cbs, noise_scale, noise_scale_window, steps_to_target, to_minimum_compute, tradeoff
from scaling.fit.extrapolate import backtest
from scaling.fit.isoflop import compare, envelope, isoflop
from scaling.fit.parametric import (FitResult, chinchilla, clark, fit_law, fp_quant, kaplan, krajewski, powerlaw,
                                    saturating, upcycling)


def __getattr__(name):
    if name == "plots":  # matplotlib only when a figure is asked for
        return importlib.import_module("scaling.fit.plots")
    raise AttributeError(name)


__all__ = [
    "FitResult", "backtest", "chinchilla", "clark", "compare", "envelope", "fit_law", "isoflop", "kaplan",
    "krajewski", "laws", "branched_cbs", "noise_scale", "noise_scale_window", "powerlaw", "robust", "saturating", "steps_to_target", "to_minimum_compute", "tradeoff", "upcycling", "fp_quant",
]
