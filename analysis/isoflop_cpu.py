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
# # A CPU-scale IsoFLOP study, and a prediction checked by training
#
# The `isoflop_cpu` sweep trains byte-level dense transformers of 5K-600K non-embedding
# parameters on the embedded corpus (Python standard-library sources) at 13 budgets from 1e11 to
# 1e13 training FLOPs (counted exactly, attention and output head included), with WSD schedules
# branched from shared warmup-stable runs. From its final eval losses we fit
#
# 1. **Approach 1** (envelope of the per-step training curves),
# 2. **Approach 2** (minimum of each IsoFLOP profile, then power laws N_opt ∝ C^a, D_opt ∝ C^b),
# 3. **Approach 3** (the parametric law L(N, D) = E + A/N^α + B/D^β, Huber δ = 10⁻³ on log loss),
#
# and then, **before training it**, predict the loss of the compute-optimal model at 4× the
# largest budget, with a bootstrap interval, write that prediction to disk, train the model
# with `scaling.train.loop.run` and compare.
#
# Parameters (environment): `SCALING_SMOKE=1` (a 2-budget × 3-size toy sweep, 1e10-3e10 FLOPs,
# about a minute), `SCALING_ANALYSIS_OUT` (figures + results; default
# `analysis/out/isoflop_cpu/`), `SCALING_RUNS_DIR` (parent of the sweep directory; default
# `runs/` in the repository, i.e. the same `runs/isoflop_cpu` that `scaling sweep isoflop_cpu`
# writes), `SCALING_JOBS` (local worker processes). Finished trials are loaded, not retrained.

# %%
import copy
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml

import _isoflop
import _nb
from scaling import fit
from scaling.sweep import spec as spec_mod, store

SMOKE = _nb.smoke()
OUT = _nb.out_dir("isoflop_cpu")
RUNS = _nb.runs_dir("isoflop_cpu", "isoflop_cpu")
PRED_DIR = RUNS.parent / "isoflop_cpu_prediction"
JOBS = int(os.environ.get("SCALING_JOBS", "1"))
N_BOOT = 50 if SMOKE else 1000
PREDICT_FACTOR = 4.0  # the held-out budget is this many times the sweep's largest
SEED = 0
print(f"SMOKE={SMOKE}  runs={RUNS}  prediction run={PRED_DIR}  out={OUT}  bootstrap={N_BOOT}")

# %% [markdown]
# ## The sweep
# The shipped spec `sweeps/isoflop_cpu.yaml`; in smoke mode the same spec with two tiny budgets,
# three sizes and short sequences.

# %%
raw = yaml.safe_load(spec_mod.resolve_path("isoflop_cpu").read_text())
if SMOKE:
    raw = copy.deepcopy(raw)
    raw["buckets"] = [1e10, 3e10]
    raw["sizes"] = {"isoflop": {"n": 3, "ratio": 2, "center": {"params": 1e4, "flops": 1e10, "exponent": 0.5}}}
    raw["set"].update({"data.batch_size": 8, "data.seq_len": 64, "eval_every": 100, "checkpoint_every": 1000})
spec, trials = _nb.run_sweep(raw, RUNS, JOBS)

# %%
runs_all = store.load(RUNS)
runs = _nb.finished(runs_all)
steps = store.load_steps(RUNS).rename(columns={"tokens": "D"})
print(f"{len(runs)}/{len(runs_all)} trials done; budgets {sorted(runs['bucket'].unique())}")
print(runs[["bucket", "shape", "N", "D", "C", "loss", "epochs", "role"]].sort_values(["bucket", "N"]).to_string(index=False))

# %% [markdown]
# ## Approach 2: IsoFLOP profiles
# Per budget, a parabola in log N through the final losses (Hoffmann et al.) and, as a check, an
# Akima spline (Porian et al.); minima at the edge of a budget's sizes are left out.

# %%
determined = _nb.determined


iso = determined(fit.isoflop, runs, method="parabola", bootstrap=N_BOOT, seed=SEED, budget_col="bucket")
iso_ak = determined(fit.isoflop, runs, method="akima", bootstrap=N_BOOT, seed=SEED, budget_col="bucket")
FIGURES = []
if iso is not None:
    for w in iso.warnings:
        print("warning:", w)
    FIGURES.append(_isoflop.profiles_figure(iso, OUT))

# %% [markdown]
# ## Approach 3: parametric fit, and approach 1: envelope

