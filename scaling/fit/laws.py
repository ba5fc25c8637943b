"""Scaling-law forms with analytic gradients, all fitted in log space.

Every law predicts ``log y`` (y is a loss in nats unless stated) from input columns and a
parameter vector ``theta``. Scale parameters are fitted as logarithms (``a = log A``) because the
objective is much better conditioned there (Epoch AI's Chinchilla refit does the same).

Most laws are a log-sum-exp of terms that are *linear* in ``theta``::

    log y_hat = LSE_k( F_k(x) @ theta + O_k(x) )

e.g. Chinchilla ``L = E + A/N^alpha + B/D^beta`` is ``LSE(a - alpha log N, b - beta log D, e)``.
For those the Jacobian is ``sum_k softmax_k * F_k``, which lets the fitter evaluate thousands of
starting points with a few matrix products (see ``robust.py``). Kaplan's L(N, D) is not of this
kind and has its own Jacobian.

Shapes: ``theta`` is ``[S, P]`` (S starts or bootstrap resamples, P parameters); inputs are
dicts of ``[n]`` arrays; predictions are ``[S, n]``; Jacobians ``[S, n, P]``.

Over 400 lines: the catalogue of law forms (Chinchilla, Kaplan, MoE, upcycling, FP quantization,
batch trade-off, ...), each a short function of the same shape; one module keeps every form next
to the LSE machinery it relies on, and the fitter's ``scaling fit --law`` names in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Param:
    """One fitted parameter. ``log=True``: fitted as log of the reported (natural) value."""

    fitted: str  # name of the fitted coordinate, e.g. "a" (= log A)
    natural: str  # reported name, e.g. "A"
    log: bool
    grid: tuple[float, ...]  # initialisation grid (in fitted coordinates)


@dataclass(frozen=True)
class Law:
    """A law form. Subclasses implement ``log_predict`` and ``jacobian``."""

    name: str
    formula: str
    inputs: tuple[str, ...]  # required input columns
    target: str  # column holding y (loss, steps, batch size, ...)
    params: tuple[Param, ...]

    @property
    def n_params(self) -> int:
        return len(self.params)

    def grid(self) -> np.ndarray:
        """The Cartesian product of the per-parameter grids, ``[S, P]``."""
        axes = [np.asarray(p.grid, dtype=float) for p in self.params]
        mesh = np.meshgrid(*axes, indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=1)

    def natural(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Reported parameter values from fitted coordinates ``theta[..., P]``."""
        theta = np.asarray(theta, dtype=float)
        return {
            p.natural: (np.exp(theta[..., i]) if p.log else theta[..., i]) for i, p in enumerate(self.params)
        }

    def log_predict(self, theta: np.ndarray, x: Inputs) -> np.ndarray:
        raise NotImplementedError

    def value_and_jacobian(self, theta: np.ndarray, x: Inputs) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def predict(self, theta: np.ndarray, x: Inputs) -> np.ndarray:
        """``y_hat`` in natural units, ``[S, n]`` (or ``[n]`` for a 1-d theta)."""
        theta = np.asarray(theta, dtype=float)
        out = np.exp(self.log_predict(np.atleast_2d(theta), x))
        return out[0] if theta.ndim == 1 else out


@dataclass(frozen=True)
class LSELaw(Law):
    """``log y_hat = LSE_k(F_k(x) @ theta + O_k(x))``.

    ``features(x)`` returns ``(F [K, n, P], O [K, n])``.
    """

    features: Callable[[Inputs], tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False)

    def terms(self, theta: np.ndarray, x: Inputs) -> np.ndarray:
        """Per-term log values ``[S, n, K]``."""
        F, O = self.features(x)
        K, n, P = F.shape
        T = theta @ F.transpose(2, 1, 0).reshape(P, n * K)  # [S, n*K]
        return T.reshape(theta.shape[0], n, K) + O.T[None]

    def log_predict(self, theta, x):
        T = self.terms(np.atleast_2d(theta), x)
        m = T.max(axis=2, keepdims=True)
        return (m + np.log(np.exp(T - m).sum(axis=2, keepdims=True)))[..., 0]

    def value_and_jacobian(self, theta, x):
        theta = np.atleast_2d(theta)
        F, _ = self.features(x)
        T = self.terms(theta, x)
        m = T.max(axis=2, keepdims=True)
        e = np.exp(T - m)
        z = e.sum(axis=2, keepdims=True)
        pred = (m + np.log(z))[..., 0]
        soft = e / z  # [S, n, K]
        jac = np.einsum("snk,knp->snp", soft, F)
        return pred, jac


