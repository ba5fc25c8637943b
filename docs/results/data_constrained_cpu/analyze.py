"""The registered check of prediction.md: the data-constrained law (and two alternatives) fitted on
the fresh runs and the repeated runs of 4-16 epochs, scored on the held-out repeated runs of 32
and 64 epochs. Usage: python docs/results/data_constrained_cpu/analyze.py [RUN_DIR] [--figure F]
(RUN_DIR default runs/data_constrained_cpu, as run.sh leaves it). Prints the tables of results.md
and writes results.json beside this file."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from scaling import runs
from scaling.fit import data_constrained, parametric

HERE = Path(__file__).resolve().parent
HELD_OUT_EPOCHS = 24  # runs repeating the data more than this are the ones predicted


def table(run_dir: str) -> pd.DataFrame:
    df = runs.load(run_dir)
    df = df[df["state"] == "done"].copy()
    df["kind"] = np.where(df["unique_tokens"] < 1e6, "repeated", "fresh")
    df["U"] = np.minimum(df["unique_tokens"], df["D"])  # the distinct tokens a run saw (a fresh run: D)
    df["shape"] = [Path(str(t)).name.split("_")[1] for t in df["trial_id"]]
    df["epochs"] = df["D"] / df["U"]
    return df.sort_values(["shape", "kind", "D"]).reset_index(drop=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?", default="runs/data_constrained_cpu")
    ap.add_argument("--figure", default=str(HERE.parents[1] / "figures" / "data_constrained_cpu.png"))
    args = ap.parse_args()
    df = table(args.run_dir)
    held = (df["kind"] == "repeated") & (df["epochs"] > HELD_OUT_EPOCHS)
    fit_df, test = df[~held].reset_index(drop=True), df[held].reset_index(drop=True)
    print(f"{len(df)} runs: {len(fit_df)} fitted, {len(test)} held out (repeated > {HELD_OUT_EPOCHS} epochs)")

    # (a) fresh vs repeated at equal D
    gap = []
    for (shape, D), g in df.groupby(["shape", "D"]):
        k = dict(zip(g["kind"], g["loss"]))
        if "fresh" in k and "repeated" in k:
            gap.append({"shape": shape, "D": float(D), "epochs": float(D / g["U"].min()), "fresh": k["fresh"],
                        "repeated": k["repeated"], "gap_nats": k["repeated"] - k["fresh"]})
    gap = pd.DataFrame(gap)

    with np.errstate(all="ignore"):
        dc = data_constrained.fit(fit_df[["N", "D", "U", "loss"]])
        chin_all = parametric.chinchilla(fit_df[["N", "D", "loss"]])
    base = dc.base
    N, D, U = (test[c].to_numpy(float) for c in ("N", "D", "U"))
    preds = {
        "data_constrained": data_constrained.predict(N, D, U, dc.R_D_star, dc.R_N_star, base),
        "chinchilla_U_ignored": chin_all.predict(N=N, D=D)["loss"].to_numpy(float),
        "base_law_fresh": base["E"] + base["A"] / N ** base["alpha"] + base["B"] / D ** base["beta"],
    }
    rows = []
    for i, r in test.iterrows():
        row = {"shape": r["shape"], "N": float(r["N"]), "D": float(r["D"]), "epochs": float(r["epochs"]),
               "observed": float(r["loss"]), "observed_se": float(r.get("loss_se", math.nan))}
        for k, p in preds.items():
            row[k] = float(p[i])
            row[f"{k}_log_err"] = float(np.log(p[i] / r["loss"]))
        rows.append(row)
    scored = pd.DataFrame(rows)
    summary = {k: {"mean_abs_log_err": float(scored[f"{k}_log_err"].abs().mean()),
                   "max_abs_log_err": float(scored[f"{k}_log_err"].abs().max()),
                   "bias": float(scored[f"{k}_log_err"].mean())} for k in preds}

    pd.set_option("display.width", 200)
    print("\n(a) repeated minus fresh at equal D (nats):")
    print(gap.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\ndata_constrained fit: R_D* = {dc.R_D_star:.4g}, R_N* = {dc.R_N_star:.4g} ({dc.base_from}); "
          f"near-optimal {dc.near_optimal}; identified {dc.identified}")
    for w in dc.warnings:
        print("  warning:", w)
    print("base law:", {k: round(v, 5) for k, v in base.items()})
    print("chinchilla on all fitted runs (U ignored):", {k: round(v, 5) for k, v in chin_all.params.items()})
    print("\n(b, c) held-out runs, ln(predicted / observed):")
    cols = ["shape", "epochs", "observed"] + [f"{k}_log_err" for k in preds]
    print(scored[cols].to_string(index=False, float_format=lambda v: f"{v:+.4f}" if abs(v) < 1 else f"{v:.4f}"))
    for k, s in summary.items():
        print(f"  {k:>22}: mean |ln err| {s['mean_abs_log_err']:.4f}, max {s['max_abs_log_err']:.4f}, bias {s['bias']:+.4f}")

    out = {"runs": df[["trial_id", "shape", "kind", "N", "D", "U", "epochs", "loss", "loss_se"]].to_dict(orient="records"),
           "gap": gap.to_dict(orient="records"), "data_constrained": dc.as_dict(),
           "chinchilla_U_ignored": {"params": chin_all.params, "objective": chin_all.objective},
           "held_out": scored.to_dict(orient="records"), "summary": summary}
    (HERE / "results.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    _figure(df, dc, chin_all, Path(args.figure))


def _figure(df: pd.DataFrame, dc, chin_all, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted(df["shape"].unique(), key=lambda s: int(s[1:]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 4), sharey=True)
    for ax, shape in zip(np.atleast_1d(axes), shapes):
        g = df[df["shape"] == shape]
        N = float(g["N"].iloc[0])
        Ds = np.geomspace(g["D"].min() / 1.3, g["D"].max() * 1.3, 200)
        for kind, color in (("fresh", "C0"), ("repeated", "C3")):
            k = g[g["kind"] == kind]
            held = (kind == "repeated") & (k["epochs"] > HELD_OUT_EPOCHS)
            ax.plot(k["D"][~held], k["loss"][~held], "o", color=color, label=f"{kind} (fitted)")
            if held.any():
                ax.plot(k["D"][held], k["loss"][held], "s", mfc="none", color=color, ms=8, label=f"{kind} (held out)")
        U = float(df.loc[df["kind"] == "repeated", "unique_tokens"].min())
        ax.plot(Ds, data_constrained.predict(N, Ds, np.minimum(Ds, U), dc.R_D_star, dc.R_N_star, dc.base), "-",
                color="C3", lw=1, label=f"data-constrained, U={U:.3g}")
        b = dc.base
        ax.plot(Ds, b["E"] + b["A"] / N ** b["alpha"] + b["B"] / Ds ** b["beta"], "-", color="C0", lw=1,
                label="base law (fresh)")
        ax.plot(Ds, chin_all.predict(N=np.full_like(Ds, N), D=Ds)["loss"], ":", color="k", lw=1,
                label="Chinchilla, U ignored")
        ax.axvline(U, color="0.7", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{shape}L2 (N = {N:.3g})", fontsize=9)
        ax.set_xlabel("training tokens D")
    np.atleast_1d(axes)[0].set_ylabel("held-out loss (nats/byte)")
    np.atleast_1d(axes)[0].legend(fontsize=6.5)
    fig.suptitle("Repeated data on CPU: fitted on fresh runs and repeats up to 16 epochs; squares held out", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
