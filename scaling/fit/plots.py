"""Figures in the style of the scaling-law papers (matplotlib, Agg backend; log axes, units).

Each function returns a ``matplotlib.figure.Figure``; pass ``out="file.png"`` to save it.
- ``frontier(runs, fit)``: loss vs compute, runs coloured by size, fitted compute-optimal frontier.
- ``isoflop(result)``: loss vs parameters per budget, with the fitted curves and their minima.
- ``nopt(result)``: N_opt(C) and D_opt(C) with the power-law fit and its 95% band.
- ``bcrit(result)``: critical batch size vs loss with the B_crit(L) law.
- ``moe(runs, by="E"|"G", fit=None)``: loss vs parameters for several expert counts/granularities.
- ``lr(runs)``: loss vs learning rate, one line per width, one panel per variant (the μP
  paper's Figure 1), with each width's best point marked.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _log_ticks(ax) -> None:
    """Labels on a log axis that never collide: at 1, 2 and 5 x 10^k when it spans under three
    decades (matplotlib's default then labels every minor tick, and 3x10^3 runs into 4x10^3),
    at 1 and 3 x 10^k under six, powers of ten beyond; other ticks unlabelled."""
    from matplotlib import ticker

    for axis, lim, scale in ((ax.xaxis, ax.get_xlim(), ax.get_xscale()), (ax.yaxis, ax.get_ylim(), ax.get_yscale())):
        if scale != "log" or not (lim[0] > 0 and lim[1] > 0):
            continue
        base = getattr(axis.get_major_locator(), "_base", 10.0)
        if base != 10.0:
            continue
        decades = abs(np.log10(lim[1] / lim[0]))
        subs = (1.0, 2.0, 5.0) if decades < 3 else (1.0, 3.0) if decades < 6 else (1.0,)
        axis.set_major_locator(ticker.LogLocator(base=10.0, subs=subs, numticks=100))
        axis.set_major_formatter(ticker.FuncFormatter(_power_label))
        axis.set_minor_formatter(ticker.NullFormatter())


def _power_label(v: float, _pos=None) -> str:
    """``c x 10^k`` in mathtext (``10^k`` when c is 1)."""
    if not v > 0:
        return ""
    k = int(np.floor(np.log10(v) + 1e-9))
    c = v / 10.0 ** k
    c_text = f"{c:.0f}" if abs(c - round(c)) < 1e-6 else f"{c:.2g}"
    return f"$10^{{{k}}}$" if c_text == "1" else f"${c_text}\\times10^{{{k}}}$"


def _finish(fig, out):
    for ax in fig.axes:
        _log_ticks(ax)
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=120)
    return fig


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def frontier(runs: pd.DataFrame, fit=None, *, envelope=None, out: str | None = None):
    """Loss (nats) vs training compute (FLOPs), points coloured by N; ``fit`` a Chinchilla
    ``FitResult`` whose compute-optimal frontier L*(C) is drawn with its 95% band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sc = ax.scatter(runs["C"], runs["loss"], c=np.log10(runs["N"]), cmap="viridis", s=14, alpha=0.8)
    fig.colorbar(sc, ax=ax, label="log10 N (parameters)")
    if envelope is not None:
        t = envelope.table
        ax.plot(t["C"], t["loss_opt"], color="0.3", lw=1, ls=":", label="envelope of runs (approach 1)")
    if fit is not None:
        C = np.geomspace(runs["C"].min() / 2, runs["C"].max() * 4, 100)
        p = fit.predict(C=C)
        label = (
            f"fit: E={_fmt(fit.params['E'])} + {_fmt(fit.params['A'])}/N^{fit.params['alpha']:.3f}"
            f" + {_fmt(fit.params['B'])}/D^{fit.params['beta']:.3f}"
        )
        ax.plot(C, p["loss"], color="C3", lw=2, label=label)
        if np.isfinite(p["loss_lo"]).all():
            ax.fill_between(C, p["loss_lo"], p["loss_hi"], color="C3", alpha=0.2, label="95% bootstrap interval")
        ax.set_title(f"Compute-optimal frontier: N_opt ~ C^{fit.a:.3f}, D_opt ~ C^{fit.b:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=7)
    return _finish(fig, out)


def isoflop(result, *, out: str | None = None):
    """IsoFLOP curves: loss vs N for each budget (approach 2 ``FrontierResult``), with the
    fitted parabola / Akima curve and a star at each minimum."""
    from scaling.fit.isoflop import _best_per_size, budget_groups

    plt = _plt()
    df = result.data
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    t = result.table
    labels = result.labels if result.labels is not None else budget_groups(df["C"].to_numpy(float))[0]
    cmap = plt.get_cmap("plasma")
    for k, row in enumerate(t.itertuples()):
        sub = df[labels == k]
        if not len(sub):
            continue
        N, L, _ = _best_per_size(*(sub[c].to_numpy(float) for c in ("N", "loss", "D")))
        color = cmap(k / max(len(t) - 1, 1))
        ax.scatter(N, L, color=color, s=14, label=f"C={row.C:.2g} FLOPs")
        if len(N) >= 3:
            x = np.linspace(np.log(N.min()), np.log(N.max()), 100)
            if result.method == "parabola":
                from scaling.fit.isoflop import _window

                k = _window(np.log(N), L, getattr(result, "window_dex", None))  # the sizes the fit used
                x = np.linspace(np.log(N[k].min()), np.log(N[k].max()), 100)
                ax.plot(np.exp(x), np.polyval(np.polyfit(np.log(N[k]), L[k], 2), x), color=color, lw=1)
            else:
                from scipy.interpolate import Akima1DInterpolator

                ax.plot(np.exp(x), np.exp(Akima1DInterpolator(np.log(N), np.log(L))(x)), color=color, lw=1)
        if row.flag == "" and np.isfinite(row.N_opt):
            ax.scatter([row.N_opt], [row.loss_opt], marker="*", s=120, color=color, edgecolor="k", zorder=5)
    lo, hi = df["loss"].min(), df["loss"].max()
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"IsoFLOP profiles ({result.method}); stars: minima; N_opt ~ C^{result.a:.3f}")
    ax.legend(fontsize=6, ncol=2)
    return _finish(fig, out)


def nopt(result, *, out: str | None = None):
    """N_opt(C) and D_opt(C) on log-log axes with the fitted power laws and 95% bands."""
    plt = _plt()
    t = result.table
    u = t[t["used"]] if "used" in t else t
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0))
    C = np.geomspace(u["C"].min() / 3, u["C"].max() * 10, 100)
    p = result.predict(C)
    for ax, col, exp_, unit in ((axes[0], "N_opt", result.a, "parameters"), (axes[1], "D_opt", result.b, "tokens")):
        ax.scatter(u["C"], u[col], color="k", s=16, zorder=5, label=f"{col} per budget (approach {result.approach})")
        ci = result.ci.get("a" if col == "N_opt" else "b")
        lab = f"fit: {col} ~ C^{exp_:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        ax.plot(C, p[col], color="C0", label=lab)
        if np.isfinite(p[col + "_lo"]).all():
            ax.fill_between(C, p[col + "_lo"], p[col + "_hi"], color="C0", alpha=0.2, label="95% bootstrap interval")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(f"{col} ({unit})")
        ax.legend(fontsize=7)
    fig.suptitle(f"Compute-optimal allocation ({result.method})")
    return _finish(fig, out)