def _log(x: Inputs, key: str) -> np.ndarray:
    return np.log(np.asarray(x[key], dtype=float))


def _stack(terms: list[list[np.ndarray | float]], n: int) -> np.ndarray:
    return np.stack([np.stack([np.broadcast_to(np.asarray(c, float), (n,)) for c in t], axis=1) for t in terms])


# ---------------------------------------------------------------- law definitions

A_GRID = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)  # log-coefficient grid (Epoch / Hoffmann)
EXP_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)
E_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)


def chinchilla() -> LSELaw:
    """Hoffmann et al. 2022 ``L(N, D) = E + A/N^alpha + B/D^beta`` (N params, D tokens, L nats).

    Default grid = the 4,500-start grid of Hoffmann et al. / Epoch AI (Besiroglu et al. 2024).
    """

    def features(x):
        lN, lD = _log(x, "N"), _log(x, "D")
        n = lN.shape[0]
        z, o = np.zeros(n), np.ones(n)
        # theta = (a, b, e, alpha, beta)
        F = _stack([[o, z, z, -lN, z], [z, o, z, z, -lD], [z, z, o, z, z]], n)
        return F, np.zeros((3, n))

    return LSELaw(
        name="chinchilla",
        formula="L = E + A/N^alpha + B/D^beta",
        inputs=("N", "D"),
        target="loss",
        params=(
            Param("a", "A", True, A_GRID),
            Param("b", "B", True, A_GRID),
            Param("e", "E", True, E_GRID),
            Param("alpha", "alpha", False, EXP_GRID),
            Param("beta", "beta", False, EXP_GRID),
        ),
        features=features,
    )


def saturating(x: str = "C") -> LSELaw:
    """``L = E + A * x^-alpha`` in compute (FLOPs), parameters or tokens (column ``x``)."""

    def features(inp):
        lx = _log(inp, x)
        n = lx.shape[0]
        z, o = np.zeros(n), np.ones(n)
        F = _stack([[o, -lx, z], [z, z, o]], n)  # theta = (a, alpha, e)
        return F, np.zeros((2, n))

    return LSELaw(
        name="saturating",
        formula=f"L = E + A*{x}^-alpha",
        inputs=(x,),
        target="loss",
        params=(
            Param("a", "A", True, A_GRID),
            Param("alpha", "alpha", False, (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)),
            Param("e", "E", True, E_GRID),
        ),
        features=features,
    )


def powerlaw(x: str = "C", target: str = "loss", name: str = "powerlaw") -> LSELaw:
    """``y = A * x^-alpha`` (a straight line in log-log; alpha < 0 for a growing y)."""

    def features(inp):
        lx = _log(inp, x)
        n = lx.shape[0]
        return _stack([[np.ones(n), -lx]], n), np.zeros((1, n))

    return LSELaw(
        name=name,
        formula=f"{target} = A*{x}^-alpha",
        inputs=(x,),
        target=target,
        params=(Param("a", "A", True, (0.0, 5.0, 10.0, 20.0)), Param("alpha", "alpha", False, (-1.0, 0.0, 0.5, 1.0))),
        features=features,
    )


