"""The two-step downstream law (Bhagia et al. 2024, the OLMo ladder): training compute -> task
loss -> task accuracy.

Step 1: the task loss (``answer_nll``, nats/token, from ``scaling eval --tasks``) against training
FLOPs, ``L(C) = E + A C^-alpha`` (``scaling.fit.saturating``). Step 2: accuracy against task loss
through a sigmoid, ``acc(L) = lo + (hi - lo) / (1 + exp(k (L - L0)))`` (falling in L), least
squares. A forecast chains them: ``acc(L(C))``. numpy/scipy/pandas only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from scaling.errors import UsageError


@dataclass(frozen=True)
class TwoStepResult:
    """Both steps' parameters; ``predict(C)`` chains them."""

    loss_law: object  # FitResult of step 1 (E, A, alpha)
    lo: float
    hi: float
    k: float
    L0: float

    def accuracy_at_loss(self, L) -> np.ndarray:
        """Step 2: accuracy at task loss ``L`` (nats/token)."""
        return self.lo + (self.hi - self.lo) / (1 + np.exp(self.k * (np.asarray(L, float) - self.L0)))

    def predict(self, C) -> pd.DataFrame:
        """Columns ``C``, ``task_loss`` (step 1) and ``accuracy`` (step 2 of step 1)."""
        C = np.atleast_1d(np.asarray(C, float))
        p = self.loss_law.params
        L = p["E"] + p["A"] * C ** -p["alpha"]
        return pd.DataFrame({"C": C, "task_loss": L, "accuracy": self.accuracy_at_loss(L)})

    def to_dict(self) -> dict:
        return {"loss_law": {k: float(v) for k, v in self.loss_law.params.items()},
                "accuracy_law": {"lo": self.lo, "hi": self.hi, "k": self.k, "L0": self.L0}}


def two_step(df: pd.DataFrame, *, compute: str = "C", task_loss: str = "answer_nll", accuracy: str = "exact_match",
             lo: float | None = 0.0, hi: float | None = 1.0) -> TwoStepResult:
    """Fit both steps on ``df`` (one row per model: ``compute`` FLOPs, ``task_loss`` nats/token,
    ``accuracy`` in [0, 1]). ``lo``/``hi``: the accuracy's floor and ceiling (chance and 1 by
    default; None fits them). UsageError for missing columns or too few rows."""
    from scipy.optimize import least_squares

    from scaling import fit

    for c in (compute, task_loss, accuracy):
        if c not in df.columns:
            raise UsageError(f"two_step: column {c} not in the table")
    d = df[[compute, task_loss, accuracy]].dropna()
    if len(d) < 4:
        raise UsageError(f"two_step: {len(d)} usable rows; need at least 4 (3 for step 1's law and one more)")
    law = fit.saturating(d.rename(columns={compute: "C", task_loss: "loss"})[["C", "loss"]], x="C")
    L, y = d[task_loss].to_numpy(float), d[accuracy].to_numpy(float)
    free_lo, free_hi = lo is None, hi is None

    def unpack(t):
        i = 2
        a = t[i] if free_lo else lo
        i += free_lo
        b = t[i] if free_hi else hi
        return t[0], t[1], a, b

    def resid(t):
        k, L0, a, b = unpack(t)
        return a + (b - a) / (1 + np.exp(k * (L - L0))) - y

    best = None
    for k0 in (1.0, 5.0, 20.0):
        t0 = [k0, float(np.median(L))] + ([0.0] if free_lo else []) + ([1.0] if free_hi else [])
        r = least_squares(resid, t0, method="lm" if len(d) >= len(t0) else "trf")
        if best is None or r.cost < best.cost:
            best = r
    k, L0, a, b = unpack(best.x)
    return TwoStepResult(law, float(a), float(b), float(k), float(L0))
