"""Loss-curve laws over learning-rate schedules: the multi-power law (Luo et al. 2025).

For one model shape, the loss after ``t`` steps of a schedule ``eta_1 .. eta_t`` is::

    L(t) = L0 + A (S1(t) + S_W)^-alpha - LD(t)
    S1(t) = sum_{tau <= t} eta_tau            (the schedule's area, warmup included: S_W = 0 here)
    LD(t) = B sum_{k <= t} (eta_{k-1} - eta_k) G(eta_k^-gamma S_k(t)),  S_k(t) = sum_{k <= tau <= t} eta_tau
    G(x)  = 1 - (C x + 1)^-beta

The loss-drop term LD is summed over the *decrements* of the lr after its peak: warmup
increments are not drops, and a rise after the peak (a re-warmup, which the paper sums as a
signed difference) is left out too; the schedules here never rise after their peak. A
constant run has LD = 0 and cannot teach it: fit constant and decaying runs together. Seven parameters, L0, A, alpha, B, C, beta, gamma, all positive,
fitted in log coordinates by multi-start L-BFGS on the squared log error of every point.

The **LR-annealing law** (Tissue et al. 2024) is the simpler alternative, ``law="annealing"``::

    L(t) = L0 + A S1(t)^-alpha - C S2(t),   S2(t) = sum_{i <= t} m_i,  m_i = lam m_{i-1} + (eta_{i-1} - eta_i)

(the signed lr differences after the peak, so a re-warmup lowers S2 as in the paper,
accumulated with momentum ``lam``, the paper's 0.999): four fitted parameters, L0, A, alpha, C.

Curves come from per-step logs (``runs.load_steps``): the lr is logged every ``log_every``
steps and linearly interpolated to every step (exact for linear warmup and linear decay, within
1e-4 relative for a cosine logged every 10-25 steps). The lr values are what the schedule set:
with μP the per-tensor multipliers scale all steps alike and fold into the fitted constants.

numpy / scipy / pandas only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from scaling.errors import UsageError

PARAMS = ("L0", "A", "alpha", "B", "C", "beta", "gamma")
# starts in natural units (the paper's fitted values sit near alpha 0.5, beta 0.6, gamma 0.6, C 2)
START_GRID = {"alpha": (0.3, 0.6), "B": (1e1, 1e2, 1e3), "C": (0.5, 2.0), "beta": (0.6,), "gamma": (0.4, 0.7)}


@dataclass(frozen=True)
class Curve:
    """One run: ``lr`` float[T] (the lr of steps 1..T), ``steps`` int[n] (1-based, <= T) with
    ``loss`` float[n] (nats) observed there, and its ``name``."""

    name: str
    lr: np.ndarray
    steps: np.ndarray
    loss: np.ndarray


def schedule_from_log(steps, lrs, total_steps: int | None = None) -> np.ndarray:
    """The lr of every step 1..T from logged ``(step, lr)`` pairs (linear interpolation; a
    step before the first log ramps from 0, as a linear warmup does)."""
    steps, lrs = np.asarray(steps, float), np.asarray(lrs, float)
    if len(steps) == 0 or not np.isfinite(lrs).all():
        raise UsageError("lr: a curve needs logged learning-rate values at its steps")
    if (lrs < 0).any():
        raise UsageError("lr: learning rates must be >= 0")
    T = int(total_steps or steps.max())
    return np.interp(np.arange(1, T + 1), np.concatenate([[0.0], steps]), np.concatenate([[0.0], lrs]))


def _terms(lr: np.ndarray, steps: np.ndarray):
    """Per observed step t: ``S1(t)``, and for the loss drop the decrements ``d_k`` (k <= t,
    after the peak), ``eta_k`` and ``S_k(t)`` as a [n, K] matrix over the decrement steps."""
    S = np.cumsum(lr)  # S[t-1] = S1(t)
    peak = int(np.argmax(lr))
    d = np.zeros_like(lr)
    d[1:] = lr[:-1] - lr[1:]
    d[: peak + 1] = 0.0  # the warmup's increments are not drops
    k = np.flatnonzero(d > 0)
    t = np.asarray(steps, int) - 1
    S1 = S[t]
    # S_k(t) = S1(t) - S1(k-1): the area from step k to t; zero where k > t (no drop yet)
    before = np.where(k > 0, S[np.maximum(k - 1, 0)], 0.0)
    Skt = S1[:, None] - before[None, :]
    mask = k[None, :] <= t[:, None]
    return S1, d[k], lr[k], np.where(mask, Skt, 0.0), mask


ANNEALING_PARAMS = ("L0", "A", "alpha", "C")
ANNEALING_MOMENTUM = 0.999


def _annealing_terms(lr: np.ndarray, steps: np.ndarray, lam: float = ANNEALING_MOMENTUM):
    """Per observed step: ``S1(t)`` and the annealing area ``S2(t)`` (module docstring)."""
    S = np.cumsum(lr)
    peak = int(np.argmax(lr))
    d = np.zeros_like(lr)
    d[1:] = lr[:-1] - lr[1:]
    d[: peak + 1] = 0.0
    m = np.zeros_like(lr)
    acc = 0.0
    for i, di in enumerate(d):  # one pass: m_i = lam m_{i-1} + d_i
        acc = lam * acc + di
        m[i] = acc
    t = np.asarray(steps, int) - 1
    return S[t], np.cumsum(m)[t]


def predict_annealing(theta: np.ndarray, S1, S2) -> np.ndarray:
    L0, A, al, C = np.exp(theta)
    return L0 + A * S1 ** (-al) - C * S2


def predict_terms(theta: np.ndarray, S1, dk, etak, Skt, mask) -> np.ndarray:
    L0, A, al, B, C, be, ga = np.exp(theta)
    x = etak[None, :] ** (-ga) * Skt
    G = 1.0 - (C * x + 1.0) ** (-be)
    LD = B * np.sum(np.where(mask, dk[None, :] * G, 0.0), axis=1)
    return L0 + A * S1 ** (-al) - LD


@dataclass
class MultiPowerFit:
    """The fitted law: ``params`` (natural units), ``objective`` (mean squared log error over
    every point of every curve), ``rmse_log`` per curve, ``n_points``."""

    params: dict
    objective: float
    rmse_log: dict
    n_points: int
    theta: np.ndarray
    warnings: list = field(default_factory=list)
    law: str = "multipower"  # or "annealing"

    def predict_curve(self, lr_schedule, steps=None) -> np.ndarray:
        """The loss (nats) after each of ``steps`` (1-based; default every step) of the per-step
        schedule ``lr_schedule`` float[T] (an unseen schedule of the same shape and batch)."""
        lr = np.asarray(lr_schedule, float)
        if lr.ndim != 1 or len(lr) == 0 or not np.isfinite(lr).all() or (lr < 0).any():
            raise UsageError("lr_schedule: a 1-D array of the lr of every step, finite and >= 0")
        if not (lr > 0).any():
            raise UsageError("lr_schedule: every lr is 0, so nothing is trained; give the schedule's learning rates")
        steps = np.arange(1, len(lr) + 1) if steps is None else np.asarray(steps, int)
        if (steps < 1).any() or (steps > len(lr)).any():
            raise UsageError(f"steps: must be within 1..{len(lr)} (the schedule's length)")
        if self.law == "annealing":
            return predict_annealing(self.theta, *_annealing_terms(lr, steps))
        return predict_terms(self.theta, *_terms(lr, steps))


def curves_from_steps(df: pd.DataFrame, loss: str = "eval_loss") -> list[Curve]:
    """One ``Curve`` per trial of a ``runs.load_steps`` table: ``loss`` (default the held-out
    ``eval_loss``) where it was measured, the lr interpolated from the logged ``lr`` column."""
    need = {"trial_id", "step", "lr", loss}
    if not need <= set(df.columns):
        raise UsageError(f"curves: needs columns {', '.join(sorted(need))}; missing {', '.join(sorted(need - set(df.columns)))}")
    out = []
    for tid, g in df.sort_values("step").groupby("trial_id", sort=True):
        lr_rows = g[g["lr"].notna()]
        obs = g[g[loss].notna() & (g["step"] > 0)]
        if len(obs) < 3:
            continue
        lr = schedule_from_log(lr_rows["step"], lr_rows["lr"], int(g["step"].max()))
        out.append(Curve(str(tid), lr, obs["step"].to_numpy(int), obs[loss].to_numpy(float)))
    return out


def _multipower_starts(starts: dict, lmin: float) -> list[np.ndarray]:
    return [np.log([0.8 * lmin, 0.5, al, B, C, be, ga]) for al in starts["alpha"] for B in starts["B"]
            for C in starts["C"] for ga in starts["gamma"] for be in starts["beta"]]


def _annealing_starts(_starts: dict, lmin: float) -> list[np.ndarray]:
    return [np.log([0.8 * lmin, 0.5, al, C]) for al in (0.2, 0.4, 0.7) for C in (0.01, 0.1, 1.0)]


# law -> (terms of a curve, prediction from terms, parameter names, bounds in log coordinates,
#         starts, "has a decay to learn from" test on one curve's terms, the term's name)
_LAWS = {
    "multipower": (_terms, predict_terms, PARAMS,
                   [(-10, 3), (-10, 5), (-5, 1.5), (-10, 12), (-10, 8), (-5, 1.5), (-5, 1.5)],
                   _multipower_starts, lambda t: t[1].size > 0, "loss-drop"),
    "annealing": (_annealing_terms, predict_annealing, ANNEALING_PARAMS,
                  [(-10, 3), (-10, 5), (-5, 1.5), (-10, 12)],
                  _annealing_starts, lambda t: bool(np.any(t[1] > 0)), "annealing"),
}


def fit(curves: list[Curve], *, warmup_skip: int = 0, grid: dict | None = None, law: str = "multipower") -> MultiPowerFit:
    """Fit the multi-power law (or ``law="annealing"``) to ``curves`` of one shape (module
    docstring) by multi-start L-BFGS; points at steps ``<= warmup_skip`` are left out (the law
    describes the loss after warmup). ``grid`` overrides entries of ``START_GRID`` (natural
    units, multi-power only). Raises ``UsageError`` without a decaying curve among them."""
    if law not in _LAWS:
        raise UsageError(f"law: {law!r} is not multipower or annealing")
    terms_of, predict, names, bounds, starts_of, decays, term = _LAWS[law]
    if not curves:
        raise UsageError("curves: no run with at least 3 logged losses")
    parts = []
    for c in curves:
        keep = c.steps > warmup_skip
        if keep.sum() >= 3:
            parts.append((c.name, terms_of(c.lr, c.steps[keep]), np.log(c.loss[keep])))
    if not parts:
        raise UsageError(f"curves: no run has 3 losses after step {warmup_skip}")
    if not any(decays(t) for _, t, _ in parts):
        raise UsageError(f"curves: every schedule is constant after its peak, so the {term} term cannot be fitted; "
                         "add a run whose lr decays (cosine, WSD, linear)")
    y_all = np.concatenate([y for _, _, y in parts])

    def f(theta):
        p = np.concatenate([predict(theta, *t) for _, t, _ in parts])
        return 1e3 if not np.all(p > 0) else float(np.mean((np.log(p) - y_all) ** 2))

    best = None
    for t0 in starts_of({**START_GRID, **(grid or {})}, float(np.exp(y_all.min()))):
        r = minimize(f, t0, method="L-BFGS-B", bounds=bounds, options={"maxiter": 3000, "ftol": 1e-14, "gtol": 1e-10})
        if best is None or r.fun < best.fun:
            best = r
    theta = best.x
    rmse = {n: float(np.sqrt(np.mean((np.log(predict(theta, *t)) - y) ** 2))) for n, t, y in parts}
    warnings = [] if best.success else [f"the optimiser stopped without converging: {best.message}"]
    return MultiPowerFit(dict(zip(names, map(float, np.exp(theta)))), float(best.fun), rmse, len(y_all), theta,
                         warnings, law=law)
