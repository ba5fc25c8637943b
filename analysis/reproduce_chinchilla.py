# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Reproducing Chinchilla's Approach 3 (Hoffmann et al. 2022) on Epoch AI's extraction
#
# Epoch AI (Besiroglu et al. 2024, *Chinchilla Scaling: A replication attempt*) recovered 245
# final losses of Chinchilla's training runs from the SVG of the paper's Figure 4 and refitted
# the parametric law
#
# $$L(N, D) = E + \frac{A}{N^\alpha} + \frac{B}{D^\beta}$$
#
# (N parameters, D tokens, L in nats/token). Following them we drop the 5 highest-loss runs
# (240 kept) and minimise the **Huber loss (δ = 10⁻³) of the log-loss residuals, summed**, by
# L-BFGS from the 4,500-point grid of initial values, with `scaling.fit.chinchilla`. A bootstrap
# over runs gives 95% intervals. We compare with Hoffmann et al.'s published values and with
# Epoch's refit, then draw the loss contours in (C, N) with the compute-optimal frontier
# (Chinchilla Fig. 4, left).
#
# Data: `scaling.published` ("chinchilla_epoch" and its published coefficients,
# "chinchilla_epoch_fits"), shipped with the package. Parameters:
# `SCALING_ANALYSIS_OUT` (default `analysis/out/reproduce_chinchilla/`), `SCALING_SMOKE=1`
# (50 bootstrap resamples instead of 1,000).

# %%

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import _nb
from scaling import fit, published

SMOKE = _nb.smoke()
OUT = _nb.out_dir("reproduce_chinchilla")
N_BOOT = 50 if SMOKE else 1000
SEED = 42  # Epoch's bootstrap seed (their resampler differs, so the draws do not match)
DATA = published.path("chinchilla_epoch")  # shipped with the package (provenance: published.provenance)
print(f"SMOKE={SMOKE}  data={DATA}  out={OUT}  bootstrap={N_BOOT}")

# %% [markdown]
# ## Data
# Columns `N_params`, `D_tokens` (= C/6N), `C_flop`, `loss`; `epoch_outlier_excluded` marks the 5
# runs Epoch leaves out.

# %%
raw = pd.read_csv(DATA).rename(columns={"N_params": "N", "D_tokens": "D", "C_flop": "C"})
runs = raw[raw["epoch_outlier_excluded"] == 0].reset_index(drop=True)
outliers = raw[raw["epoch_outlier_excluded"] == 1]
pub = published.load("chinchilla_epoch_fits")
print(f"{len(raw)} runs, {len(runs)} used, {len(outliers)} excluded; "
      f"N {runs.N.min():.3g}..{runs.N.max():.3g} params, C {runs.C.min():.3g}..{runs.C.max():.3g} FLOPs")

# %% [markdown]
# ## Approach 3 fit with bootstrap intervals

# %%
res = fit.chinchilla(runs, bootstrap=N_BOOT, seed=SEED)
NAMES = ["E", "A", "B", "alpha", "beta"]
print(f"objective (summed Huber) = {res.objective:.9g}; {res.n_converged}/{res.n_starts} starts converged; "
      f"{res.n_boot_converged}/{res.n_boot} bootstrap refits converged")
for k in NAMES + ["a", "b"]:
    v = res.params[k] if k in res.params else getattr(res, k)
    lo, hi = res.ci.get(k, (np.nan, np.nan))
    print(f"  {k:>5} = {v:10.4f}   95% CI [{lo:.4f}, {hi:.4f}]")
for w in res.warnings:
    print("warning:", w)

# %% [markdown]
# ## Side by side: ours, Epoch's refit, Hoffmann et al.
# Every parameter set is also scored with the same objective on the same 240 runs: Hoffmann's
# published values fit Epoch's extraction worse than the refit does (the discrepancy Epoch
# reported).

# %%
law = res.law_obj
x = {"N": runs["N"].to_numpy(float), "D": runs["D"].to_numpy(float)}
objective = fit.robust.make_objective(law, x, runs["loss"].to_numpy(float), res.delta)


def theta_of(p: dict) -> np.ndarray:
    """Fitted coordinates (log A, log B, log E, alpha, beta) from natural parameters."""
    return np.array([np.log(p[q.natural]) if q.log else p[q.natural] for q in law.params])


def from_logs(p: dict) -> dict:
    return {"A": np.exp(p["log_A"]), "B": np.exp(p["log_B"]), "E": np.exp(p["log_E"]), "alpha": p["alpha"], "beta": p["beta"]}