def krajewski() -> LSELaw:
    """Krajewski et al. 2024 fine-grained MoE: ``L = c + (g/G^gamma + a)/N^alpha + b/D^beta``.

    N active non-embedding params, D tokens, G granularity (expert size = d_ff / G).
    """

    def features(x):
        lN, lD, lG = _log(x, "N"), _log(x, "D"), _log(x, "G")
        n = lN.shape[0]
        z, o = np.zeros(n), np.ones(n)
        # theta = (lg, gamma, la, alpha, lb, beta, lc)
        F = _stack(
            [
                [o, -lG, z, -lN, z, z, z],
                [z, z, o, -lN, z, z, z],
                [z, z, z, z, o, -lD, z],
                [z, z, z, z, z, z, o],
            ],
            n,
        )
        return F, np.zeros((4, n))

    return LSELaw(
        name="krajewski",
        formula="L = c + (g/G^gamma + a)/N^alpha + b/D^beta",
        inputs=("N", "D", "G"),
        target="loss",
        params=(
            # 648 starts: the Chinchilla-style grid over 7 parameters would be ~10^5
            Param("lg", "g", True, (0.0, 5.0)),
            Param("gamma", "gamma", False, (0.0, 0.5, 1.0)),
            Param("la", "a", True, (0.0, 5.0, 10.0)),
            Param("alpha", "alpha", False, (0.1, 0.5)),
            Param("lb", "b", True, (0.0, 5.0, 10.0)),
            Param("beta", "beta", False, (0.1, 0.5)),
            Param("lc", "c", True, (-1.0, 0.0, 1.0)),
        ),
        features=features,
    )


def upcycling() -> LSELaw:
    """Liew et al. 2025 upcycling law: ``L = A D1^-alpha1 D2^(-alpha2 + alpha3 ln D1) + E``.

    D1 dense training tokens, D2 tokens trained after upcycling (both tokens, natural logs).
    ``alpha3 > 0`` is the interaction the paper finds: the more the dense model was trained,
    the less each upcycled token buys (the effective D2 exponent ``alpha2 - alpha3 ln D1``
    falls). One model size per fit (the paper fits each size, then the sizes' parameters).
    """

    def features(x):
        l1, l2 = _log(x, "D1"), _log(x, "D2")
        n = l1.shape[0]
        z, o = np.zeros(n), np.ones(n)
        # theta = (la, alpha1, alpha2, alpha3, le)
        return _stack([[o, -l1, -l2, l1 * l2, z], [z, z, z, z, o]], n), np.zeros((2, n))

    return LSELaw(
        name="upcycling",
        formula="L = A D1^-alpha1 D2^(-alpha2 + alpha3 ln D1) + E",
        inputs=("D1", "D2"),
        target="loss",
        params=(
            Param("la", "A", True, (0.0, 2.0, 5.0)),
            Param("alpha1", "alpha1", False, (0.0, 0.1, 0.3)),
            Param("alpha2", "alpha2", False, (0.0, 0.2, 0.5)),
            Param("alpha3", "alpha3", False, (-0.01, 0.0, 0.01)),
            Param("le", "E", True, (-1.0, 0.0, 0.5)),
        ),
        features=features,
    )


