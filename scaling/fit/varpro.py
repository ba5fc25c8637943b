"""Chinchilla approach 3 by variable projection, with bounds on the asymptote.

``L(N, D) = E + A/N^alpha + B/D^beta`` is linear in ``(E, A, B)`` once the exponents are fixed.
``chinchilla_varpro`` solves that linear part exactly (bounded least squares on *relative*
residuals ``(L_hat - L) / L``, ~ the log residuals for small errors; ``A, B >= 0`` and
``E`` within ``E_bounds``) for every ``(alpha, beta)`` of a grid, then refines the best pair.
It cannot stall in a flat valley of the 5-parameter surface, a prior range on E is a bound, not
a penalty, and the profiled objective over ``(alpha, beta)`` gives profile-likelihood intervals
for the exponents (Gaussian relative errors: the pairs whose residual sum of squares is within
``chi2_1(0.95) * sigma^2`` of the best, projected on each exponent: a per-parameter interval,
profiled over the other exponent and the linear part).

The least-squares objective is not the Huber-in-log of ``parametric.chinchilla`` (Epoch's), so
on clean data the two agree closely and on data with outliers they differ: use this one when
the Huber fit is flagged unidentified.
"""

from __future__ import annotations

import numpy as np

from scaling.errors import UsageError
from scaling.fit import io, laws

CHI2_1_95 = 3.841458820694124  # chi-squared quantile, 1 degree of freedom, 0.95 (a per-parameter profile interval)
GRID = np.round(np.arange(0.05, 1.5001, 0.025), 4)


def _solve(lN, lD, L, al, be, E_bounds):
    """Bounded LS for (E, A, B) at fixed exponents: (rss, E, A, B)."""
    from scipy.optimize import lsq_linear

    M = np.stack([np.ones_like(lN), np.exp(-al * lN), np.exp(-be * lD)], axis=1) / L[:, None]
    if E_bounds[0] == E_bounds[1]:  # E pinned: solve for A, B with E's term moved to the target
        E = float(E_bounds[0])
        r = lsq_linear(M[:, 1:], 1.0 - E / L, bounds=([0.0, 0.0], [np.inf, np.inf]), method="bvls")
        return float(2 * r.cost), E, *map(float, r.x)
    r = lsq_linear(M, np.ones_like(L), bounds=([E_bounds[0], 0.0, 0.0], [E_bounds[1], np.inf, np.inf]), method="bvls")
    return float(2 * r.cost), *map(float, r.x)


def _profile(lN, lD, L, E_bounds, grid):
    surf = np.empty((len(grid), len(grid)))
    for i, al in enumerate(grid):
        for j, be in enumerate(grid):
            surf[i, j] = _solve(lN, lD, L, al, be, E_bounds)[0]
    return surf


def _best(lN, lD, L, E_bounds, grid):
    from scipy.optimize import minimize

    surf = _profile(lN, lD, L, E_bounds, grid)
    i, j = np.unravel_index(np.argmin(surf), surf.shape)
    f = lambda p: _solve(lN, lD, L, p[0], p[1], E_bounds)[0] if min(p) > 0 else np.inf  # noqa: E731
    res = minimize(f, [grid[i], grid[j]], method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-14})
    al, be = (res.x if res.fun <= surf[i, j] else (grid[i], grid[j]))
    rss, E, A, B = _solve(lN, lD, L, al, be, E_bounds)
    return rss, E, A, B, float(al), float(be), surf