def bcrit(result, *, out: str | None = None):
    """Critical batch size vs target loss (log-log) with ``B_crit = B*/L^(1/alpha_B)``."""
    plt = _plt()
    t = result.table
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    yerr = None
    if "B_crit_lo" in t and np.isfinite(t["B_crit_lo"]).all():
        yerr = np.vstack([t["B_crit"] - t["B_crit_lo"], t["B_crit_hi"] - t["B_crit"]]).clip(min=0)
    ax.errorbar(t["target"], t["B_crit"], yerr=yerr, fmt="o", color="k", label="B_crit per target (S = S_min(1+B_noise/B))")
    if result.law is not None:
        L = np.geomspace(t["target"].min() * 0.9, t["target"].max() * 1.1, 100)
        p = result.predict(L)
        pr = result.params
        ax.plot(L, p["B_crit"], color="C1", label=f"B_crit = {pr['B_star']:.3g} / L^(1/{pr['alpha_B']:.3f})")
        if np.isfinite(p["B_crit_lo"]).all():
            ax.fill_between(L, p["B_crit_lo"], p["B_crit_hi"], color="C1", alpha=0.2, label="95% bootstrap interval")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("target loss L (nats/token)")
    ax.set_ylabel("critical batch size B_crit (batch units of the table)")
    ax.set_title("Critical batch size vs loss")
    ax.legend(fontsize=7)
    return _finish(fig, out)


