"""The data-constrained law of Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models").

Repeated tokens are worth less than new ones, and parameters beyond what the unique data can
use are worth less than useful ones::

    L = E + A / N'^alpha + B / D'^beta
    D' = U + U R_D* (1 - exp(-R_D / R_D*)),    R_D = D / U - 1           (repetitions of the data)
    N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)), U_N = min(N, N_opt(U)), R_N = N / U_N - 1

with ``U`` unique tokens, ``D`` tokens trained on, ``N`` parameters, and ``N_opt(U)`` the
compute-optimal size for ``U`` tokens under the base law (``alpha A N^-alpha = beta B D^-beta``,
so ``N_opt(D) = (alpha A / (beta B))^(1/alpha) D^(beta/alpha)``). As in the paper the fit has
two stages: the base Chinchilla law (given, or fitted on the single-epoch rows, ``D <= U``),
then ``R_D*`` and ``R_N*`` with the base held fixed, by Huber (delta 1e-3) on log loss, summed.

The second stage is poorly identified: on the paper's own 182 runs the objective is flat along
one direction of ``(log R_D*, log R_N*)`` (the published 15.39 / 5.31 give 0.0158259; 28.5 /
2.77 give 0.0158218). ``fit`` therefore reports that direction (the Hessian's soft eigenvector)
and the range of each parameter over the near-optimal set, not one answer alone.

numpy / scipy / pandas only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from scaling.errors import UsageError

BASE_KEYS = ("A", "B", "E", "alpha", "beta")
START_GRID = (1.0, 6.7, 13.3, 20.0)  # the paper's {0, 6.7, 13.3, 20}, with 0 replaced (log coordinates)
NEAR_OPTIMAL = 1e-3  # relative excess objective that still counts as "as good as the optimum"


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def n_opt(d_tokens: np.ndarray, base: dict) -> np.ndarray:
    """Compute-optimal parameters for ``d_tokens`` under the base law (see module docstring)."""
    A, B, al, be = base["A"], base["B"], base["alpha"], base["beta"]
    return (al * A / (be * B)) ** (1.0 / al) * np.asarray(d_tokens, float) ** (be / al)


def effective(N, D, U, r_d_star: float, r_n_star: float, base: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(N', D')``: effective parameters and tokens (same units as N and D)."""
    N, D, U = (np.asarray(v, float) for v in (N, D, U))
    r_d = np.maximum(D / U - 1.0, 0.0)
    u_n = np.minimum(N, n_opt(U, base))
    r_n = np.maximum(N / u_n - 1.0, 0.0)
    d_eff = U + U * r_d_star * (1.0 - np.exp(-r_d / r_d_star))
    n_eff = u_n + u_n * r_n_star * (1.0 - np.exp(-r_n / r_n_star))
    return n_eff, d_eff


def predict(N, D, U, r_d_star: float, r_n_star: float, base: dict) -> np.ndarray:
    """Loss (the base law's units, nats) of runs with ``N`` params, ``D`` tokens, ``U`` unique."""
    n_eff, d_eff = effective(N, D, U, r_d_star, r_n_star, base)
    return base["E"] + base["A"] / n_eff ** base["alpha"] + base["B"] / d_eff ** base["beta"]


def objective(r_d_star: float, r_n_star: float, base: dict, N, D, U, loss, delta: float = 1e-3) -> float:
    """Sum over runs of Huber(delta) of ``log predict - log loss`` (the paper's objective)."""
    pred = predict(N, D, U, r_d_star, r_n_star, base)
    return float(_huber(np.log(pred) - np.log(np.asarray(loss, float)), delta).sum())


