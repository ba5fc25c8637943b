"""Parametric law fits (Chinchilla approach 3, power laws, Kaplan, MoE laws) and their results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from scaling.errors import UsageError
from scaling.fit import io, laws, robust


def _percentiles(v: np.ndarray) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(v, [2.5, 97.5])
    return (float(lo), float(hi))


@dataclass
class FitResult:
    """A fitted law. ``params`` in natural units (A, E, alpha, ...); ``ci`` 95% bootstrap
    percentile intervals (empty without ``--bootstrap``); ``cov`` the bootstrap covariance of the
    natural parameters; ``objective`` the summed Huber loss on log residuals.

    For Chinchilla fits ``a``/``b`` are the compute-optimal exponents N_opt ~ C^a, D_opt ~ C^b
    derived from the fit (approach 3), with ``flops_per_param_token`` k in C = k N D.
    """

    law: str
    formula: str
    params: dict[str, float]
    objective: float
    n_points: int
    n_starts: int
    n_converged: int
    converged: bool
    delta: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    cov: dict[str, dict[str, float]] = field(default_factory=dict)
    n_boot: int = 0
    n_boot_converged: int = 0
    a: float | None = None
    b: float | None = None
    flops_per_param_token: float | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    backtest: dict | None = None
    law_obj: Any = field(default=None, repr=False)
    theta: np.ndarray | None = field(default=None, repr=False)
    boot_theta: np.ndarray | None = field(default=None, repr=False)
    identified: dict[str, bool] = field(default_factory=dict)  # per parameter (see identifiability)
    boot_at_bound: dict[str, int] = field(default_factory=dict)  # bootstrap refits that ended at a bound

    # ------------------------------------------------------------ predictions
    def _frontier(self, theta: np.ndarray, C: np.ndarray):
        """Compute-optimal N, D, L at FLOPs C for Chinchilla parameters ``theta[S, 5]``."""
        a_, b_, e_, al, be = (theta[:, i : i + 1] for i in range(5))
        k = self.flops_per_param_token or 6.0
        # argmin_N  A N^-al + B (C/(kN))^-be  =>  N_opt = G (C/k)^(be/(al+be))
        logG = (np.log(al) + a_ - np.log(be) - b_) / (al + be)
        lc = np.log(C / k)[None]
        lN = logG + be / (al + be) * lc
        lD = lc - lN
        L = np.exp(e_) + np.exp(a_ - al * lN) + np.exp(b_ - be * lD)
        return np.exp(lN), np.exp(lD), L

    def predict(self, **inputs) -> pd.DataFrame:
        """Predictions with 95% bootstrap intervals (``*_lo``/``*_hi``; NaN without bootstrap).

        ``predict(N=..., D=...)`` (or the law's own inputs) gives the loss; for a Chinchilla fit
        ``predict(C=...)`` gives the compute-optimal ``N_opt``, ``D_opt`` and ``loss`` at C FLOPs.
        """
        law = self.law_obj
        arrs = {k: np.atleast_1d(np.asarray(v, dtype=float)) for k, v in inputs.items()}
        n = max(len(v) for v in arrs.values()) if arrs else 0
        arrs = {k: np.broadcast_to(v, (n,)).copy() for k, v in arrs.items()}
        for k, v in arrs.items():
            if not (np.isfinite(v).all() and (v > 0).all()):
                raise UsageError(f"predict: {k} must be finite and positive")
        thetas = [self.theta[None]] + ([self.boot_theta] if self.boot_theta is not None else [])
        out = pd.DataFrame(arrs)
        if self.law == "chinchilla" and set(arrs) == {"C"}:
            cols = ("N_opt", "D_opt", "loss")
            vals = [self._frontier(th, arrs["C"]) for th in thetas]
        elif set(law.inputs) <= set(arrs):
            cols = (law.target,)
            vals = [(law.predict(th, arrs),) for th in thetas]
        else:
            raise UsageError(f"predict: {self.law} needs {', '.join(law.inputs)}" + (" (or C)" if self.law == "chinchilla" else ""))
        for j, c in enumerate(cols):
            out[c] = vals[0][j][0]
            if len(vals) > 1:
                b = vals[1][j]
                out[c + "_lo"] = np.nanpercentile(b, 2.5, axis=0)
                out[c + "_hi"] = np.nanpercentile(b, 97.5, axis=0)
            else:
                out[c + "_lo"] = np.nan
                out[c + "_hi"] = np.nan
        return out

    def to_dict(self) -> dict:
        d = {
            "law": self.law,
            "formula": self.formula,
            "params": self.params,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "cov": self.cov,
            "objective": self.objective,
            "delta": self.delta,
            "n_points": self.n_points,
            "n_starts": self.n_starts,
            "n_converged": self.n_converged,
            "converged": self.converged,
            "n_boot": self.n_boot,
            "n_boot_converged": self.n_boot_converged,
            "warnings": self.warnings,
            "identified": self.identified,
            "boot_at_bound": self.boot_at_bound,
            "notes": self.notes,
        }
        if self.a is not None:
            d.update(a=self.a, b=self.b, flops_per_param_token=self.flops_per_param_token)
            d["ci"].update({k: list(v) for k, v in self.ci.items() if k in ("a", "b")})
        return io.with_results(d, self)


# Identifiability (issue 17). Each parameter has a role (``ROLES`` for the laws where the name
# says it; otherwise a log-fitted parameter is a scale and any other is free):
# - an asymptote (E) is at a bound below 1/1000 of the smallest observed value (E -> 0), and
#   unidentified when its 95% bootstrap interval spans more than a decade or reaches zero;
# - a positive exponent (Chinchilla's alpha, beta) is at a bound below 1e-3 or above 5, and
#   unidentified when its interval spans more than a decade;
# - a scale (A, B, ...) is at a bound when it runs away (beyond 1e30 or below 1e-30); its interval
#   is not judged by its span, which depends on the units of x (A is the law at x = 1);
# - a free parameter (a signed slope, an intercept) is reported, not judged.
# Any parameter is unidentified when the point fit is at a bound or more than 10% of the
# bootstrap refits end at one.
SPAN_DECADES = 1.0
BOUND_SHARE = 0.10
ROLES = {"chinchilla": {"E": "asymptote", "alpha": "exponent", "beta": "exponent"},
         "saturating": {"E": "asymptote"}}


def roles(law) -> dict[str, str]:
    """The identifiability role of every parameter of ``law`` (see above)."""
    given = ROLES.get(law.name, {})
    return {p.natural: given.get(p.natural, "scale" if p.log else "free") for p in law.params}


def _at_bound(role: str, v: np.ndarray, y_min: float) -> np.ndarray:
    v = np.asarray(v, float)
    if role == "asymptote":
        return v < 1e-3 * y_min
    if role == "scale":
        return ~np.isfinite(v) | (v > 1e30) | (v < 1e-30)
    if role == "exponent":
        return ~np.isfinite(v) | (v < 1e-3) | (v > 5.0)
    return ~np.isfinite(v)


def identifiability(params: dict, boot: dict | None, y_min: float, role: dict | None = None) -> tuple[dict, dict, list[str]]:
    """``(identified, boot_at_bound, warnings)`` per parameter of a fit (see the rules above);
    ``boot`` maps each parameter to its bootstrap refits' values (None without a bootstrap),
    ``role`` each parameter to its role (``roles(law)``; default: E an asymptote, the rest scales)."""
    identified, at_bound, warns = {}, {}, []
    role = role or {}
    for name, value in params.items():
        r = role.get(name, "asymptote" if name == "E" else "scale")
        why = []
        if bool(_at_bound(r, value, y_min)):
            why.append(f"the fit puts it at a bound ({value:.3g})")
        if boot is not None and name in boot:
            v = np.asarray(boot[name], float)
            k = int(_at_bound(r, v, y_min).sum())
            at_bound[name] = k
            lo, hi = _percentiles(v)
            if r in ("asymptote", "exponent"):
                if lo > 0 and hi > 0 and np.log10(hi / lo) > SPAN_DECADES:
                    why.append(f"its 95% interval {lo:.3g}..{hi:.3g} spans {np.log10(hi / lo):.1f} decades")
                elif not lo > 0:
                    why.append(f"its 95% interval {lo:.3g}..{hi:.3g} reaches zero")
            if len(v) and k > BOUND_SHARE * len(v):
                why.append(f"{k}/{len(v)} bootstrap refits end at a bound")
        identified[name] = not why
        if why:
            warns.append(f"{name} is not identified: {'; '.join(why)} (the data do not pin it down: "
                         f"add runs where it matters, or trust a law with fewer parameters)")
    return identified, at_bound, warns


def measured_noise(df: pd.DataFrame, target: str = "loss") -> np.ndarray:
    """Relative noise of each run's ``target`` for the seed-noise bootstrap
    (``seed_noise="measured"``): the larger of the seed-to-seed spread ``loss_seed_std`` (when
    two or more seeds ran) and the held-out standard error ``loss_se``, over the loss."""
    cols = [c for c in ("loss_seed_std", "loss_se") if c in df.columns]
    if not cols:
        raise UsageError("--seed-noise measured: the table has neither loss_se nor loss_seed_std "
                         "(runs of schema version 3 or later record them); give a number instead")
    sigma = np.fmax.reduce([pd.to_numeric(df[c], errors="coerce").to_numpy(float) for c in cols])
    if np.isnan(sigma).any():
        raise UsageError(f"--seed-noise measured: {int(np.isnan(sigma).sum())} run(s) have no measured noise; "
                         f"give a number instead")
    return sigma / df[target].to_numpy(float)


def fit_law(
    law: laws.Law,
    data,
    *,
    delta: float = 1e-3,
    bootstrap: int = 0,
    seed: int = 0,
    starts: np.ndarray | None = None,
    groups: str | None = None,
    seed_noise: float = 0.0,
    columns=None,
    where: str | None = None,
    notes: list[str] | None = None,
    pin: dict[str, float] | None = None,
) -> FitResult:
    """Fit ``law`` to ``data`` (DataFrame, table path or sweep dir) by Huber-in-log multi-start L-BFGS.

    ``bootstrap``: number of resamples of the runs (rows, or whole ``groups`` of rows) for the
    95% intervals and covariance; with ``seed_noise`` > 0 (relative loss noise between seeds)
    the runs are kept and their losses perturbed instead. ``pin`` holds parameters fixed at
    given natural values (``{"E": 1.69}``: an asymptote the data cannot identify, taken from
    elsewhere); they are reported, not fitted. Raises ``UsageError`` on unusable input.
    """
    if not isinstance(seed_noise, str) and seed_noise < 0:
        raise UsageError(f"--seed-noise: must be >= 0 or 'measured', got {seed_noise}")
    if not (delta > 0):
        raise UsageError(f"delta: Huber delta must be positive, got {delta}")
    if bootstrap < 0:
        raise UsageError(f"--bootstrap: must be >= 0, got {bootstrap}")
    df, notes0 = io.load_table(data, columns=columns, where=where)
    notes = list(notes or []) + notes0
    what = f"--law {law.name}"
    need = list(law.inputs) + [law.target]
    io.require(df, need, what=what, min_points=law.n_params + 1)
    x, y = io.inputs(df, law.inputs), df[law.target].to_numpy(float)
    noise = measured_noise(df, law.target) if isinstance(seed_noise, str) and bootstrap else seed_noise
    pin = dict(pin or {})
    known = [p.natural for p in law.params]
    for k, v in pin.items():
        if k not in known:
            raise UsageError(f"--pin {k}: not a parameter of --law {law.name} ({', '.join(known)})")
        is_log = next(p for p in law.params if p.natural == k).log
        if not (np.isfinite(v) and (v > 0 or not is_log)):
            raise UsageError(f"--pin {k}={v}: must be a finite{' positive' if is_log else ''} number")
    try:
        fit_as = laws.pinned(law, pin) if pin else law
    except ValueError as err:
        raise UsageError(f"--pin: {err}") from None
    if pin:
        notes.append(f"pinned (not fitted): {', '.join(f'{k}={v:g}' for k, v in pin.items())}")
    ms = robust.fit_multistart(fit_as, x, y, delta=delta, starts=None if pin else starts)
    if pin:
        ms.theta = laws.expand(law, pin, ms.theta)
    natural = {k: float(v) for k, v in law.natural(ms.theta).items()}
    res = FitResult(
        law=law.name,
        formula=law.formula,
        params=natural,
        objective=ms.objective,
        n_points=len(y),
        n_starts=ms.n_starts,
        n_converged=ms.n_converged,
        converged=ms.converged,
        delta=delta,
        warnings=list(ms.warnings),
        notes=notes,
        law_obj=law,
        theta=ms.theta,
    )
    if law.name == "chinchilla":
        al, be = ms.theta[3], ms.theta[4]
        res.a, res.b = float(be / (al + be)), float(al / (al + be))
        if "C" in df.columns:
            res.flops_per_param_token = float(np.median(df["C"] / (df["N"] * df["D"])))
        else:
            res.flops_per_param_token = 6.0
        if al <= 0 or be <= 0:
            res.warnings.append("an exponent is <= 0: no compute-optimal frontier exists for this fit")
    if bootstrap:
        g = df[groups].to_numpy() if groups and groups in df.columns else None
        theta0 = np.delete(ms.theta, [known.index(k) for k in pin]) if pin else ms.theta
        th, ok = robust.bootstrap(fit_as, x, y, theta0, n_boot=bootstrap, seed=seed, delta=delta, groups=g, seed_noise=noise)
        if pin:
            th = laws.expand(law, pin, th)
        res.n_boot, res.n_boot_converged = bootstrap, int(ok.sum())
        if ok.sum() < 0.9 * bootstrap:
            res.warnings.append(f"only {int(ok.sum())}/{bootstrap} bootstrap refits converged; intervals use those")
        th = th[ok] if ok.any() else th
        res.boot_theta = th
        nat = law.natural(th)
        if law.name == "chinchilla":
            nat["a"] = th[:, 4] / (th[:, 3] + th[:, 4])
            nat["b"] = th[:, 3] / (th[:, 3] + th[:, 4])
        res.ci = {k: _percentiles(v) for k, v in nat.items() if k not in pin}
        names = [k for k in law.natural(ms.theta) if k not in pin]
        M = np.stack([nat[k] for k in names], axis=1)
        cov = np.cov(M, rowvar=False) if len(M) > 1 else np.full((len(names), len(names)), np.nan)
        res.cov = {a: {b: float(cov[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)}
    boot_nat = {k: v for k, v in law.natural(res.boot_theta).items() if k not in pin} if res.boot_theta is not None else None
    free = {k: v for k, v in natural.items() if k not in pin}
    res.identified, res.boot_at_bound, warns = identifiability(free, boot_nat, float(np.min(y)), roles(law))
    res.warnings.extend(warns)
    return res


# ------------------------------------------------------------------ public shortcuts


def chinchilla(data, **kw) -> FitResult:
    """``L(N, D) = E + A/N^alpha + B/D^beta`` on columns N (params), D (tokens), loss (nats).

    Default: Epoch's 4,500-start grid, Huber delta 1e-3 summed on log loss. Reports the
    compute-optimal exponents ``a = beta/(alpha+beta)``, ``b = alpha/(alpha+beta)``.
    """
    return fit_law(laws.chinchilla(), data, **kw)


def saturating(data, x: str = "C", **kw) -> FitResult:
    """``L = E + A x^-alpha`` with x = C (FLOPs), N (params) or D (tokens)."""
    return fit_law(laws.saturating(x), data, **kw)


def powerlaw(data, x: str = "C", y: str = "loss", **kw) -> FitResult:
    """``y = A x^-alpha`` (pure power law, e.g. Kaplan's L(C_min) = (C_c/C)^alpha_C)."""
    return fit_law(laws.powerlaw(x, y), data, **kw)


def kaplan(data, **kw) -> FitResult:
    """Kaplan et al. 2020 ``L(N, D)``; if the table has no D, the compute law ``L(C) = (C_c/C)^alpha_C``."""
    df, notes = io.load_table(data, columns=kw.pop("columns", None), where=kw.pop("where", None))
    if "D" in df.columns and "N" in df.columns:
        return fit_law(laws.kaplan(), df, notes=notes, **kw)
    res = fit_law(laws.powerlaw("C", "loss", name="kaplan_c"), df, notes=notes, **kw)
    # report in Kaplan's parametrisation: L = (C_c / C)^alpha_C, C_c = A^(1/alpha_C)
    A, al = res.params["A"], res.params["alpha"]
    res.params["C_c"] = float(A ** (1.0 / al)) if al > 0 else float("nan")
    res.formula = "L = (C_c/C)^alpha_C = A*C^-alpha"
    return res


def clark(data, **kw) -> FitResult:
    """Clark et al. 2022 routed law on columns N, E (experts), loss."""
    return fit_law(laws.clark(), data, **kw)


def upcycling(data, **kw) -> FitResult:
    """Liew et al. 2025 upcycling law on columns D1 (dense tokens), D2 (upcycled tokens), loss:
    ``L = A D1^-alpha1 D2^(-alpha2 + alpha3 ln D1) + E`` (one model size)."""
    return fit_law(laws.upcycling(), data, **kw)


def fp_quant(data, **kw) -> FitResult:
    """Sun et al. 2025 floating-point quantization law on columns N, D, E, M, B (elements per
    scale; 1 for unquantized rows), loss (``laws.fp_quant``)."""
    return fit_law(laws.fp_quant(), data, **kw)


def krajewski(data, **kw) -> FitResult:
    """Krajewski et al. 2024 fine-grained MoE law on columns N, D, G (granularity), loss."""
    return fit_law(laws.krajewski(), data, **kw)
