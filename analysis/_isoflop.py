"""Helpers the IsoFLOP notebooks share: running a sweep spec, and the family's real shapes for
the exact-FLOPs approach-3 frontier.

For models this small the attention and output head make training FLOPs per token far from
6 N, so the closed-form Chinchilla frontier (``C = k N D`` with one k) is only a guide; the
exact frontier minimises a fitted ``L(N, D)`` over the shapes the size rule can build, each with
``D = C / (its exact training FLOPs per token)``.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import pandas as pd

import experiments
from scaling import flops
from scaling.sweep import spec as spec_mod
from scaling.train import loop


def train_predicted(raw: dict, name: str, prediction: dict, run_dir) -> dict:
    """Train (or load, when finished) the model a prediction names: one independent run of the
    spec ``raw``'s recipe at ``prediction["C"]`` FLOPs and size ``prediction["target_params"]``,
    refused if the spec resolves another shape than ``prediction["shape"]``; returns its summary."""
    raw_p = copy.deepcopy(raw)
    raw_p.update(name=name, strategy="independent", buckets=[prediction["C"]], sizes=[prediction["target_params"]])
    cfg = dataclasses.replace(spec_mod.trials(spec_mod.parse(raw_p))[0].config, progress=False)
    m = cfg.model
    assert f"d{m.d_model}L{m.n_layers}" == prediction["shape"], "the spec resolved a different shape than predicted"
    t0 = time.time()
    summary = loop.run(cfg, run_dir)
    print(f"trained {prediction['shape']} in {time.time() - t0:.0f} s: state {summary['state']}, final eval loss "
          f"{summary['final_eval_loss']:.4f} (SE {summary.get('final_eval_loss_se', float('nan')):.4f}), "
          f"C = {summary['C']:.3g} FLOPs, D = {summary['D']:.3g} tokens")
    return summary


def profiles_figure(iso, out) -> str:
    """Print approach 2's per-budget table and save its IsoFLOP profiles as
    ``<out>/isoflop_profiles.png``; returns the file name."""
    import _nb
    from scaling import fit

    print(iso.table.to_string(index=False))
    fig = fit.plots.isoflop(iso)
    fig.axes[0].set_xlabel("non-embedding parameters N")
    _nb.save(fig, out, "isoflop_profiles")
    return "isoflop_profiles.png"


def shape_table(experiment: str, base_model, seq_len: int, N_lo: float, N_hi: float, n: int = 400) -> pd.DataFrame:
    """The distinct shapes the experiment's size rule builds for targets ``N_lo..N_hi``:
    ``shape`` (dDlL), ``target`` (the first target giving it), ``N`` (non-embedding
    parameters), ``N_total`` (with embeddings) and ``fpt`` (exact training FLOPs per token)."""
    sizer = experiments.load(experiment).model_for_params
    shapes = {}
    for t in np.geomspace(N_lo, N_hi, n):
        m = sizer(float(t), base_model)
        shapes.setdefault((m.d_model, m.n_layers), (float(t), m))
    rows = []
    for (d, l), (t, m) in shapes.items():
        pc = flops.param_counts(m)
        rows.append({"shape": f"d{d}L{l}", "target": t, "N": pc.active_non_embedding, "N_total": pc.total,
                     "fpt": flops.train_flops_per_token(m, seq_len)})
    return pd.DataFrame(rows)


def exact_frontier(par, shapes: pd.DataFrame, C: float) -> pd.DataFrame:
    """Every shape at ``C`` FLOPs with its tokens ``D`` and the fitted loss of ``par`` (a
    Chinchilla ``FitResult``, point estimate), best first."""
    t = shapes.assign(D=C / shapes["fpt"])
    t["loss"] = par.law_obj.predict(par.theta, {"N": t["N"].to_numpy(float), "D": t["D"].to_numpy(float)})
    return t.sort_values("loss").reset_index(drop=True)


def exact_exponents(par, shapes: pd.DataFrame, C_lo: float, C_hi: float) -> tuple[float, float]:
    """Slopes of log N_opt and log D_opt against log C along the exact frontier, 25 budgets
    from ``C_lo`` to ``C_hi`` FLOPs."""
    C = np.geomspace(C_lo, C_hi, 25)
    best = pd.DataFrame([exact_frontier(par, shapes, c).iloc[0][["N", "D"]] for c in C])
    a = float(np.polyfit(np.log(C), np.log(best["N"].astype(float)), 1)[0])
    b = float(np.polyfit(np.log(C), np.log(best["D"].astype(float)), 1)[0])
    return a, b