def fp_quant() -> LSELaw:
    """Sun et al. 2025 floating-point quantization law (their unified form, as we read it):
    ``L = n/N^alpha + d/D^beta + eps + (D^beta / N^alpha) log2(B) / (gamma (E+0.5)^delta (M+0.5)^nu)``.

    N non-embedding parameters, D tokens, E/M exponent/mantissa bits of the training format,
    B elements per scale. The last term is the quantization penalty: it grows with data (too
    much data in low precision hurts: the "critical data size"), shrinks with model size and with
    each exponent and mantissa bit. Rows trained without quantization give ``B = 1``
    (``log2 1 = 0``: no penalty) and any E, M. At a fixed bit count ``E + M`` the penalty is
    smallest where ``(E + 0.5) / (M + 0.5) = delta / nu`` (``best_split``).
    """

    def features(x):
        lN, lD = _log(x, "N"), _log(x, "D")
        lE, lM = np.log(np.asarray(x["E"], float) + 0.5), np.log(np.asarray(x["M"], float) + 0.5)
        with np.errstate(divide="ignore"):
            l2B = np.log(np.log2(np.asarray(x["B"], float)))  # -inf for B = 1: the term vanishes
        n = lN.shape[0]
        z, o = np.zeros(n), np.ones(n)
        # theta = (ln n, alpha, ln d, beta, ln eps, ln gamma, delta, nu)
        F = _stack([[o, -lN, z, z, z, z, z, z],
                    [z, z, o, -lD, z, z, z, z],
                    [z, z, z, z, o, z, z, z],
                    [z, -lN, z, lD, z, -o, -lE, -lM]], n)
        return F, np.stack([z, z, z, l2B])

    return LSELaw(
        name="fp_quant",
        formula="L = n/N^alpha + d/D^beta + eps + D^beta/N^alpha log2(B) / (gamma (E+0.5)^delta (M+0.5)^nu)",
        inputs=("N", "D", "E", "M", "B"),
        target="loss",
        params=(
            Param("ln", "n", True, (0.0, 5.0)),
            Param("alpha", "alpha", False, (0.1, 0.4)),
            Param("ld", "d", True, (0.0, 5.0)),
            Param("beta", "beta", False, (0.1, 0.4)),
            Param("leps", "eps", True, (-1.0, 0.5)),
            Param("lgamma", "gamma", True, (0.0, 5.0, 10.0)),
            Param("delta", "delta", False, (0.5, 2.0, 4.0)),
            Param("nu", "nu", False, (0.5, 2.0, 4.0)),
        ),
        features=features,
    )


def best_split(bits: int, delta: float, nu: float) -> tuple[int, int]:
    """``(E, M)`` with ``1 + E + M = bits`` (E >= 1, M >= 0) that minimises the quantization
    penalty ``(E+0.5)^-delta (M+0.5)^-nu`` of ``fp_quant``."""
    splits = [(e, bits - 1 - e) for e in range(1, bits)]
    return min(splits, key=lambda s: -delta * np.log(s[0] + 0.5) - nu * np.log(s[1] + 0.5))


def clark() -> LSELaw:
    """Clark et al. 2022 routed LM: ``log L = a log N + b log E + c log N log E + d``.

    N dense-equivalent params, E experts (used directly; Clark's saturating E-hat transform is
    not applied). Linear in theta, so a single start suffices.
    """

    def features(x):
        lN, lE = _log(x, "N"), _log(x, "E")
        n = lN.shape[0]
        return _stack([[lN, lE, lN * lE, np.ones(n)]], n), np.zeros((1, n))

    return LSELaw(
        name="clark",
        formula="log L = a log N + b log E + c log N log E + d",
        inputs=("N", "E"),
        target="loss",
        params=(
            Param("a", "a", False, (0.0,)),
            Param("b", "b", False, (0.0,)),
            Param("c", "c", False, (0.0,)),
            Param("d", "d", False, (0.0, 1.0)),
        ),
        features=features,
    )


def tradeoff() -> LSELaw:
    """McCandlish et al. 2018 steps/batch trade-off ``S = S_min (1 + B_noise/B)``.

    Target column ``S`` (optimizer steps to reach a loss), input ``B`` (batch size, in the units
    the table states). ``B_crit = E_min/S_min = B_noise``.
    """

    def features(x):
        lB = _log(x, "B")
        n = lB.shape[0]
        z, o = np.zeros(n), np.ones(n)
        F = _stack([[o, z], [o, o]], n)  # theta = (ls_min, lb_noise)
        O = np.stack([np.zeros(n), -lB])
        return F, O

    return LSELaw(
        name="tradeoff",
        formula="S = S_min (1 + B_noise/B)",
        inputs=("B",),
        target="S",
        params=(
            Param("ls_min", "S_min", True, (0.0, 3.0, 6.0, 9.0, 12.0)),
            Param("lb_noise", "B_noise", True, (0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0)),
        ),
        features=features,
    )


