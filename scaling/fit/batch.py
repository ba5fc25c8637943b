"""Critical batch size.

(i) ``noise_scale``: the simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` from
    gradient norms logged at two batch sizes, with McCandlish et al. 2018 (appendix A.1) unbiased
    estimators; |G|^2 and tr(Sigma) are smoothed separately over steps before taking the ratio,
    as the paper recommends (the ratio of noisy estimates is biased).
(ii) ``tradeoff``: from a batch-size sweep, the steps S needed to reach each target loss are fitted
    to ``S = S_min (1 + B_noise/B)``, i.e. ``(S/S_min - 1)(E/E_min - 1) = 1`` with E = B S;
    ``B_crit = E_min / S_min = B_noise``.
(iii) ``bcrit_law``: ``B_crit(L) = B* / L^(1/alpha_B)`` across targets (Kaplan et al. 2020, eq. 5.3).

Batch sizes are in whatever unit the table uses (sequences or tokens); results keep that unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scaling.errors import UsageError
from scaling.fit import io, laws
from scaling.fit.parametric import FitResult, fit_law

GNS_COLS = ("gns_b_small", "gns_b_big", "gns_g_small_sq", "gns_g_big_sq")


def two_batch_estimates(b_small, b_big, g_small_sq, g_big_sq) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased per-step estimates of ``|G|^2`` and ``tr(Sigma)`` (McCandlish et al. 2018, A.1).

    ``g_*_sq`` are squared norms of mean gradients over batches of ``b_*`` examples:
    ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``, solved from the two batch sizes.
    """
    bs, bb = np.asarray(b_small, float), np.asarray(b_big, float)
    gs, gb = np.asarray(g_small_sq, float), np.asarray(g_big_sq, float)
    if np.any(bb <= bs):
        raise UsageError("gns_b_big: must be larger than gns_b_small on every row")
    g2 = (bb * gb - bs * gs) / (bb - bs)
    tr = (gs - gb) / (1.0 / bs - 1.0 / bb)
    return g2, tr


def _ema(v: np.ndarray, decay: float) -> np.ndarray:
    """Bias-corrected exponential moving average along the first axis."""
    out = np.empty_like(v, dtype=float)
    acc, w = 0.0, 0.0
    for i, x in enumerate(v):
        acc = decay * acc + (1 - decay) * x
        w = decay * w + (1 - decay)
        out[i] = acc / w
    return out


def noise_scale(data, *, decay: float = 0.95, columns=None, where: str | None = None) -> pd.DataFrame:
    """Per-step ``B_simple`` from logged two-batch statistics (columns ``gns_*``; ``step``, ``loss``).

    Returns columns ``step, loss, g2, trace, B_simple`` (smoothed with an EMA of ``decay``) and
    ``B_simple_raw`` (per-step ratio, noisy). B_simple is in the unit of ``gns_b_*``.
    """
    if not 0 <= decay < 1:
        raise UsageError(f"decay: must be in [0, 1), got {decay}")
    df, _ = io.load_table(data, columns=columns, where=where, steps=True)
    io.require(df, GNS_COLS, what="noise scale", min_points=1, positive=False)
    if "step" in df.columns:
        df = df.sort_values("step")
    g2, tr = two_batch_estimates(*(df[c].to_numpy(float) for c in GNS_COLS))
    g2s, trs = _ema(g2, decay), _ema(tr, decay)
    out = pd.DataFrame({"step": df["step"].to_numpy() if "step" in df else np.arange(len(df))})
    if "loss" in df:
        out["loss"] = df["loss"].to_numpy(float)
    out["g2"], out["trace"] = g2s, trs
    with np.errstate(divide="ignore", invalid="ignore"):
        out["B_simple"] = trs / g2s
        out["B_simple_raw"] = tr / g2
    return out


