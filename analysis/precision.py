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
# # Low-precision training and the floating-point quantization law
#
# Sun et al. (2025), "Scaling Laws for Floating-Point Quantization Training", fit
# `L = n/N^alpha + d/D^beta + eps + D^beta/N^alpha log2(B) / (gamma (E+0.5)^delta (M+0.5)^nu)`
# to models trained with fake-quantized matmuls (E exponent bits, M mantissa bits, B elements per
# scale) and find exponent bits slightly more valuable than mantissa bits (`delta > nu`), with a
# best split at a fixed bit count (E2M1 at 4 bits, E4M3 at 8). The sweep `sweeps/precision.yaml`
# trains dense models whose attention and MLP matmuls take weights, activations and gradients in
# one format (`model.precision`, `scaling.models.quant`), beside float32; this notebook fits the
# law, reports the predicted best split per bit count and says whether ours agrees.
#
# B: 4 for the block-scaled variants, `d_model` for per-row scales (activations and gradients
# per token, weights per tensor: the common contraction), 1 for float32 (no penalty).
#
# Parameters (environment): `SCALING_SMOKE=1` (one tiny size and budget, 3 variants: too few cells for the
# 8-parameter law, which the smoke run reports as not determined), `SCALING_ANALYSIS_OUT`
# (default `analysis/out/precision/`), `SCALING_RUNS_DIR` (default `runs/`), `SCALING_JOBS`.

# %%
import copy
import os

import matplotlib.pyplot as plt
import numpy as np
import yaml

import _nb
from scaling import fit, formats
from scaling.fit import laws
from scaling.sweep import spec as spec_mod, store

SMOKE = _nb.smoke()
OUT = _nb.out_dir("precision")
RUNS = _nb.runs_dir("precision", "precision")
JOBS = int(os.environ.get("SCALING_JOBS", "1"))
N_BOOT = 20 if SMOKE else 300
print(f"SMOKE={SMOKE}  runs={RUNS}  out={OUT}")

# %%
raw = yaml.safe_load(spec_mod.resolve_path("precision").read_text())
if SMOKE:
    raw = copy.deepcopy(raw)
    raw["set"].update({"data.batch_size": 8, "data.seq_len": 32, "eval_every": 10000, "checkpoint_every": 10000,
                       "log_every": 5})
    raw["sizes"] = {"params": [3e3]}
    raw["buckets"] = [{"tokens": 8192}]
    raw["variants"] = {k: v for k, v in raw["variants"].items() if k in ("fp32", "e2m1", "e4m3_b4")}
spec, trials = _nb.run_sweep(raw, RUNS, JOBS)
df = _nb.finished(store.load(RUNS))


def bits_of(variant: str, d_model: int) -> tuple[int, int, int]:
    """(E, M, B) of a variant: float32 is e8m23 with no penalty (B = 1)."""
    if variant == "fp32":
        return 8, 23, 1
    name, _, block = variant.partition("_b")
    f = formats.parse(name)
    return f.E, f.M, int(block) if block else int(d_model)


df[["E", "M", "B"]] = [bits_of(v, d) for v, d in zip(df["variant"], df["d_model"])]
base = df[df["variant"] == "fp32"].set_index(["shape", "bucket"])["loss"]
df["gap_vs_fp32"] = [r["loss"] - base.get((r["shape"], r["bucket"]), np.nan) for _, r in df.iterrows()]
print(df.pivot_table(index="variant", columns=["shape", "bucket"], values="gap_vs_fp32").round(4).to_string())
diverged = store.load(RUNS).query("state == 'diverged'")
print(f"diverged: {len(diverged)} {sorted(diverged['variant']) if len(diverged) else ''}")

# %% [markdown]
# ## The law, and the best exponent/mantissa split per bit count

# %%
res = _nb.determined(fit.fp_quant, df[["N", "D", "E", "M", "B", "loss"]], bootstrap=N_BOOT, seed=0)
splits = {}
if res is not None:
    p = res.params
    for k, v in p.items():
        print(f"{k:>6} = {v:.4g}  95% CI [{res.ci[k][0]:.4g}, {res.ci[k][1]:.4g}]")
    for bits in range(4, 9):
        e, m = laws.best_split(bits, p["delta"], p["nu"])
        splits[bits] = f"e{e}m{m}"
    print("best split per bit count:", splits)
    pred = res.predict(N=df["N"].to_numpy(), D=df["D"].to_numpy(), E=df["E"].to_numpy(), M=df["M"].to_numpy(),
                       B=df["B"].to_numpy())
    df["pred"] = np.asarray(pred["loss"])
    print(f"rms log residual {np.sqrt(np.mean(np.square(np.log(df['pred'] / df['loss'])))):.4f}")

# %% [markdown]
# ## Figures: the penalty by format, and the fit

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
ax = axes[0]
q = df[df["variant"] != "fp32"].copy()
q["bits"] = 1 + q["E"] + q["M"]
for (shape, bucket), g in q.groupby(["shape", "bucket"]):
    g = g.sort_values(["bits", "E"])
    ax.scatter(g["bits"] + 0.08 * (g["E"] - 3), g["gap_vs_fp32"], label=f"{shape}, D={bucket:.3g}", s=22)
for _, r in q.iterrows():
    if r["shape"] == q["shape"].iloc[0] and r["bucket"] == q["bucket"].max():
        ax.annotate(r["variant"], (r["bits"] + 0.08 * (r["E"] - 3), r["gap_vs_fp32"]), fontsize=7)
ax.axhline(0, color="grey", lw=0.8)
ax.set_xlabel("bits per value (1 + E + M)")
ax.set_ylabel("final eval loss - float32 (nats)")
ax.set_title("quantization penalty by format")
ax.legend(fontsize=7)
ax = axes[1]
if "pred" in df:
    ax.scatter(df["pred"], df["loss"], c=np.log2(df["B"].clip(lower=1)), cmap="viridis", s=18)
    lo, hi = df[["pred", "loss"]].min().min(), df[["pred", "loss"]].max().max()
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
ax.set_xlabel("fitted law (nats)")
ax.set_ylabel("observed (nats)")
ax.set_title("fp_quant fit (colour: log2 B)")
fig.tight_layout()
_nb.save(fig, OUT, "precision")

# %%
results = {
    "smoke": SMOKE,
    "n_trials": len(trials),
    "n_done": int((store.load(RUNS)["state"] == "done").sum()),
    "n_diverged": int(len(diverged)),
    "law": None if res is None else {"params": res.params, "ci": {k: list(v) for k, v in res.ci.items()}},
    "best_split": splits,
    "cells": df[["variant", "shape", "N", "D", "E", "M", "B", "loss", "gap_vs_fp32"]].to_dict(orient="records"),
    "figures": ["precision.png"],
}
_nb.write_results(OUT, results)

# %% [markdown]
# ## Conclusion (the run of 2026-12-03; numbers in `docs/results/precision/results.md`)
#
# * Every 4-8-bit format cost at most 0.027 nats over float32, below the seed-to-seed std;
#   penalties grow with data. In the one clear cell (d24L1, 1.05e6 tokens) the penalty follows
#   the mantissa and ignores the exponent (M=1: 0.012-0.025, M=2: 0.008-0.010, M=3: 0), and
#   4-element blocks bought nothing over per-token power-of-two scales.
# * The fp_quant law is not determined here (2 sizes x 2 token counts, penalties this small):
#   nu > delta, against the paper's exponent-first finding, but the intervals overlap and the
#   fitted best split (e1mX) runs off the tested range.
