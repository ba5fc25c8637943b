"""Multi-power law check (issue 18): fit on two constant-lr runs and one cosine run, predict a
WSD run's and a twice-longer cosine run's final held-out loss. The runs come from
``/tmp/mpl/run.sh`` (see prediction.md); usage::

    python docs/results/multipower/check.py /tmp/mpl
"""

import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaling import runs  # noqa: E402
from scaling.fit import curves  # noqa: E402

FIT = ("const_3e-3", "const_1e-3", "cos_1000")
PREDICT = ("wsd_1000", "cos_2000")
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def main(root: str) -> None:
    root = Path(root)
    loaded = {}
    for name in FIT + PREDICT:
        (c,) = curves.curves_from_steps(runs.load_steps(root / name))
        loaded[name] = c
    t0 = time.perf_counter()
    r = curves.fit([loaded[n] for n in FIT], warmup_skip=50)
    fit_s = time.perf_counter() - t0
    out = {"params": r.params, "objective_mse_log": r.objective, "rmse_log": r.rmse_log, "fit_seconds": fit_s,
           "fitted_on": list(FIT), "predictions": {}}
    # the simpler LR-annealing law (Tissue et al. 2024) on the same curves, for comparison
    ann = curves.fit([loaded[n] for n in FIT], warmup_skip=50, law="annealing")
    out["annealing"] = {"params": ann.params, "objective_mse_log": ann.objective, "predictions": {}}
    for name in PREDICT:
        c = loaded[name]
        pred, obs = float(ann.predict_curve(c.lr, [len(c.lr)])[0]), float(c.loss[c.steps == len(c.lr)][0])
        out["annealing"]["predictions"][name] = {"predicted": pred, "observed": obs, "rel_error": pred / obs - 1}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in loaded.items():
        steps = np.arange(60, len(c.lr) + 1)
        pred = r.predict_curve(c.lr, steps)
        kind = "fitted" if name in FIT else "predicted"
        (line,) = ax.plot(steps, pred, lw=1.2, ls="-" if name in FIT else "--", label=f"{name} ({kind})")
        ax.plot(c.steps, c.loss, "o", ms=2.5, color=line.get_color())
        if name in PREDICT:
            final_pred = float(r.predict_curve(c.lr, [len(c.lr)])[0])
            final_obs = float(c.loss[c.steps == len(c.lr)][0])
            out["predictions"][name] = {"steps": len(c.lr), "predicted": final_pred, "observed": final_obs,
                                        "rel_error": final_pred / final_obs - 1}
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats per byte token)")
    ax.set_title("multi-power law: fit on 2 constant + 1 cosine; WSD and 2x cosine predicted", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(REPO / "docs" / "figures" / "multipower_curves.png", dpi=130)
    (HERE / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mpl")