hoff = pub["hoffmann2022_chinchilla_approach3"]
epoch = pub["besiroglu2024_epoch_refit"]
sets = {
    "ours (Huber grid, L-BFGS)": dict(res.params),
    "Epoch Huber grid (cell 18)": dict(epoch["huber_grid_LBFGS_best_fit"]),
    "Epoch MLE (headline)": from_logs(epoch["log_space_point_estimate"]),
    "Hoffmann unrounded": from_logs(hoff["unrounded_used_by_epoch"]),
    "Hoffmann published": dict(hoff["published_rounded"]),
}
rows = []
for name, p in sets.items():
    f_val = float(objective(theta_of(p)[None], np.ones(len(runs)))[0][0])
    rows.append({"source": name, **{k: p[k] for k in NAMES}, "a=beta/(alpha+beta)": p["beta"] / (p["alpha"] + p["beta"]),
                 "huber_objective": f_val})
table = pd.DataFrame(rows).set_index("source")
ci_rows = {"ours 95% CI": {k: "[{:.4g}, {:.4g}]".format(*res.ci[k]) for k in NAMES + ["a"] if k in res.ci},
           "Epoch 95% CI": {k: "[{:.4g}, {:.4g}]".format(*epoch["bootstrap_95pct_CI"][k]) for k in NAMES}}
with pd.option_context("display.float_format", "{:.5g}".format, "display.width", 200, "display.max_columns", 20):
    print(table)
    print(pd.DataFrame(ci_rows).T)

# %% [markdown]
# ## Figure: parameter estimates with 95% intervals

# %%
fig, axes = plt.subplots(1, 5, figsize=(16, 3.8), layout="constrained")
ours_ci = res.ci
epoch_ci = epoch["bootstrap_95pct_CI"]
epoch_mle = sets["Epoch MLE (headline)"]
for ax, k in zip(axes, NAMES):
    ax.errorbar([0], [res.params[k]], yerr=[[res.params[k] - ours_ci[k][0]], [ours_ci[k][1] - res.params[k]]],
                fmt="o", color="C0", capsize=4, label=f"ours (Huber, {res.n_boot} bootstraps)")
    ax.errorbar([1], [epoch_mle[k]], yerr=[[epoch_mle[k] - epoch_ci[k][0]], [epoch_ci[k][1] - epoch_mle[k]]],
                fmt="s", color="C1", capsize=4, label="Epoch refit (MLE, 4000 bootstraps)")
    ax.plot([2], [sets["Hoffmann unrounded"][k]], "D", color="C3", label="Hoffmann et al. (unrounded)")
    ax.plot([2], [sets["Hoffmann published"][k]], "x", color="k", ms=8, label="Hoffmann et al. (published, rounded)")
    ax.set_xticks([0, 1, 2], ["ours", "Epoch", "Hoffmann"])
    ax.set_xlim(-0.5, 2.5)
    ax.set_title(k if k in ("E", "A", "B") else f"$\\{k}$")
    if k in ("A", "B"):
        ax.set_yscale("log")
axes[0].set_ylabel("E (nats/token)")
axes[1].set_ylabel("A (nats·params$^\\alpha$)")
axes[2].set_ylabel("B (nats·tokens$^\\beta$)")
axes[3].set_ylabel("$\\alpha$ (exponent of N)")
axes[4].set_ylabel("$\\beta$ (exponent of D)")
handles, labels = axes[0].get_legend_handles_labels()
fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
fig.suptitle(f"L = E + A/N^α + B/D^β on 240 Chinchilla runs: ours E={res.params['E']:.4f}, A={res.params['A']:.0f}, "
             f"B={res.params['B']:.0f}, α={res.params['alpha']:.4f}, β={res.params['beta']:.4f}", fontsize=10)
_nb.save(fig, OUT, "parameters")

# %% [markdown]
# ## Figure: loss contours in (C, N) and the compute-optimal frontier
# Contours of the fitted L(N, D = C/6N); the frontier is N_opt(C) = G (C/6)^a with
# a = β/(α+β), G = (αA/βB)^{1/(α+β)}, with its 95% bootstrap band; dots are the runs,
# coloured by their loss.

# %%
def frontier_N(p: dict, C: np.ndarray, k: float = 6.0) -> np.ndarray:
    """Compute-optimal parameters at C FLOPs for L = E + A/N^alpha + B/D^beta with C = k N D."""
    al, be = p["alpha"], p["beta"]
    G = (al * p["A"] / (be * p["B"])) ** (1.0 / (al + be))
    return G * (C / k) ** (be / (al + be))