def chinchilla_varpro(data, *, E_bounds=(0.0, np.inf), bootstrap: int = 0, seed: int = 0, columns=None,
                      where: str | None = None):
    """Approach 3 by variable projection (see the module). Returns a ``parametric.FitResult``
    (law ``chinchilla``, so ``predict(C=...)`` works) with ``profile_ci`` for alpha and beta in
    ``notes`` and ``ci`` from a bootstrap over runs when asked. ``E_bounds`` is a prior range on
    the asymptote (nats); ``(1.69, 1.69)`` pins it."""
    from scaling.fit.parametric import FitResult, _percentiles, identifiability, roles

    lo, hi = (float(v) for v in E_bounds)
    if not (0.0 <= lo <= hi):
        raise UsageError(f"E_bounds: need 0 <= low <= high, got {E_bounds}")
    df, notes = io.load_table(data, columns=columns, where=where)
    io.require(df, ["N", "D", "loss"], what="--law chinchilla (varpro)", min_points=6)
    lN, lD, L = (np.log(df["N"].to_numpy(float)), np.log(df["D"].to_numpy(float)), df["loss"].to_numpy(float))
    rss, E, A, B, al, be, surf = _best(lN, lD, L, (lo, hi), GRID)
    n = len(L)
    sigma2 = rss / max(n - 5, 1)
    inside = surf <= max(rss, surf.min()) + CHI2_1_95 * sigma2  # the grid's best point at least
    ia, ib = np.nonzero(inside)
    h = float(GRID[1] - GRID[0]) / 2  # the grid's resolution: an interval is never narrower than one step
    prof = {"alpha": (float(GRID[ia].min()) - h, float(GRID[ia].max()) + h),
            "beta": (float(GRID[ib].min()) - h, float(GRID[ib].max()) + h)}
    law = laws.chinchilla()
    theta = np.array([np.log(max(A, 1e-300)), np.log(max(B, 1e-300)), np.log(max(E, 1e-300)), al, be])
    params = {"A": A, "B": B, "E": E, "alpha": al, "beta": be}
    res = FitResult(law="chinchilla", formula=law.formula + " (variable projection, relative least squares)", params=params,
                    objective=rss, n_points=n, n_starts=GRID.size ** 2, n_converged=GRID.size ** 2, converged=True,
                    delta=None, notes=notes, law_obj=law, theta=theta)
    res.a, res.b = be / (al + be), al / (al + be)
    res.flops_per_param_token = float(np.median(df["C"] / (df["N"] * df["D"]))) if "C" in df.columns else 6.0
    res.notes.append("profile 95% intervals: " + ", ".join(f"{k} {v[0]:.3g}..{v[1]:.3g}" for k, v in prof.items())
                     + (" (reaching the grid's edge)" if any(v[0] <= GRID[0] or v[1] >= GRID[-1] + h for v in prof.values()) else ""))
    res.profile_ci = prof
    if lo > 0 or np.isfinite(hi):
        res.notes.append(f"E bounded to [{lo:g}, {hi:g}]")
    boots = []
    if bootstrap:
        rng = np.random.default_rng(seed)
        coarse = GRID[::2]
        for _ in range(bootstrap):
            ix = rng.integers(0, n, n)
            _, Eb, Ab, Bb, ab, bb, _ = _best(lN[ix], lD[ix], L[ix], (lo, hi), coarse)
            boots.append([np.log(max(Ab, 1e-300)), np.log(max(Bb, 1e-300)), np.log(max(Eb, 1e-300)), ab, bb])
        res.boot_theta = np.array(boots)
        res.n_boot = res.n_boot_converged = bootstrap
        nat = law.natural(res.boot_theta)
        nat["a"] = res.boot_theta[:, 4] / (res.boot_theta[:, 3] + res.boot_theta[:, 4])
        nat["b"] = 1 - nat["a"]
        res.ci = {k: _percentiles(v) for k, v in nat.items()}
    free = {k: v for k, v in params.items() if not (k == "E" and lo == hi)}
    boot = {k: v for k, v in law.natural(res.boot_theta).items() if k in free} if boots else None
    res.identified, res.boot_at_bound, warns = identifiability(free, boot, float(L.min()), roles(law))
    if "E" in free and lo < hi and ((lo > 0 and E <= lo * (1 + 1e-6)) or E >= hi * (1 - 1e-6)):
        res.identified["E"] = False
        warns.append(f"E is not identified: it sits on its prior bound ({E:.4g} of [{lo:g}, {hi:g}]); the runs "
                     f"would put it outside the range")
    for k, v in (("A", A), ("B", B)):
        if v <= 0:
            res.identified[k] = False
            warns.append(f"{k} is not identified: the bounded least squares puts it at 0 (its term is not in the data)")
    for k, (a, b) in prof.items():
        if b / a > 10 or a <= GRID[0] or b >= GRID[-1] + h:
            res.identified[k] = False
            warns.append(f"{k} is not identified: its profile 95% interval {a:.3g}..{b:.3g} is wide or reaches the grid's edge")
    res.warnings.extend(warns)
    return res