def steps_to_target(steps, targets, *, run_col: str = "run", columns=None, where: str | None = None) -> pd.DataFrame:
    """From per-step logs of a batch-size sweep (columns ``run``, ``B``, ``step``, ``loss``), the
    first (linearly interpolated) step at which each run reaches each target loss.

    Returns rows ``target, B, S, E`` (E = B * S examples); runs that never reach a target are
    omitted for it.
    """
    df, _ = io.load_table(steps, columns=columns, where=where, steps=True)
    io.require(df, [run_col], what="steps to target", numeric=False)
    io.require(df, ["B", "step", "loss"], what="steps to target", min_points=2, positive=False)
    rows = []
    for _, g in df.groupby(run_col):
        g = g.sort_values("step")
        s, L = g["step"].to_numpy(float), g["loss"].to_numpy(float)
        B = float(g["B"].iloc[0])
        best = np.minimum.accumulate(L)  # loss reached so far
        for t in np.atleast_1d(targets):
            hit = np.flatnonzero(best <= t)
            if hit.size == 0:
                continue
            i = hit[0]
            if i == 0:
                S = s[0]
            else:  # interpolate between the last step above and the first at/below the target
                S = s[i - 1] + (s[i] - s[i - 1]) * (best[i - 1] - t) / max(best[i - 1] - L[i], 1e-300)
            rows.append({"target": float(t), "B": B, "S": float(S), "E": float(B * S)})
    return pd.DataFrame(rows, columns=["target", "B", "S", "E"])


@dataclass
class BcritResult:
    """Per-target trade-off fits and the B_crit(L) law.

    ``table``: one row per target loss with ``S_min`` (steps), ``E_min`` (examples),
    ``B_crit`` (= B_noise, batch units) and 95% intervals where bootstrapped.
    ``law``: the fit ``B_crit = B_star * L^(-1/alpha_B)`` (None with fewer than 3 targets).
    """

    table: pd.DataFrame
    law: FitResult | None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    backtest: dict | None = None

    @property
    def params(self) -> dict[str, float]:
        if self.law is None:
            return {}
        A, k = self.law.params["A"], self.law.params["alpha"]
        return {"B_star": A, "alpha_B": float(1.0 / k) if k != 0 else float("inf")}

    @property
    def ci(self) -> dict:
        if self.law is None or not self.law.ci:
            return {}
        lo, hi = self.law.ci["alpha"]
        inv = sorted([1.0 / lo, 1.0 / hi]) if lo * hi > 0 else [float("nan")] * 2
        return {"B_star": self.law.ci["A"], "alpha_B": tuple(inv)}

    @property
    def objective(self) -> float | None:
        return None if self.law is None else self.law.objective

    def predict(self, loss) -> pd.DataFrame:
        """``B_crit`` at the given loss values (nats), with intervals when bootstrapped."""
        if self.law is None:
            raise UsageError("predict: B_crit(L) needs at least 3 target losses")
        return self.law.predict(loss=loss)

    def to_dict(self) -> dict:
        d = {
            "law": "bcrit",
            "formula": "S = S_min (1 + B_noise/B) per target; B_crit(L) = B_star / L^(1/alpha_B)",
            "params": self.params,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "objective": self.objective,
            "targets": self.table.replace({np.nan: None}).to_dict(orient="records"),
            "warnings": self.warnings,
            "notes": self.notes,
        }
        return io.with_results(d, self)