@dataclass(frozen=True)
class KaplanLaw(Law):
    """Kaplan et al. 2020 ``L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D``."""

    def _parts(self, theta, x):
        lN, lD = _log(x, "N"), _log(x, "D")
        lNc, lDc, aN, aD = (theta[:, i : i + 1] for i in range(4))
        t1 = (aN / aD) * (lNc - lN[None])
        t2 = lDc - lD[None]
        m = np.maximum(t1, t2)
        e1, e2 = np.exp(t1 - m), np.exp(t2 - m)
        z = m + np.log(e1 + e2)
        return aN, aD, lNc, lN, t1, z, e1 / (e1 + e2)

    def log_predict(self, theta, x):
        theta = np.atleast_2d(theta)
        _, aD, *_, z, _ = self._parts(theta, x)
        return aD * z

    def value_and_jacobian(self, theta, x):
        theta = np.atleast_2d(theta)
        aN, aD, lNc, lN, t1, z, s1 = self._parts(theta, x)
        s2 = 1.0 - s1
        jac = np.stack([aN * s1, aD * s2, s1 * (lNc - lN[None]), z - s1 * t1], axis=2)
        return aD * z, jac


def kaplan() -> KaplanLaw:
    """Kaplan et al. 2020 joint law in N (non-embedding params) and D (tokens); L in nats."""
    return KaplanLaw(
        name="kaplan",
        formula="L = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D",
        inputs=("N", "D"),
        target="loss",
        params=(
            Param("lNc", "N_c", True, (20.0, 25.0, 30.0, 35.0)),
            Param("lDc", "D_c", True, (20.0, 25.0, 30.0, 35.0)),
            Param("alpha_N", "alpha_N", False, (0.05, 0.1, 0.2, 0.4)),
            Param("alpha_D", "alpha_D", False, (0.05, 0.1, 0.2, 0.4)),
        ),
    )


LAWS: dict[str, Callable[[], Law]] = {
    "chinchilla": chinchilla,
    "saturating": saturating,
    "powerlaw": powerlaw,
    "krajewski": krajewski,
    "clark": clark,
    "kaplan": kaplan,
    "tradeoff": tradeoff,
}


def pinned(law: LSELaw, values: dict[str, float]) -> LSELaw:
    """``law`` with the parameters named in ``values`` (natural names, natural units: ``{"E": 1.7}``)
    held fixed: their terms move into the offsets, the fitted vector loses their coordinates.
    ``expand(law, values, theta)`` puts them back for prediction with the full law."""
    if not isinstance(law, LSELaw):
        raise ValueError(f"pinning needs a log-sum-exp law; {law.name} is not one")
    names = [p.natural for p in law.params]
    idx = [names.index(k) for k in values]
    fixed = {i: (np.log(values[law.params[i].natural]) if law.params[i].log else float(values[law.params[i].natural]))
             for i in idx}
    keep = [i for i in range(law.n_params) if i not in fixed]

    def features(x):
        F, O = law.features(x)
        O = O + sum(F[:, :, i] * v for i, v in fixed.items())
        return F[:, :, keep], O

    pins = ", ".join(f"{k}={v:g}" for k, v in values.items())
    return LSELaw(name=law.name, formula=f"{law.formula} ({pins} pinned)", inputs=law.inputs, target=law.target,
                  params=tuple(law.params[i] for i in keep), features=features)


def expand(law: Law, values: dict[str, float], theta: np.ndarray) -> np.ndarray:
    """Fitted coordinates of a ``pinned`` fit (``[..., P - k]``) -> the full law's (``[..., P]``)."""
    theta = np.asarray(theta, float)
    names = [p.natural for p in law.params]
    out, j = [], 0
    for i, p in enumerate(law.params):
        if p.natural in values:
            v = np.log(values[p.natural]) if p.log else float(values[p.natural])
            out.append(np.full(theta.shape[:-1], v))
        else:
            out.append(theta[..., j])
            j += 1
    assert j == theta.shape[-1] and len(names) == len(out)
    return np.stack(out, axis=-1)