C_grid = np.geomspace(1e17, 1e25, 200)
N_grid = np.geomspace(3e7, 3e12, 200)
CC, NN = np.meshgrid(C_grid, N_grid)
P = res.params
LL = P["E"] + P["A"] / NN ** P["alpha"] + P["B"] / (CC / (6 * NN)) ** P["beta"]
pred = res.predict(C=C_grid)

fig, ax = plt.subplots(figsize=(8, 6))
levels = np.round(np.geomspace(1.95, 4.5, 13), 2)
cs = ax.contour(CC, NN, LL, levels=levels, cmap="viridis", linewidths=0.8)
ax.clabel(cs, fontsize=7, fmt="%.2f")
sc = ax.scatter(runs["C"], runs["N"], c=runs["loss"], cmap="viridis", s=14, edgecolor="k", linewidth=0.3,
                vmin=levels[0], vmax=levels[-1], label="runs (Epoch extraction, 240)")
ax.scatter(outliers["C"], outliers["N"], marker="x", color="r", s=25, label="excluded (5 highest loss)")
ax.plot(C_grid, pred["N_opt"], color="C3", lw=2, label=f"frontier, ours: N_opt ∝ C^{res.a:.3f}")
if np.isfinite(pred["N_opt_lo"]).all():
    ax.fill_between(C_grid, pred["N_opt_lo"], pred["N_opt_hi"], color="C3", alpha=0.2, label="ours, 95% bootstrap band")
hp = sets["Hoffmann unrounded"]
ax.plot(C_grid, frontier_N(hp, C_grid), "k--", lw=1.5,
        label=f"frontier, Hoffmann et al. params: N_opt ∝ C^{hp['beta'] / (hp['alpha'] + hp['beta']):.3f}")
ax.plot([5.76e23], [70e9], "*", color="gold", mec="k", ms=16, label="Chinchilla (70B, 5.76e23 FLOPs)")
ax.plot([5.76e23], [280e9], "P", color="w", mec="k", ms=11, label="Gopher (280B, 5.76e23 FLOPs)")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("training compute C (FLOPs)")
ax.set_ylabel("model size N (parameters)")
fig.colorbar(sc, ax=ax, label="final loss (nats/token)")
ax.set_title(f"Approach 3: L = {P['E']:.3f} + {P['A']:.0f}/N^{P['alpha']:.3f} + {P['B']:.0f}/D^{P['beta']:.3f}")
ax.legend(fontsize=7.5, loc="lower right")
_nb.save(fig, OUT, "contours_frontier")

# %% [markdown]
# ## Figure: fit quality
# Observed against fitted loss, and residuals in log loss against compute; the Huber δ = 10⁻³ is
# far inside the scatter, so the fit behaves like a least-absolute-deviation res.

# %%
fitted = law.predict(res.theta, x)
resid = np.log(runs["loss"].to_numpy()) - np.log(fitted)
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
a1.scatter(fitted, runs["loss"], s=10, c=np.log10(runs["N"]), cmap="plasma")
lim = [runs["loss"].min() * 0.98, runs["loss"].max() * 1.02]
a1.plot(lim, lim, "k-", lw=0.8, label="y = x")
a1.set_xlabel("fitted L(N, D) (nats/token)")
a1.set_ylabel("observed final loss (nats/token)")
a1.set_title(f"observed vs fitted, RMS log residual {np.sqrt(np.mean(resid ** 2)):.4f}")
a1.legend()
s = a2.scatter(runs["C"], resid, s=10, c=np.log10(runs["N"]), cmap="plasma")
a2.axhline(0, color="k", lw=0.8)
a2.axhspan(-res.delta, res.delta, color="grey", alpha=0.3, label="Huber δ = 1e-3")
a2.set_xscale("log")
a2.set_xlabel("training compute C (FLOPs)")
a2.set_ylabel("log L_observed − log L_fitted")
a2.legend()
fig.colorbar(s, ax=a2, label="log10 N (parameters)")
fig.tight_layout()
_nb.save(fig, OUT, "fit_quality")

# %% [markdown]
# ## Predictions at Chinchilla's budget

# %%
C_chin = 5.76e23
p_chin = res.predict(C=[C_chin]).iloc[0]
loss_70b = P["E"] + P["A"] / 70e9 ** P["alpha"] + P["B"] / 1.4e12 ** P["beta"]
print(f"at C = {C_chin:.3g} FLOPs: N_opt = {p_chin.N_opt:.3g} [{p_chin.N_opt_lo:.3g}, {p_chin.N_opt_hi:.3g}] params, "
      f"D_opt = {p_chin.D_opt:.3g} tokens, D/N = {p_chin.D_opt / p_chin.N_opt:.1f}, "
      f"L_opt = {p_chin.loss:.4f} [{p_chin.loss_lo:.4f}, {p_chin.loss_hi:.4f}] nats")
