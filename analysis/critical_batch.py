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
# # The critical batch size (McCandlish et al. 2018; Kaplan et al. 2020)
#
# The `batch_size` sweep trains one model shape at several batch sizes B and learning rates.
# For a target loss L, let S(B) be the fewest optimizer steps any run with batch B needs to reach
# it, and E = B·S the examples (here: tokens) it consumed. McCandlish et al. predict the
# trade-off
#
# $$\left(\frac{S}{S_{min}} - 1\right)\left(\frac{E}{E_{min}} - 1\right) = 1, \qquad
#   S = S_{min}\left(1 + \frac{B_{crit}}{B}\right), \qquad B_{crit} = \frac{E_{min}}{S_{min}},$$
#
# and that B_crit tracks the gradient noise scale B_simple = tr(Σ)/|G|², which the trainer
# estimates every logged step from gradients at two batch sizes (`gns_*` columns). Kaplan et al.
# fit B_crit(L) = B*/L^{1/α_B} across targets. This notebook does all three and puts the noise
# scale on the same axes as B_crit(L).
#
# Parameters (environment): `SCALING_SMOKE=1` (4 batch sizes × 1 LR of a tiny model, about a
# minute), `SCALING_ANALYSIS_OUT` (default `analysis/out/critical_batch/`), `SCALING_RUNS_DIR`
# (parent of the sweep directory, default `runs/`), `SCALING_JOBS`. Batch sizes are reported in
# tokens (sequences × sequence length), as Kaplan et al. do.

# %%
import copy
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml

import _nb
from scaling import fit
from scaling.errors import UsageError
from scaling.sweep import spec as spec_mod, store

SMOKE = _nb.smoke()
OUT = _nb.out_dir("critical_batch")
RUNS = _nb.runs_dir("critical_batch", "batch_size")
JOBS = int(os.environ.get("SCALING_JOBS", "1"))
N_BOOT = 50 if SMOKE else 500
print(f"SMOKE={SMOKE}  runs={RUNS}  out={OUT}")

# %% [markdown]
# ## The sweep
# `sweeps/batch_size.yaml`: one shape, one token budget, six batch sizes, each at three learning
# rates around the √B rule; constant lr after warmup, the held-out loss ~30 times a run.