# %%
par = fit.chinchilla(runs, bootstrap=N_BOOT, seed=SEED)
print(f"L = {par.params['E']:.4f} + {par.params['A']:.4g}/N^{par.params['alpha']:.4f} + "
      f"{par.params['B']:.4g}/D^{par.params['beta']:.4f}; objective {par.objective:.4g}; "
      f"FLOPs per (param x token) k = {par.flops_per_param_token:.2f}")
for w in par.warnings:
    print("warning:", w)

# The closed-form frontier assumes C = k N D with one k; for models this small the attention and
# output head make FLOPs per token far from proportional to N (k here is a median). The exact
# approach-3 frontier minimises the fitted L(N, D) over the family's real shapes, each with
# D = C / (its exact training FLOPs per token).
base_trial = max(trials, key=lambda t: t.budget)
base_model, seq_len = base_trial.config.model, base_trial.config.data.seq_len
shape_table = _isoflop.shape_table(spec.experiment, base_model, seq_len, runs["N"].min() / 4, runs["N"].max() * 30)


def exact_frontier(C: float) -> pd.DataFrame:
    """Candidate shapes at C FLOPs with their tokens and fitted loss (point estimate), best first."""
    return _isoflop.exact_frontier(par, shape_table, C)


a3x, b3x = _isoflop.exact_exponents(par, shape_table, runs["C"].min(), runs["C"].max())
print(f"approach 3 with exact FLOPs per shape: N_opt ~ C^{a3x:.3f}, D_opt ~ C^{b3x:.3f} over the sweep's budgets "
      f"(closed form with C = {par.flops_per_param_token:.1f} N D: a = {par.a:.3f}, b = {par.b:.3f})")

env = determined(fit.envelope, steps, bootstrap=min(N_BOOT, 200), seed=SEED)

rows = []
if env is not None:
    rows.append({"approach": "1 envelope (train loss)", "a": env.a, "a_ci": env.ci.get("a"), "b": env.b, "b_ci": env.ci.get("b")})
for r, name in ((iso, "2 IsoFLOP parabola"), (iso_ak, "2 IsoFLOP Akima")):
    if r is not None:
        rows.append({"approach": name, "a": r.a, "a_ci": r.ci.get("a"), "b": r.b, "b_ci": r.ci.get("b")})
rows.append({"approach": "3 parametric L(N,D), C = kND", "a": par.a, "a_ci": par.ci.get("a"), "b": par.b, "b_ci": par.ci.get("b")})
rows.append({"approach": "3 parametric L(N,D), exact FLOPs", "a": a3x, "a_ci": None, "b": b3x, "b_ci": None})
approaches = pd.DataFrame(rows)
print(approaches.to_string(index=False))