def moe(runs: pd.DataFrame, *, by: str = "E", fit=None, out: str | None = None):
    """Loss vs parameters N, one line per expert count ``E`` or granularity ``G``; with a Clark or
    Krajewski ``fit`` its curve is drawn for each group."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cmap = plt.get_cmap("viridis")
    groups = sorted(runs[by].unique())
    for i, (v, g) in enumerate((v, runs[runs[by] == v]) for v in groups):
        color = cmap(i / max(len(groups) - 1, 1))
        g = g.sort_values("N")
        ax.scatter(g["N"], g["loss"], color=color, s=16, label=f"{by}={v:g}")
        if fit is not None:
            Ng = np.geomspace(g["N"].min(), g["N"].max(), 50)
            inp = {"N": Ng, by: np.full_like(Ng, v)}
            if "D" in fit.law_obj.inputs:
                # D along the group's own runs (interpolated in log-log)
                inp["D"] = np.exp(np.interp(np.log(Ng), np.log(g["N"]), np.log(g["D"])))
            ax.plot(Ng, fit.predict(**inp)["loss"], color=color, lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss (nats/token)")
    title = f"MoE scaling by {by}"
    if fit is not None:
        title += f": {fit.formula}\n" + ", ".join(f"{k}={_fmt(v)}" for k, v in fit.params.items())
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return _finish(fig, out)


def law1d(runs: pd.DataFrame, fit, *, out: str | None = None):
    """Observed y vs the law's input (log-log) with the fitted curve, for one-input laws
    (saturating / pure power laws); two-input laws are drawn against their first input."""
    plt = _plt()
    law = fit.law_obj
    x, y = law.inputs[0], law.target
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    ax.scatter(runs[x], runs[y], s=14, color="k", label="runs")
    if len(law.inputs) == 1:
        xs = np.geomspace(runs[x].min() / 2, runs[x].max() * 4, 100)
        p = fit.predict(**{x: xs})
        lab = ", ".join(f"{k}={_fmt(v)}" for k, v in fit.params.items())
        ax.plot(xs, p[y], color="C3", label=f"{fit.formula}: {lab}")
        if np.isfinite(p[y + "_lo"]).all():
            ax.fill_between(xs, p[y + "_lo"], p[y + "_hi"], color="C3", alpha=0.2, label="95% bootstrap interval")
    units = {"C": "FLOPs", "N": "parameters", "D": "tokens"}
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{x} ({units.get(x, x)})")
    ax.set_ylabel(f"{y}" + (" (nats/token)" if y == "loss" else ""))
    ax.set_title(fit.formula)
    ax.legend(fontsize=7)
    return _finish(fig, out)


def lr(runs: pd.DataFrame, *, by: str = "d_model", panels: str = "variant", out: str | None = None):
    """Final loss vs peak learning rate (log x), one line per ``by`` value (width), one panel per
    ``panels`` value (e.g. SP and μP); each line's lowest point is ringed. Rows need ``lr``,
    ``loss`` and ``by``; seeds of one point are averaged; a shared y range makes the panels
    comparable."""
    plt = _plt()
    runs = runs[pd.to_numeric(runs["loss"], errors="coerce").notna()]
    group_cols = [c for c in (panels, by, "lr") if c in runs.columns]
    runs = runs.groupby(group_cols, as_index=False, dropna=False)["loss"].mean()  # seeds: their mean
    keys = sorted(runs[panels].dropna().unique(), key=str) if panels in runs.columns else [None]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.0), sharey=True, squeeze=False)
    groups = sorted(runs[by].dropna().unique())
    cmap = plt.get_cmap("viridis")
    for ax, key in zip(axes[0], keys):
        sub = runs if key is None else runs[runs[panels] == key]
        for i, g in enumerate(groups):
            line = sub[sub[by] == g].sort_values("lr")
            if line.empty:
                continue
            color = cmap(i / max(len(groups) - 1, 1))
            ax.plot(line["lr"], line["loss"], marker="o", ms=3, color=color, label=f"{by} {g:g}" if isinstance(g, (int, float, np.number)) else f"{by} {g}")
            best = line.loc[line["loss"].idxmin()]
            ax.scatter([best["lr"]], [best["loss"]], s=90, facecolors="none", edgecolors=color, linewidths=1.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak learning rate")
        ax.set_title(str(key) if key is not None else "")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final held-out loss (nats/token)")
    axes[0][-1].legend(fontsize=7)
    return _finish(fig, out)