@dataclass
class DataConstrainedFit:
    """``R_D_star``, ``R_N_star`` with the base held fixed; ``objective`` (Huber sum);
    ``flat_direction``: unit vector in ``(log R_D*, log R_N*)`` along which the objective is
    flattest, with ``curvature`` (Hessian eigenvalues, soft first); ``near_optimal``: per
    parameter the (min, max) over grid points within ``NEAR_OPTIMAL`` of the optimum;
    ``identified``: per parameter, False when that range spans more than a factor 2."""

    R_D_star: float
    R_N_star: float
    objective: float
    base: dict
    base_from: str
    n_points: int
    n_repeated: int
    flat_direction: tuple[float, float]
    curvature: tuple[float, float]
    near_optimal: dict
    identified: dict
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    predictions: list | None = None

    def predict(self, N=None, D=None, U=None):
        """A table of ``N, D, U, loss`` for the given values (broadcast), loss in nats."""
        import pandas as pd

        if N is None or D is None or U is None:
            raise UsageError("--predict: the data-constrained law needs N, D and U (e.g. --predict N=1e9 --predict D=1e11 "
                             "--predict U=1e10)")
        N, D, U = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, float)) for v in (N, D, U)))
        if (U > D).any():
            raise UsageError("--predict: U (unique tokens) must not exceed D (tokens trained)")
        return pd.DataFrame({"N": N, "D": D, "U": U, "loss": predict(N, D, U, self.R_D_star, self.R_N_star, self.base)})

    def to_dict(self) -> dict:
        d = self.as_dict()
        d["formula"] = "L = E + A/N'^alpha + B/D'^beta, D' = U(1 + R_D*(1 - exp(-R_D/R_D*))), N' likewise (Muennighoff 2023)"
        d["delta"] = 1e-3
        d["notes"] = list(d["notes"]) + [
            f"base law ({self.base_from}): " + ", ".join(f"{k}={v:.6g}" for k, v in self.base.items()),
            f"flattest direction in (log R_D*, log R_N*): ({self.flat_direction[0]:+.3f}, {self.flat_direction[1]:+.3f}), "
            f"curvature {self.curvature[0]:.3g} vs {self.curvature[1]:.3g}",
            "near-optimal (objective within {:.0e}): ".format(NEAR_OPTIMAL)
            + ", ".join(f"{k} {lo:.3g}..{hi:.3g}" for k, (lo, hi) in self.near_optimal.items())]
        if self.predictions is not None:
            d["predictions"] = self.predictions
        return d

    def as_dict(self) -> dict:
        return {"law": "data_constrained", "params": {"R_D_star": self.R_D_star, "R_N_star": self.R_N_star},
                "base": self.base, "base_from": self.base_from, "objective": self.objective, "n_points": self.n_points,
                "n_repeated": self.n_repeated, "flat_direction": list(self.flat_direction),
                "curvature": list(self.curvature), "near_optimal": self.near_optimal, "identified": self.identified,
                "warnings": self.warnings, "notes": self.notes}


def _with_U(df):
    """``df`` with ``U``, the distinct tokens each run saw: as given, or from a sweep directory's
    ``unique_tokens`` (the corpus's tokens per epoch), at most ``D`` (a run of less than one
    epoch saw ``D``)."""
    if "U" not in df.columns and "unique_tokens" in df.columns and "D" in df.columns:
        return df.assign(U=np.minimum(df["unique_tokens"].astype(float), df["D"].astype(float)))
    return df