def tradeoff(table, *, bootstrap: int = 0, seed: int = 0, delta: float = 1e-3, columns=None, where=None) -> BcritResult:
    """Fit ``S = S_min (1 + B_noise/B)`` for each target loss, then ``B_crit(L)``.

    ``table``: rows ``target`` (loss, nats), ``B`` (batch size), ``S`` (steps to reach the target),
    e.g. from ``steps_to_target``; or per-step logs (``run, B, step, loss``), from which targets
    are chosen as 5 losses spanning what every run reaches.
    """
    df, notes = io.load_table(table, columns=columns, where=where)
    if "target" not in df.columns and {"step", "B", "loss"} <= set(df.columns):
        run_col = next((c for c in ("run", "trial", "trial_id", "name") if c in df.columns), None)
        if run_col is None:
            raise UsageError("--law bcrit: per-step logs need a run column (run, trial or trial_id)")
        worst_final = df.groupby(run_col)["loss"].min().max()
        start = df.groupby(run_col)["loss"].max().min()
        targets = np.geomspace(worst_final, start, 7)[:-1][::-1][:5] if start > worst_final else [worst_final]
        notes.append(f"targets chosen from the logs: {', '.join(f'{t:.4g}' for t in targets)}")
        df = steps_to_target(df, targets, run_col=run_col)
    if "target" not in df.columns and "loss" in df.columns:
        df = df.rename(columns={"loss": "target"})
    io.require(df, ["target", "B", "S"], what="--law bcrit", min_points=3)
    rows, warnings = [], []
    law = laws.tradeoff()
    for t, g in df.groupby("target"):
        if g["B"].nunique() < 3:
            warnings.append(f"target {t:.4g}: {g['B'].nunique()} batch size(s); need 3, skipped")
            continue
        r = fit_law(law, g[["B", "S"]].reset_index(drop=True), bootstrap=bootstrap, seed=seed, delta=delta)
        row = {"target": float(t), "n": len(g), "S_min": r.params["S_min"], "B_crit": r.params["B_noise"]}
        row["E_min"] = row["S_min"] * row["B_crit"]
        for k, name in (("S_min", "S_min"), ("B_noise", "B_crit")):
            lo, hi = r.ci.get(k, (np.nan, np.nan))
            row[name + "_lo"], row[name + "_hi"] = lo, hi
        warnings += [f"target {t:.4g}: {w}" for w in r.warnings]
        rows.append(row)
    if not rows:
        raise UsageError("--law bcrit: no target loss has runs at 3 or more batch sizes")
    tab = pd.DataFrame(rows).sort_values("target", ascending=False).reset_index(drop=True)
    fit = None
    if len(tab) >= 3:
        fit = bcrit_law(tab, bootstrap=bootstrap, seed=seed)
    else:
        warnings.append("fewer than 3 targets: B_crit(L) law not fitted")
    return BcritResult(tab, fit, warnings=warnings, notes=notes)


def bcrit_law(table: pd.DataFrame, *, bootstrap: int = 0, seed: int = 0) -> FitResult:
    """``B_crit(L) = B_star * L^(-1/alpha_B)`` from columns ``target`` (loss) and ``B_crit``.

    Fitted as a power law ``B_crit = A * L^-k`` (least squares in log-log, as the Huber delta is
    made large); ``B_star = A``, ``alpha_B = 1/k``.
    """
    t = table.rename(columns={"target": "loss"})[["loss", "B_crit"]].reset_index(drop=True)
    law = laws.powerlaw("loss", "B_crit", name="bcrit")
    law = laws.LSELaw(
        name="bcrit",
        formula="B_crit = B_star / L^(1/alpha_B)",
        inputs=law.inputs,
        target=law.target,
        params=(laws.Param("a", "A", True, (0.0, 10.0, 20.0)), laws.Param("alpha", "alpha", False, (0.0, 2.0, 5.0, 10.0))),
        features=law.features,
    )
    return fit_law(law, t, bootstrap=bootstrap, seed=seed, delta=10.0)


def to_minimum_compute(runs: pd.DataFrame, bcrit: BcritResult) -> pd.DataFrame:
    """Kaplan et al. 2020 eqs. 5.4-5.5: the steps and compute a run would have needed at
    ``B << B_crit`` / ``B >> B_crit``: ``S_min = S / (1 + B_crit(L)/B)``, ``C_min = C / (1 + B/B_crit(L))``.

    ``runs`` needs ``loss`` (nats), ``B`` (same unit as the fit) and ``C`` (FLOPs) and/or ``S``
    (steps). Returns a copy with ``B_crit``, ``C_min``, ``S_min`` added; fit ``L(C_min)`` with
    ``fit.powerlaw(out, x="C_min")``.
    """
    io.require(runs, ["loss", "B"], what="C_min")
    out = runs.copy()
    out["B_crit"] = bcrit.predict(out["loss"].to_numpy(float))["B_crit"].to_numpy()
    if "C" in out:
        out["C_min"] = out["C"] / (1.0 + out["B"] / out["B_crit"])
    if "S" in out:
        out["S_min"] = out["S"] / (1.0 + out["B_crit"] / out["B"])
    return out
