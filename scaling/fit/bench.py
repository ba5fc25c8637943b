"""fit: seconds for the 4,500-start Chinchilla fit, 1,000 bootstrap refits, and a plain scipy loop.

The reference is what Epoch AI's notebook does: ``scipy.optimize.minimize(method="L-BFGS-B")``
with finite-difference gradients, once per grid start, on the same data and objective. It is
timed in the same process so the ratio is measured under the same machine load. With
``--scipy-starts K`` only every (4500/K)-th start is run and the time is scaled to the full grid
(reported as ``scipy_extrapolated``).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from scaling.errors import UsageError

DEFAULT_DATA = "chinchilla_epoch_245runs_N_D_C_loss.csv"


def add_arguments(parser, kind: str) -> None:
    parser.add_argument("--data", default=None, help="Epoch Chinchilla CSV (default: the shipped copy, scaling.published 'chinchilla_epoch')")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap refits to time")
    parser.add_argument("--scipy-starts", type=int, default=4500, help="grid starts for the scipy reference (<= 4500; scaled up)")


def _data(path):
    import pandas as pd
    from pathlib import Path

    if path is None:
        from scaling import published  # the Epoch table ships with the package

        path = published.path("chinchilla_epoch")
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--data: {path} not found (the Epoch Chinchilla table is needed for this benchmark)")
    d = pd.read_csv(path)
    if "epoch_outlier_excluded" in d:
        d = d[d["epoch_outlier_excluded"] == 0]
    return {"N": d["N_params"].to_numpy(float), "D": d["D_tokens"].to_numpy(float)}, d["loss"].to_numpy(float)


def scipy_reference(x, y, starts, delta=1e-3):
    """Epoch's procedure: one L-BFGS-B call per start, numerical gradients. Returns best f."""
    from scipy.optimize import minimize
    from scipy.special import huber, logsumexp

    lN, lD, ly = np.log(x["N"]), np.log(x["D"]), np.log(y)

    def obj(p):
        a, b, e, al, be = p
        pred = logsumexp([a - al * lN, b - be * lD, np.full_like(lN, e)], axis=0)
        return huber(delta, ly - pred).sum()

    best = np.inf
    for s in starts:
        r = minimize(obj, s, method="L-BFGS-B")
        if r.success and r.fun < best:
            best = r.fun
    return best


def run(args) -> int:
    from scaling.fit import laws, robust

    x, y = _data(args.data)
    law = laws.chinchilla()
    grid = law.grid()
    robust.fit_multistart(law, x, y, starts=grid[:8])  # warm imports and thread pool
    t0, c0 = time.perf_counter(), time.process_time()
    ms = robust.fit_multistart(law, x, y)
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    _, ok = robust.bootstrap(law, x, y, ms.theta, n_boot=args.bootstrap)
    t_boot, c_boot = time.perf_counter() - t0, time.process_time() - c0
    k = max(1, min(args.scipy_starts, len(grid)))
    idx = np.linspace(0, len(grid) - 1, k).round().astype(int)
    t0, c0 = time.perf_counter(), time.process_time()
    f_ref = scipy_reference(x, y, grid[idx])
    t_ref = (time.perf_counter() - t0) * len(grid) / k
    c_ref = (time.process_time() - c0) * len(grid) / k
    out = {
        "n_points": len(y),
        "n_starts": len(grid),
        "fit_s": round(t_fit, 3),
        "fit_cpu_s": round(c_fit, 3),
        "objective": ms.objective,
        "n_converged": ms.n_converged,
        "bootstrap_refits": args.bootstrap,
        "bootstrap_s": round(t_boot, 3),
        "bootstrap_cpu_s": round(c_boot, 3),
        "bootstrap_converged": int(ok.sum()),
        "scipy_numgrad_s": round(t_ref, 2),
        "scipy_numgrad_cpu_s": round(c_ref, 2),
        "load_average_1min": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "scipy_starts_run": k,
        "scipy_extrapolated": k < len(grid),
        "scipy_best_objective": f_ref,
        "speedup_vs_scipy": round(t_ref / t_fit, 1),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"Chinchilla fit, {len(y)} points, {len(grid)} starts: {t_fit:.2f} s wall, {c_fit:.2f} s CPU "
              f"(objective {ms.objective:.6e}, {ms.n_converged} converged)")
        print(f"{args.bootstrap} bootstrap refits: {t_boot:.2f} s wall, {c_boot:.2f} s CPU ({int(ok.sum())} converged)")
        note = f" (ran {k} starts, scaled to {len(grid)})" if k < len(grid) else ""
        print(f"scipy L-BFGS-B loop, numerical gradients: {t_ref:.1f} s wall, {c_ref:.1f} s CPU{note}; best objective {f_ref:.6e}")
        print(f"speed-up vs scipy loop: {t_ref / t_fit:.1f}x wall; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0