def _columns(df):
    df = _with_U(df)
    need = ["N", "D", "U", "loss"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UsageError(f"--law data_constrained: needs columns {', '.join(need)}; missing {', '.join(missing)} "
                         "(U = unique tokens: runs.load's unique_tokens, or --columns U=...)")
    N, D, U, y = (df[c].to_numpy(float) for c in need)
    bad = ~(np.isfinite(N) & np.isfinite(D) & np.isfinite(U) & np.isfinite(y) & (N > 0) & (D > 0) & (U > 0) & (y > 0))
    if bad.any():
        raise UsageError(f"--law data_constrained: {int(bad.sum())} row(s) have a missing or non-positive N, D, U or loss")
    if (U > D * (1 + 1e-9)).any():
        raise UsageError(f"U: {int((U > D * (1 + 1e-9)).sum())} row(s) have more unique tokens than tokens trained "
                         "(U > D); U counts the distinct tokens a run saw")
    return N, D, U, y


def fit(data, *, base: dict | None = None, delta: float = 1e-3, columns=None, where=None) -> DataConstrainedFit:
    """Fit ``R_D*`` and ``R_N*`` (module docstring) on a table with ``N``, ``D``, ``U``, ``loss``.

    ``base``: ``{A, B, E, alpha, beta}`` of the base law; None fits Chinchilla on the rows
    trained for at most one epoch (``D <= U``). Raises ``UsageError`` on unusable input.
    """
    from scaling.fit import io, parametric

    df, notes = io.load_table(data, columns=columns, where=where)
    N, D, U, y = _columns(df)
    df = _with_U(df)
    repeated = D > U * (1 + 1e-9)
    if repeated.sum() < 3:
        raise UsageError(f"--law data_constrained: {int(repeated.sum())} run(s) repeat data (D > U); "
                         "R_D* and R_N* need at least 3")
    if base is None:
        single = df[~repeated]
        if len(single) < 6:
            raise UsageError(f"--law data_constrained: {len(single)} single-epoch run(s) to fit the base law on "
                             "(6 needed); give the base with --pin A=..,B=..,E=..,alpha=..,beta=..")
        b = parametric.chinchilla(single)
        base = {k: float(b.params[k]) for k in BASE_KEYS}
        base_from = f"Chinchilla fitted on the {len(single)} single-epoch runs"
    else:
        missing = [k for k in BASE_KEYS if k not in base]
        if missing:
            raise UsageError(f"--pin: the base law needs {', '.join(BASE_KEYS)}; missing {', '.join(missing)}")
        base = {k: float(base[k]) for k in BASE_KEYS}
        base_from = "given"

    def f(t):
        return objective(np.exp(t[0]), np.exp(t[1]), base, N, D, U, y, delta)

    best = None
    for rd in START_GRID:
        for rn in START_GRID:
            r = minimize(f, np.log([rd, rn]), method="L-BFGS-B", bounds=[(-5, 12), (-5, 12)],
                         options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000})
            if best is None or r.fun < best.fun:
                best = r
    t = best.x
    h = 1e-3  # Hessian by central differences in log coordinates
    H = np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            ei, ej = np.eye(2)[i] * h, np.eye(2)[j] * h
            H[i, j] = (f(t + ei + ej) - f(t + ei - ej) - f(t - ei + ej) + f(t - ei - ej)) / (4 * h * h)
    w, v = np.linalg.eigh(H)
    soft = v[:, 0] * np.sign(v[0, 0] or 1.0)
    grid = np.linspace(-3, 9, 121)
    G = np.array([[f((a, b)) for b in grid] for a in grid])
    ia, ib = np.nonzero(G <= best.fun * (1 + NEAR_OPTIMAL))
    la, lb = np.append(grid[ia], t[0]), np.append(grid[ib], t[1])  # the optimum itself always belongs
    rng = {"R_D_star": (float(np.exp(la.min())), float(np.exp(la.max()))),
           "R_N_star": (float(np.exp(lb.min())), float(np.exp(lb.max())))}
    ident = {k: bool(hi / lo <= 2.0) for k, (lo, hi) in rng.items()}
    warnings = []
    for k, ok in ident.items():
        if not ok:
            lo, hi = rng[k]
            warnings.append(f"{k} is not identified: objective within {NEAR_OPTIMAL:.0e} of its minimum from {lo:.3g} to "
                            f"{hi:.3g} (flat along {soft[0]:+.2f} log R_D* {soft[1]:+.2f} log R_N*)")
    if not best.success:
        warnings.append(f"the optimiser stopped without converging: {best.message}")
    return DataConstrainedFit(float(np.exp(t[0])), float(np.exp(t[1])), float(best.fun), base, base_from, len(y),
                              int(repeated.sum()), (float(soft[0]), float(soft[1])), (float(w[0]), float(w[1])), rng,
                              ident, warnings, notes)