# %% [markdown]
# ## N_opt(C) and D_opt(C)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
C_line = np.geomspace(runs["C"].min() / 2, runs["C"].max() * PREDICT_FACTOR * 1.5, 100)
for ax, col, unit in ((axes[0], "N_opt", "non-embedding parameters"), (axes[1], "D_opt", "tokens")):
    if iso is not None:
        u = iso.table[iso.table["used"]]
        ax.scatter(u["C"], u[col], color="k", zorder=5, label="IsoFLOP minima (approach 2)")
        p2 = iso.predict(C_line)
        ax.plot(C_line, p2[col], color="C0", label=f"approach 2: {col} ∝ C^{(iso.a if col == 'N_opt' else iso.b):.3f}")
        if np.isfinite(p2[col + "_lo"]).all():
            ax.fill_between(C_line, p2[col + "_lo"], p2[col + "_hi"], color="C0", alpha=0.15, label="approach 2, 95% band")
    exl = pd.DataFrame([exact_frontier(C).iloc[0][["N", "D"]] for C in C_line]).rename(columns={"N": "N_opt", "D": "D_opt"})
    ax.step(C_line, exl[col].astype(float), where="mid", color="C3", ls="--",
            label=f"approach 3, exact FLOPs per shape: slope {(a3x if col == 'N_opt' else b3x):.3f}")
    if env is not None:
        ue = env.table[env.table["used"]]
        ax.plot(ue["C"], ue[col], ".", color="C2", ms=3, alpha=0.6,
                label=f"approach 1 envelope: {col} ∝ C^{(env.a if col == 'N_opt' else env.b):.3f}")
    ax.axvline(runs["C"].max() * PREDICT_FACTOR, color="grey", ls=":", label=f"prediction budget ({PREDICT_FACTOR:g}× largest)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(f"{col} ({unit})")
    ax.legend(fontsize=7)
fig.suptitle("Compute-optimal allocation on the embedded corpus (byte-level, CPU)")
_nb.save(fig, OUT, "nopt_dopt")
FIGURES.append("nopt_dopt.png")

# %% [markdown]
# ## The prediction, made before training
# Budget C* = 4 × the largest bucket. Among the family's shapes near the approach-3 optimum we
# pick the one with the lowest predicted L(N, D) at exactly C* FLOPs (D = C* / its exact training
# FLOPs per token: for models this small the attention and output head make C far from 6ND, so
# the closed-form frontier is only a guide). The prediction is L(N, D) for that shape with the
# 95% bootstrap interval of the parametric fit, and a wider 95% prediction interval that adds
# the fit's residual scatter (run-to-run noise). It is written to `prediction.json` before the
# run starts and never rewritten once the run exists.

# %%
C_star = float(max(b.value for b in spec.buckets)) * PREDICT_FACTOR
pred_file = OUT / "prediction.json"
frontier = par.predict(C=[C_star]).iloc[0]
cand = exact_frontier(C_star).head(12).drop(columns="loss").reset_index(drop=True)
cand = pd.concat([cand, par.predict(N=cand["N"], D=cand["D"])[["loss", "loss_lo", "loss_hi"]]], axis=1)
best = cand.loc[cand["loss"].idxmin()]
print(cand.sort_values("N").to_string(index=False))

# fitted residual scatter (log loss), added in quadrature to the bootstrap spread for a prediction interval
resid = np.log(runs["loss"].to_numpy()) - np.log(par.predict(N=runs["N"], D=runs["D"])["loss"].to_numpy())
sigma = float(np.sqrt(np.mean(resid ** 2)))
half = (np.log(best["loss_hi"]) - np.log(best["loss_lo"])) / 2 / 1.96
s_tot = float(np.sqrt(half ** 2 + sigma ** 2))

prediction = {
    "made_at_unix": time.time(),
    "made_before_training": True,
    "C": C_star,
    "sweep_largest_budget": C_star / PREDICT_FACTOR,
    "frontier": {"N_opt": float(frontier["N_opt"]), "D_opt": float(frontier["D_opt"]), "loss": float(frontier["loss"]),
                 "loss_lo": float(frontier["loss_lo"]), "loss_hi": float(frontier["loss_hi"])},
    "approach2_N_opt": float(iso.predict([C_star])["N_opt"].iloc[0]) if iso is not None else None,
    "shape": best["shape"], "target_params": float(best["target"]), "N": float(best["N"]), "D": float(best["D"]),
    "loss": float(best["loss"]), "loss_lo": float(best["loss_lo"]), "loss_hi": float(best["loss_hi"]),
    "pi_lo": float(best["loss"] * np.exp(-1.96 * s_tot)), "pi_hi": float(best["loss"] * np.exp(1.96 * s_tot)),
    "residual_rms_log": sigma,
    "fit": {"params": par.params, "n_points": par.n_points, "n_boot": par.n_boot},
}
prediction = _nb.register_prediction(OUT, prediction, PRED_DIR)
_nb.write_results(OUT, {"notebook": "isoflop_cpu", "smoke": SMOKE, "prediction": prediction, "stage": "predicted, not yet trained",
                        "figures": []})
print(f"PREDICTION at C = {C_star:.3g} FLOPs: {prediction['shape']} (N = {prediction['N']:.3g}, D = {prediction['D']:.3g} tokens): "
      f"L = {prediction['loss']:.4f} nats, 95% CI [{prediction['loss_lo']:.4f}, {prediction['loss_hi']:.4f}], "
      f"95% PI [{prediction['pi_lo']:.4f}, {prediction['pi_hi']:.4f}]")

# %% [markdown]
# ## Training the predicted model
# The same recipe as the sweep (spec settings, WSD schedule ending at its own budget), one
# independent run of the chosen shape at C*.

# %%
summary = _isoflop.train_predicted(raw, "isoflop_cpu_prediction", prediction, PRED_DIR)

# %%
actual = float(summary["final_eval_loss"])
rel_err = (actual - prediction["loss"]) / prediction["loss"]
in_ci = prediction["loss_lo"] <= actual <= prediction["loss_hi"]
in_pi = prediction["pi_lo"] <= actual <= prediction["pi_hi"]
print(f"predicted {prediction['loss']:.4f} [{prediction['loss_lo']:.4f}, {prediction['loss_hi']:.4f}], actual {actual:.4f}: "
      f"error {100 * rel_err:+.2f}%, inside the 95% CI: {in_ci}, inside the 95% PI: {in_pi}, within 2%: {abs(rel_err) <= 0.02}")

# %% [markdown]
# ## Figure: loss vs compute, the extrapolation and the outcome

# %%
fig, ax = plt.subplots(figsize=(8, 5.2))
sc = ax.scatter(runs["C"], runs["loss"], c=np.log10(runs["N"]), cmap="viridis", s=18, label="sweep runs (final eval loss)")
fig.colorbar(sc, ax=ax, label="log10 N (non-embedding parameters)")
Lx = [exact_frontier(C).iloc[0] for C in C_line]
Lx = par.predict(N=[r["N"] for r in Lx], D=[r["D"] for r in Lx])
ax.plot(C_line, Lx["loss"], color="C3", label=f"approach 3 frontier L*(C), exact FLOPs: L = {par.params['E']:.3f} + "
        f"{par.params['A']:.3g}/N^{par.params['alpha']:.3f} + {par.params['B']:.3g}/D^{par.params['beta']:.3f}")
if np.isfinite(Lx["loss_lo"]).all():
    ax.fill_between(C_line, Lx["loss_lo"], Lx["loss_hi"], color="C3", alpha=0.2, label="95% bootstrap band")
ax.errorbar([C_star], [prediction["loss"]], yerr=[[prediction["loss"] - prediction["pi_lo"]], [prediction["pi_hi"] - prediction["loss"]]],
            fmt="none", color="grey", capsize=6, label="95% prediction interval (with run noise)")
ax.errorbar([C_star], [prediction["loss"]], yerr=[[prediction["loss"] - prediction["loss_lo"]], [prediction["loss_hi"] - prediction["loss"]]],
            fmt="o", color="k", capsize=4, label=f"prediction for {prediction['shape']}: {prediction['loss']:.3f}")
ax.plot([summary["C"]], [actual], "*", color="gold", mec="k", ms=16, label=f"trained: {actual:.3f} ({100 * rel_err:+.1f}%)")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("training compute C (FLOPs, counted)")
ax.set_ylabel("final eval loss (nats/byte)")
_nb.plain_log_ticks(ax)
ax.set_title(f"Extrapolation to {PREDICT_FACTOR:g}× the largest budget (C = {C_star:.2g} FLOPs)")
ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below the axes: the data fill the plot
_nb.save(fig, OUT, "prediction_vs_actual")
FIGURES.append("prediction_vs_actual.png")

# %% [markdown]
# ## Results

# %%
results = {
    "notebook": "isoflop_cpu",
    "smoke": SMOKE,
    "runs_dir": str(RUNS),
    "n_trials": len(runs_all),
    "n_done": len(runs),
    "budgets": sorted(float(b) for b in runs["bucket"].unique()),
    "approaches": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows],
    "isoflop_table": iso.table.to_dict(orient="records") if iso is not None else None,
    "parametric": {"params": par.params, "ci95": par.ci, "objective": par.objective, "a": par.a, "b": par.b,
                   "flops_per_param_token": par.flops_per_param_token, "warnings": par.warnings},
    "prediction": prediction,
    "actual": {"loss": actual, "state": summary["state"], "C": summary["C"], "N": summary["N"], "D": summary["D"],
               "wall_s": summary.get("wall_s"), "epochs": summary.get("epochs")},
    "rel_error": rel_err,
    "inside_95_ci": in_ci,
    "inside_95_pi": in_pi,
    "within_2pct": abs(rel_err) <= 0.02,
    "stage": "trained",
    "figures": FIGURES,
}
print(approaches.to_string(index=False))