# %%
raw = yaml.safe_load(spec_mod.resolve_path("batch_size").read_text())
if SMOKE:
    raw = copy.deepcopy(raw)
    raw["buckets"] = [3e9]
    raw["rules"] = {"lr": {"power_law": {"coef": 3e-3, "B": 0.5}, "at": {"B": 256}}}
    raw["variants"] = {f"b{b}": {"set": {"data.batch_size": b, "eval_every": max(2, 32 // b)}} for b in (2, 4, 8, 16)}
    raw["set"].update({"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "data.seq_len": 32,
                       "data.eval_tokens": 1024, "log_every": 2, "checkpoint_every": 10000})
_nb.run_sweep(raw, RUNS, JOBS)

# %%
runs = _nb.finished(store.load(RUNS))
seq_len = int(runs["seq_len"].iloc[0])
steps = store.load_steps(RUNS)
steps = steps[steps["trial_id"].isin(runs["trial_id"])].copy()
steps["B"] = steps["batch"].astype(float) * seq_len  # tokens per step
print(runs[["batch", "lr", "bucket", "steps", "loss", "final_train_loss", "state"]].sort_values(["batch", "lr"]).to_string(index=False))

# %% [markdown]
# ## Steps and examples to reach each target loss
# `fit.tradeoff` on the sweep directory (what `scaling fit runs/batch_size --law bcrit` runs):
# each run's steps to a target are read on its **held-out** curve, interpolated between
# evaluations (the running minimum of the noisy training loss would reach a target early, more
# so at small batches); per batch size the best learning rate counts (Shallue et al.;
# McCandlish et al. tune it per batch size); targets are 5 losses at least 3 batch sizes reach.

# %%
res = fit.tradeoff(RUNS, bootstrap=N_BOOT, seed=0)
targets = np.array(sorted({*res.table["target"], *(u["target"] for u in res.unusable)}, reverse=True))
for w in res.warnings:
    print("warning:", w)
for n in res.notes:
    print("note:", n)
print(res.table.to_string(index=False))
print("B_crit(L):", res.params, res.ci)
reach = fit.steps_to_target(steps, targets, run_col="trial_id")
best = reach.loc[reach.groupby(["target", "B"])["S"].idxmin()]
table = best.assign(E=best["B"] * best["S"])

# %% [markdown]
# ## Figure: held-out curves per batch size

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
cmap = plt.get_cmap("viridis")
Bs = sorted(steps["B"].unique())
ev = steps[steps["eval_loss"].notna()]
final = ev.groupby("trial_id")["eval_loss"].last()
for i, B in enumerate(Bs):
    tid = final[ev.groupby("trial_id")["B"].first() == B].idxmin()
    g = ev[ev["trial_id"] == tid]
    lr = runs.set_index("trial_id").loc[tid, "lr"]
    for ax, x in ((a1, g["step"]), (a2, g["step"] * B)):
        ax.plot(x, g["eval_loss"], color=cmap(i / max(len(Bs) - 1, 1)), lw=1.2, label=f"B = {B:g} tokens (lr {lr:.3g})")
for ax, xl in ((a1, "optimizer steps S"), (a2, "tokens processed E = B·S")):
    for t in targets:
        ax.axhline(t, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _nb.plain_log_ticks(ax)
    ax.set_xlabel(xl)
    ax.set_ylabel("held-out loss (nats/token)")
a1.legend(fontsize=7)
a2.set_title("dotted: target losses", fontsize=9)
fig.suptitle("Best learning rate per batch size")
_nb.save(fig, OUT, "loss_curves")

# %% [markdown]
# ## Figure: the steps-vs-examples trade-off (McCandlish et al. Fig. 7 / Kaplan et al. Fig. 11)

# %%
fig, ax = plt.subplots(figsize=(7.5, 5.2))
tt = res.table
for i, row in enumerate(tt.itertuples()):
    c = plt.get_cmap("plasma")(i / max(len(tt) - 1, 1))
    pts = table[table["target"] == row.target]
    ax.scatter(pts["E"], pts["S"], color=c, s=20, zorder=5)
    Bg = np.geomspace(pts["B"].min() / 4, pts["B"].max() * 4, 100)
    S = row.S_min * (1 + row.B_crit / Bg)
    ax.plot(Bg * S, S, color=c, lw=1.2, label=f"L = {row.target:.3f}: S_min = {row.S_min:.3g}, E_min = {row.E_min:.3g}, B_crit = {row.B_crit:.3g}")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("tokens processed E")
ax.set_ylabel("optimizer steps S")
ax.set_title("(S/S_min − 1)(E/E_min − 1) = 1 per target loss")
ax.legend(fontsize=6.5)
_nb.save(fig, OUT, "tradeoff")

# %% [markdown]
# ## B_crit(L) and the gradient noise scale on the same axes
# The noise scale is computed per run with `fit.noise_scale` (McCandlish et al.'s unbiased
# two-batch estimators of |G|² and tr(Σ), each smoothed before the ratio, the run's own EMA) and
# drawn against the run's held-out loss, interpolated to the steps with statistics.

# %%
gns = []
for tid, g in steps.groupby("trial_id"):
    ev_g = g[g["eval_loss"].notna()].sort_values("step")
    g = g[g[list(fit.batch.GNS_COLS)].notna().all(axis=1)].sort_values("step")  # the statistics rows
    if len(g) > 1 and len(ev_g) > 1:
        ns = fit.noise_scale(g)  # one run: its own EMA
        # the held-out loss, interpolated to the statistics' steps, places each estimate on the
        # same loss axis as the targets and B_crit
        ns["loss"] = np.interp(g["step"].to_numpy(float), ev_g["step"].to_numpy(float), ev_g["eval_loss"].to_numpy(float))
        ns["trial_id"], ns["B"] = tid, g["B"].iloc[0]
        ns["B_simple_tokens"] = ns["B_simple"] * seq_len
        gns.append(ns)
gns = pd.concat(gns, ignore_index=True) if gns else pd.DataFrame()


def bsimple_at(loss: float) -> float:
    """Median over runs of B_simple (tokens) where each run's held-out loss crosses ``loss``."""
    vals = []
    for _, g in gns.groupby("trial_id"):
        g = g[np.isfinite(g["B_simple_tokens"]) & (g["B_simple_tokens"] > 0)]
        if len(g) > 1 and g["loss"].min() <= loss <= g["loss"].max():
            i = int(np.argmax(g["loss"].to_numpy() <= loss))
            vals.append(g["B_simple_tokens"].iloc[i])
    return float(np.median(vals)) if vals else float("nan")


tt = res.table.copy()
tt["B_simple"] = [bsimple_at(t) for t in tt["target"]]
tt["B_simple/B_crit"] = tt["B_simple"] / tt["B_crit"]
print(tt[["target", "B_crit", "B_crit_lo", "B_crit_hi", "B_simple", "B_simple/B_crit", "status"]].to_string(index=False))

fig, ax = plt.subplots(figsize=(7.5, 5.2))
labelled = set()
for tid, g in gns.groupby("trial_id"):  # one line per run, coloured by its batch size
    g = g[np.isfinite(g["B_simple_tokens"]) & (g["B_simple_tokens"] > 0)]
    B = g["B"].iloc[0] if len(g) else None
    if B is None:
        continue
    ax.plot(g["loss"], g["B_simple_tokens"], lw=0.6, alpha=0.5, color=cmap(Bs.index(B) / max(len(Bs) - 1, 1)),
            label=None if B in labelled else f"B_simple, runs at B = {B:g}")
    labelled.add(B)
tf, tu = tt[tt["status"] == "fitted"], tt[tt["status"] != "fitted"]
yerr = np.vstack([tf["B_crit"] - tf["B_crit_lo"], tf["B_crit_hi"] - tf["B_crit"]]).clip(min=0)
ax.errorbar(tf["target"], tf["B_crit"], yerr=yerr if np.isfinite(yerr).all() else None, fmt="o", color="k",
            capsize=3, zorder=5, label="B_crit per target (trade-off fit, 95% CI)")
if len(tu):  # B_crit beyond the batch sizes that reach the target: a lower bound (2x the largest)
    b_max = [table.loc[np.isclose(table["target"], t), "B"].max() * fit.batch.RESOLVED_FACTOR for t in tu["target"]]
    ax.plot(tu["target"], b_max, "^", color="k", mfc="none", ms=8, zorder=5,
            label="B_crit unresolved: above the batch sizes run (lower bound)")
if res.law is not None:
    Lg = np.geomspace(tf["target"].min() * 0.97, tf["target"].max() * 1.03, 100)
    pb = res.predict(Lg)
    ax.plot(Lg, pb["B_crit"], color="C3", label=f"B_crit = {res.params['B_star']:.3g} / L^(1/{res.params['alpha_B']:.3f})")
    if np.isfinite(pb["B_crit_lo"]).all():
        ax.fill_between(Lg, pb["B_crit_lo"], pb["B_crit_hi"], color="C3", alpha=0.15)
# an interval whose lower end collapses to ~0 (B_crit not resolved by the batch sizes run) would
# stretch the axis over many decades: keep the axis on the measured values
vals = np.concatenate([tf["B_crit"].to_numpy(float), gns["B_simple_tokens"].to_numpy(float) if len(gns) else []])
vals = vals[np.isfinite(vals) & (vals > 0)]
if vals.size:
    ax.set_ylim(np.percentile(vals, 2) / 5, np.percentile(vals, 98) * 5)
ax.set_xscale("log")
ax.set_yscale("log")
_nb.plain_log_ticks(ax, "x")
ax.set_xlabel("loss L (nats/token)")
ax.set_ylabel("batch size (tokens)")
ax.set_title("Critical batch size and gradient noise scale vs loss")
ax.legend(fontsize=6.5)
_nb.save(fig, OUT, "bcrit_vs_loss")

# %% [markdown]
# ## B_crit against tokens
# Bergsma et al. 2025 ("Power Lines") find B_crit ∝ D^0.462 and Filatov et al. B_crit growing
# with the data seen rather than the model size. From the trade-off fits, a target is reached at
# B = B_crit after D = 2 E_min tokens (E = E_min (1 + B / B_crit)); the exponent p of
# B_crit ∝ D^p is fitted in log-log space with a 95% bootstrap interval over targets. The
# branched measurement of the next section gives the same exponent a second way.

# %%
tt["D_at_Bcrit"] = 2 * tt["E_min"]
ok = tt[(tt["status"] == "fitted") & np.isfinite(tt["B_crit"]) & (tt["B_crit"] > 0) & (tt["D_at_Bcrit"] > 0)]
bcrit_d = {"p": None, "ci95": None, "n": len(ok)}
if len(ok) >= 3:
    lx, ly = np.log(ok["D_at_Bcrit"].to_numpy(float)), np.log(ok["B_crit"].to_numpy(float))
    p_hat = float(np.polyfit(lx, ly, 1)[0])
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(N_BOOT):
        i = rng.integers(0, len(lx), len(lx))
        if np.ptp(lx[i]) > 0:
            boot.append(np.polyfit(lx[i], ly[i], 1)[0])
    bcrit_d = {"p": p_hat, "ci95": [float(v) for v in np.percentile(boot, [2.5, 97.5])], "n": len(ok)}
print("B_crit ∝ D^p:", bcrit_d, "(Bergsma et al.: p = 0.462)")
ratio = (tt["B_simple"] / tt["B_crit"])[tt["status"] == "fitted"].replace([np.inf, -np.inf], np.nan).dropna()
print(f"B_simple / B_crit (B_noise): median {ratio.median():.3g}, range {ratio.min():.3g} .. {ratio.max():.3g}")

# %% [markdown]
# ## The branched critical batch size over training (Merrill et al. 2025)
# `sweeps/cbs_branch.yaml` (`strategy: cbs_branch`): one constant-lr main run of the same shape
# at 8 sequences per step keeps checkpoints at 64K, 256K, 1M and 2M tokens; from each, branches
# train 256K more tokens at k = 1..32 times the batch with lr × √k. A branch switches batch by
# `data.batch_schedule` exactly at the checkpoint, so it reads the sequences the main run would
# have read next. The CBS at a checkpoint is the largest batch whose held-out loss after the
# branch stays within 1% of the k = 1 branch's (log-interpolated where the excess crosses 1%);
# `fit.branched_cbs` is what `scaling fit runs/cbs_branch --law cbs` runs. Below, the branched
# CBS, the trade-off fits' B_crit and the main run's B_simple share one axis: tokens seen.

# %%
CBS_RUNS = RUNS.parent / "cbs_branch"
raw_c = yaml.safe_load(spec_mod.resolve_path("cbs_branch").read_text())
if SMOKE:
    raw_c = copy.deepcopy(raw_c)
    raw_c["set"].update({"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "data.seq_len": 32,
                         "data.batch_size": 4, "data.eval_tokens": 1024, "optim.warmup_steps": 4,
                         "optim.lr": 3e-3, "eval_every": 8, "log_every": 2})
    raw_c["cbs"] = {"at_tokens": [1024, 2048, 4096], "factors": [1, 2, 4], "delta_tokens": 1024}
    raw_c["buckets"] = [{"tokens": 8192}]
_nb.run_sweep(raw_c, CBS_RUNS, JOBS)
cbs = fit.branched_cbs(CBS_RUNS)
for n in cbs.notes + cbs.warnings:
    print("note:", n)
print(cbs.table[["D", "cbs", "cbs_grid", "status", "reference_loss"]].to_string(index=False))
print("cbs ∝ D^p:", cbs.params, cbs.ci)

# the k = 1 branch is the main run continued: its loss must equal the main run's at that step
runs_c = store.load(CBS_RUNS)
main_c = runs_c[runs_c["role"] == "main"].iloc[0]
main_steps = store.load_steps(CBS_RUNS)
main_eval = main_steps[(main_steps["trial_id"] == main_c["trial_id"]) & main_steps["eval_loss"].notna()]
main_eval_at = dict(zip(main_eval["step"].astype(int), main_eval["eval_loss"]))
k1 = runs_c[(runs_c["role"] == "branch") & (runs_c["cbs_factor"] == 1)]
k1_check = [{"steps": int(r["steps"]), "branch_loss": float(r["loss"]),
             "main_loss": float(main_eval_at[int(r["steps"])]) if int(r["steps"]) in main_eval_at else None}
            for _, r in k1.iterrows()]
print("k=1 branch vs main run:", k1_check)

# B_simple of the main run against the tokens it has seen (window estimate per quarter of the run)
seq_c = int(main_c["seq_len"])
gm = main_steps[main_steps["trial_id"] == main_c["trial_id"]]
bs_main = []
edges = np.quantile(gm["tokens"], [0.0, 0.25, 0.5, 0.75, 1.0])
for lo_q, hi_q in zip(edges[:-1], edges[1:]):
    part = gm[(gm["tokens"] >= lo_q) & (gm["tokens"] <= hi_q)]
    try:
        w = fit.noise_scale_window(part, start=0.0, end=1.0, n_boot=N_BOOT)
    except UsageError:
        continue
    if w.empty:
        continue
    bs_main.append({"D": float(part["tokens"].median()), "B_simple": float(w["B_simple"].iloc[0]) * seq_c,
                    "lo": float(w["B_simple_lo"].iloc[0]) * seq_c, "hi": float(w["B_simple_hi"].iloc[0]) * seq_c})
bs_main = pd.DataFrame(bs_main)
print(bs_main.to_string(index=False))

fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
for i, (_, row) in enumerate(cbs.table.iterrows()):
    ex = [np.nan if e is None else 100 * e for e in row["excess"]]
    a1.plot(row["batches"], ex, "o-", color=cmap(i / max(len(cbs.table) - 1, 1)), label=f"branch at D = {row['D']:.3g}")
    if row["status"] == "resolved":
        a1.axvline(row["cbs"], color=cmap(i / max(len(cbs.table) - 1, 1)), ls=":", lw=0.8)
a1.axhline(100 * cbs.tolerance, color="k", lw=0.8, ls="--", label=f"tolerance {100 * cbs.tolerance:g}%")
a1.set_xscale("log")
a1.set_xticks(cbs.table["batches"].iloc[0], [f"{b:g}" for b in cbs.table["batches"].iloc[0]])
a1.minorticks_off()
a1.set_xlabel("branch batch (tokens per step)")
a1.set_ylabel("held-out loss excess over the smallest batch (%)")
a1.set_title("Loss after the branch vs batch size")
a1.legend(fontsize=7)
res_t = cbs.table[cbs.table["status"] == "resolved"]
lb_t = cbs.table[cbs.table["status"] != "resolved"]
a2.plot(res_t["D"], res_t["cbs"], "s", color="C0", ms=7, label="branched CBS (1% tolerance)")
if len(lb_t):
    a2.plot(lb_t["D"], lb_t["cbs"], "^", color="C0", mfc="none", ms=8, label="branched CBS: lower bound")
if cbs.law is not None:
    Dg = np.geomspace(res_t["D"].min() * 0.8, res_t["D"].max() * 1.25, 50)
    a2.plot(Dg, cbs.predict(Dg)["cbs"], color="C0", lw=1,
            label=f"cbs ∝ D^{cbs.params['p']:.2f} [{cbs.ci['p'][0]:.2f}, {cbs.ci['p'][1]:.2f}]")
tf_d = tt[(tt["status"] == "fitted")]
a2.plot(2 * tf_d["E_min"], tf_d["B_crit"], "o", color="k", label="B_crit (trade-off fits), at D = 2 E_min")
if len(bs_main):
    a2.errorbar(bs_main["D"], bs_main["B_simple"],
                yerr=np.vstack([bs_main["B_simple"] - bs_main["lo"], bs_main["hi"] - bs_main["B_simple"]]).clip(min=0),
                fmt="D", color="C2", capsize=3, label="B_simple of the main run (window, 95% CI)")
a2.set_xscale("log")
a2.set_yscale("log")
a2.set_xlabel("tokens seen D")
a2.set_ylabel("batch size (tokens)")
a2.set_title("Critical batch size against tokens")
a2.legend(fontsize=7)
_nb.save(fig, OUT, "bcrit_vs_tokens")

# %% [markdown]
# ## A batch-size warmup from the measured CBS
# `sweeps/batch_warmup.yaml`: the main run's settings three ways at the same tokens: a constant
# small batch, a warmup whose batch stays below the branched CBS measured at each point
# (`data.batch_schedule`, lr × √(B/B₀) through `optim.batch_lr_exponent`), and a constant large
# batch. Merrill et al. report that such a warmup trains with far fewer steps at no loss.

# %%
WARM_RUNS = RUNS.parent / "batch_warmup"
raw_w = yaml.safe_load(spec_mod.resolve_path("batch_warmup").read_text())
if SMOKE:
    raw_w = copy.deepcopy(raw_w)
    raw_w["set"].update({k: raw_c["set"][k] for k in ("model.d_model", "model.n_layers", "model.n_heads",
                                                       "data.seq_len", "data.batch_size", "data.eval_tokens",
                                                       "optim.warmup_steps", "optim.lr")})
    raw_w["variants"] = {"const4": {"set": {"eval_every": 8}},
                         "warmup": {"set": {"data.batch_schedule": ["2048:8", "4096:16"],
                                            "optim.batch_lr_exponent": 0.5, "eval_every": 4}},
                         "const16": {"set": {"data.batch_size": 16, "optim.lr": 6e-3, "eval_every": 2}}}
    raw_w["buckets"] = [{"tokens": 8192}]
_nb.run_sweep(raw_w, WARM_RUNS, JOBS)
runs_w = store.load(WARM_RUNS).set_index("variant")
steps_w = store.load_steps(WARM_RUNS)
warm = [{"variant": v, "steps": int(r["steps"]), "tokens": float(r["D"]), "loss": float(r["loss"]),
         "wall_s": float(r["wall_s"])} for v, r in runs_w.iterrows()]
ref_v = next(v for v in runs_w.index if v.startswith("const") and runs_w.loc[v, "batch"] == runs_w["batch"].min())
for w in warm:
    w["loss_vs_small_batch"] = w["loss"] / runs_w.loc[ref_v, "loss"] - 1
    w["steps_vs_small_batch"] = w["steps"] / runs_w.loc[ref_v, "steps"] - 1
print(pd.DataFrame(warm).to_string(index=False))
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
for i, (v, r) in enumerate(runs_w.iterrows()):
    g = steps_w[(steps_w["trial_id"] == r["trial_id"]) & steps_w["eval_loss"].notna()]
    a1.plot(g["tokens"], g["eval_loss"], color=f"C{i}", label=f"{v} ({int(r['steps'])} steps)")
    a2.plot(g["step"], g["eval_loss"], color=f"C{i}", label=v)
for ax, xl in ((a1, "tokens"), (a2, "optimizer steps")):
    ax.set_xscale("log")
    ax.set_xlabel(xl)
    ax.set_ylabel("held-out loss (nats)")
    ax.legend(fontsize=7)
a1.set_title("Same tokens: the warmup matches the small batch")
a2.set_title("... in fewer steps")
_nb.save(fig, OUT, "batch_warmup")

# %% [markdown]
# ## Results

# %%
results = {
    "notebook": "critical_batch",
    "smoke": SMOKE,
    "runs_dir": str(RUNS),
    "n_runs": len(runs),
    "batch_sizes_tokens": [float(b) for b in Bs],
    "targets": [float(t) for t in targets],
    "per_target": tt.to_dict(orient="records"),
    "bcrit_law": {"params": res.params, "ci95": {k: list(v) for k, v in res.ci.items()}, "fitted": res.law is not None},
    "unusable_targets": res.unusable,
    "bcrit_vs_tokens": bcrit_d,
    "branched": {"runs_dir": str(CBS_RUNS), "n_runs": int(len(runs_c)), "tolerance": cbs.tolerance,
                 "branch_points": cbs.table.replace({np.nan: None}).to_dict(orient="records"),
                 "law": {"params": cbs.params, "ci95": {k: list(v) for k, v in cbs.ci.items()},
                         "fitted": cbs.law is not None},
                 "k1_equals_main": k1_check, "main_B_simple_vs_tokens": bs_main.to_dict(orient="records")},
    "batch_warmup": {"runs_dir": str(WARM_RUNS), "runs": warm, "reference": ref_v},
    "B_simple_over_B_crit": {"median": float(ratio.median()) if len(ratio) else None,
                             "min": float(ratio.min()) if len(ratio) else None,
                             "max": float(ratio.max()) if len(ratio) else None},
    "warnings": res.warnings,
    "figures": ["loss_curves.png", "tradeoff.png", "bcrit_vs_loss.png", "bcrit_vs_tokens.png",
                "batch_warmup.png"],
}
_nb.write_results(OUT, results)

# %% [markdown]
# ## Conclusion
#
# * For every target loss the (E, S) pairs of the batch sizes lie on a hyperbola
#   (S/S_min − 1)(E/E_min − 1) = 1; its corner gives B_crit, the batch size beyond which more
#   data-parallelism buys few steps. The table above and `results.json` list S_min, E_min and
#   B_crit with bootstrap intervals.
# * B_crit grows as the loss falls, and the power law B_crit = B*/L^{1/α_B} summarises it
#   (Kaplan et al. report α_B ≈ 0.21 for their WebText2 models in tokens; our byte-level
#   corpus and tiny models need not agree).
# * The gradient noise scale measured during training (B_simple, no extra runs needed) lands
#   on the same axes; `B_simple/B_crit` in the table shows how well the cheap estimate predicts
#   the expensive one (McCandlish et al. find them within a small factor).
# * The branched measurement (Merrill et al.) needs no grid of full runs: from one run's
#   checkpoints it finds the largest batch that costs no loss per token over a short stretch.
#   It grows with the tokens seen (`results.json` → `branched.branch_points`), and the trade-off
#   B_crit and the main run's B_simple sit on the same tokens axis for comparison. The k = 1
#   branch is the main run continued; `branched.k1_equals_main` checks it.
# * In smoke mode (one learning rate, four batch sizes, a tiny budget) the numbers only show that
#   the pipeline runs end to end.