print(f"Chinchilla itself (70B params, 1.4T tokens): fitted L = {loss_70b:.4f} nats")

# %% [markdown]
# ## Results

# %%
results = {
    "notebook": "reproduce_chinchilla",
    "smoke": SMOKE,
    "data": str(DATA),
    "n_runs": len(runs),
    "n_excluded": len(outliers),
    "fit": {"params": res.params, "ci95": res.ci, "objective": res.objective, "a": res.a, "b": res.b,
            "delta": res.delta, "n_starts": res.n_starts, "n_converged": res.n_converged,
            "n_boot": res.n_boot, "n_boot_converged": res.n_boot_converged, "warnings": res.warnings},
    "comparison": table.reset_index().to_dict(orient="records"),
    "epoch_bootstrap_ci95": epoch["bootstrap_95pct_CI"],
    "at_chinchilla_budget": {"C": C_chin, **{k: float(p_chin[k]) for k in p_chin.index if k != "C"}},
    "figures": ["parameters.png", "contours_frontier.png", "fit_quality.png"],
}
_nb.write_results(OUT, results)
d = {k: res.params[k] for k in NAMES}
eg = epoch["huber_grid_LBFGS_best_fit"]
print(f"""Conclusion (computed):
- Approach 3 on the {len(runs)} runs: E={d['E']:.4f}, A={d['A']:.1f}, B={d['B']:.0f}, alpha={d['alpha']:.4f}, beta={d['beta']:.4f},
  summed Huber objective {res.objective:.6g}; Epoch's grid fit: E={eg['E']}, A={eg['A']}, B={eg['B']}, alpha={eg['alpha']}, beta={eg['beta']},
  objective {eg['huber_sum']}.
- a = beta/(alpha+beta) = {res.a:.3f} [{res.ci['a'][0]:.3f}, {res.ci['a'][1]:.3f}] (Epoch 0.513 +- 0.020; Hoffmann 0.46).
- Hoffmann's unrounded values score {table.loc['Hoffmann unrounded', 'huber_objective']:.4g} on this objective,
  {table.loc['Hoffmann unrounded', 'huber_objective'] / res.objective:.1f}x the refit.""")

# %% [markdown]
# ## Conclusion
#
# * Our fitter reproduces Epoch's Huber/L-BFGS refit of the 240 runs to the printed digits:
#   E ≈ 1.8172, A ≈ 478, B ≈ 2144, α ≈ 0.3473, β ≈ 0.3672, summed Huber objective 1.01827·10⁻³
#   (Epoch's cell 18: A = 477.84, B = 2143.86, E = 1.8172, α = 0.34731, β = 0.36718).
# * The bootstrap intervals (full run: 1,000 resamples, all converged) cover Epoch's
#   maximum-likelihood estimate and match their 4,000-resample intervals: E [1.767, 1.868]
#   (Epoch [1.769, 1.871]), α [0.317, 0.371] ([0.317, 0.373]), β [0.329, 0.413] ([0.331, 0.415]),
#   A [286, 714] ([285, 744]), B [991, 5468] ([1042, 5810]); a = 0.514 [0.481, 0.556]
#   (Epoch 0.513 ± 0.020). B is the least identified parameter (a factor of ~5 wide).
# * At Chinchilla's budget (5.76e23 FLOPs) the refit puts the optimum at N = 73B [52B, 111B]
#   parameters and 1.3T tokens: Chinchilla itself (70B, 1.4T) is compute-optimal by this law.
# * Hoffmann et al.'s published values (E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28) lie
#   far outside these intervals for E, B and β. On the same objective their unrounded values
#   score ~1.2× the refit and the rounded ones ~4× (the Huber loss with δ = 10⁻³ is nearly an
#   absolute-deviation loss, so the gap is milder than in Epoch's likelihood comparison): Epoch's
#   finding that the published Approach 3 fit does not describe the paper's own runs.
# * The frontier implied by the refit, N_opt ∝ C^a with a ≈ 0.51, agrees with Approaches 1 and 2
#   of the paper (a = 0.50 and 0.49) and puts Chinchilla (70B, 1.4T tokens) on the frontier, whereas
#   Hoffmann's Approach 3 parameters give a ≈ 0.46.