# %% [markdown]
# ## After the outcome: is the miss a bias of the recipe?
# Everything in this section was added *after* the trained loss was known; it does not change the
# registered prediction. Two checks of the recipe (approach 3 on all budgets):
# a **backtest** (fit on the budgets up to 1/4 of the largest, predict the largest budget's runs,
# which we have) and the same fit on **windows of the upper budgets only**, each predicting the
# trained model. If the fitted law drifts with the window, one Chinchilla form does not hold
# across the sweep's two decades, and the window should be chosen by backtest before predicting.

# %%
posthoc = {"backtest": [], "windows": []}
largest = float(runs["bucket"].max())
bt_train = runs[runs["bucket"] <= largest / PREDICT_FACTOR]
bt_test = runs[runs["bucket"] == largest]
bt = determined(fit.chinchilla, bt_train) if bt_train["bucket"].nunique() >= 3 else None
if bt is not None:
    q = bt.predict(N=bt_test["N"], D=bt_test["D"])["loss"].to_numpy()
    for (_, r), qi in zip(bt_test.iterrows(), q):
        posthoc["backtest"].append({"shape": r["shape"], "actual": float(r["loss"]), "predicted": float(qi),
                                    "rel_error": float((r["loss"] - qi) / qi)})
    print(f"backtest: fit on C <= {largest / PREDICT_FACTOR:.2g} ({len(bt_train)} runs), predict the {len(bt_test)} runs at {largest:.2g}:")
    print(pd.DataFrame(posthoc["backtest"]).to_string(index=False))
budgets = sorted(runs["bucket"].unique())
for lo in budgets[: max(0, len(budgets) - 3)][::3]:
    sub = runs[runs["bucket"] >= lo]
    q = determined(fit.chinchilla, sub)
    if q is None:
        continue
    val = float(q.predict(N=[prediction["N"]], D=[prediction["D"]])["loss"].iloc[0])
    posthoc["windows"].append({"C_min": float(lo), "n_runs": len(sub), **{k: float(v) for k, v in q.params.items()},
                               "predicted": val, "rel_error": (actual - val) / val})
if posthoc["windows"]:
    print(f"approach 3 on budgets >= C_min, predicting {prediction['shape']} at {C_star:.2g} (actual {actual:.4f}):")
    print(pd.DataFrame(posthoc["windows"]).to_string(index=False))
results["posthoc"] = posthoc
_nb.write_results(OUT, results)

# %% [markdown]
# ## Conclusion
#
# The numbers above (and `results.json`) are what this run measured; the full study is run with
# `SCALING_SMOKE=0` (see `docs/analysis.md`). In smoke mode (two budgets, three sizes) the fits
# are under-determined and the numbers only check that the pipeline runs end to end.
#
# **The full study, run once on 2026-11-29** (65 trials, 13 budgets 1e11-1e13 FLOPs, 5 shapes
# per budget, WSD-branched: 7.1e13 FLOPs of training, 51 minutes with 2 workers on the
# 2-core CPU; the prediction run took 30 minutes):
#
# * The IsoFLOP profiles are convex with interior minima at 12 of 13 budgets (1e11 sits at the
#   smallest shape and is left out). The compute-optimal size grows faster than Chinchilla's
#   a ≈ 0.5 here: approach 2 gives N_opt ∝ C^0.76 (95% CI 0.62-0.80; Akima 0.72), approach 3
#   0.64 (0.53-0.72), approach 1 0.48 (0.33-0.63; it reads the training loss before the WSD
#   cooldown, so it is the least reliable). For models this small the attention and output head
#   make C far from 6ND, so a + b ≠ 1 in approach 2 (0.76 + 0.40).
# * **Pre-registered prediction** (written to `prediction.json` before training, 09:37 UTC): at
#   C* = 4e13 FLOPs, shape d80L3 (N = 231K non-embedding parameters, D = 21.3M tokens),
#   **L = 1.0252 nats/byte**, 95% bootstrap interval [1.0018, 1.0792], 95% prediction interval
#   with run noise [0.9603, 1.0944].
# * **Trained: 1.0599 nats/byte**, +3.4% from the point prediction: inside both 95% intervals,
#   but not within the 2% target.
# * After the outcome (section above, not used for the prediction): the approach-3 fit on all
#   budgets put the irreducible loss E at 0 (its initialisation-grid boundary; the notebook
#   printed that warning before training). Refitting on the upper budgets only moves E to 0.77 and
#   alpha from 0.18 to 0.47, and predicts the trained model within 0.2% (C >= 1e12) or 1.6%
#   (C >= 3.2e12). A backtest of the same recipe (fit on C <= 2.5e12, predict the 1e13 runs) was
#   off by -0.7% to -10%. So one Chinchilla law does not describe the whole two-decade range
#   of these 5K-550K-parameter byte-level models. The lesson for the next pre-registration:
#   choose the fit window by backtest before predicting, rather than fitting every budget.
