"""Small helpers shared by the analysis notebooks: paths, the smoke switch, figures, results.

The notebooks import this module from their own directory (``python analysis/X.py`` puts
``analysis/`` on ``sys.path``; Jupyter and ``jupytext --execute`` run with it as the cwd).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

import scaling

# The repository root of an editable install (``scaling/`` sits in it).
REPO = Path(scaling.__file__).resolve().parents[1]


def smoke() -> bool:
    """``SCALING_SMOKE=1``: tiny budgets that run in seconds to a minute (used by the tests)."""
    return os.environ.get("SCALING_SMOKE", "0").strip().lower() in ("1", "true", "yes")


def out_dir(notebook: str) -> Path:
    """Where a notebook writes its figures and ``results.json``: ``$SCALING_ANALYSIS_OUT`` or
    ``analysis/out/<notebook>/`` (``<notebook>_smoke/`` in smoke mode)."""
    env = os.environ.get("SCALING_ANALYSIS_OUT")
    # smoke results never overwrite a real study's (e.g. its registered prediction)
    path = Path(env) if env else REPO / "analysis" / "out" / (notebook + ("_smoke" if smoke() else ""))
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir(notebook: str, sweep: str) -> Path:
    """Where a notebook's sweep lives: ``$SCALING_RUNS_DIR/<sweep>`` or ``runs/<sweep>`` under the
    repo (smoke runs go under the output dir so they never mix with a real sweep)."""
    env = os.environ.get("SCALING_RUNS_DIR")
    if env:
        return Path(env) / sweep
    if smoke():
        return out_dir(notebook) / "runs" / sweep
    return REPO / "runs" / sweep


def validation_dir() -> Path:
    """Published-run data: ``$SCALING_VALIDATION_DIR`` or ``../shared/validation`` next to the repo."""
    return Path(os.environ.get("SCALING_VALIDATION_DIR", REPO.parent / "shared" / "validation"))


def save(fig, out: Path, name: str) -> Path:
    """Write ``fig`` as ``<out>/<name>.png``; shown inline under Jupyter, closed otherwise."""
    import matplotlib.pyplot as plt

    path = out / f"{name}.png"
    fig.savefig(path, dpi=130, bbox_inches="tight")
    if "inline" in matplotlib.get_backend():
        plt.show()
    else:
        plt.close(fig)
    print(f"figure: {path}")
    return path


def _clean(x):
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(out: Path, results: dict, name: str = "results.json") -> Path:
    """Atomically write the notebook's key numbers (NaN -> null)."""
    path = out / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(results), indent=2, sort_keys=True))
    os.replace(tmp, path)
    print(f"results: {path}")
    return path


def plain_log_ticks(ax, axis: str = "y") -> None:
    """Plain numbers (2.2, 2.4, ...) instead of 2x10^0 on a log axis spanning less than a decade."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_formatter(ScalarFormatter())
    a.set_minor_locator(LogLocator(subs=(0.2, 0.4, 0.6, 0.8)))
    a.set_minor_formatter(ScalarFormatter())


def finished(trials_df):
    """The ``done`` trials of a sweep table (``store.load``); failures are printed with their
    error, and a sweep with nothing finished stops the notebook (there is nothing to fit)."""
    bad = trials_df[trials_df["state"].isin(["failed", "diverged"])]
    for r in bad.itertuples():
        print(f"trial {r.trial_id}: {r.state}: {r.error}")
    done = trials_df[trials_df["state"] == "done"].reset_index(drop=True)
    if done.empty:
        first = bad["error"].iloc[0] if len(bad) else "no trial ran"
        raise RuntimeError(f"no trial of the sweep finished ({len(bad)} failed/diverged; first error: {first})")
    return done


def register_prediction(out: Path, prediction: dict, run_dir: Path) -> dict:
    """Write ``prediction`` to ``<out>/prediction.json`` unless the run that checks it has
    started (``run_dir/config.json`` exists): then the registered one is kept and returned (a
    prediction is never rewritten after its run exists); a run with no registered prediction
    gets this one flagged ``made_before_training: False``. Refuses a registered prediction for
    another budget ``C``."""
    path = out / "prediction.json"
    started = (run_dir / "config.json").exists()
    if path.exists() and started:
        old = json.loads(path.read_text())
        if not math.isclose(old["C"], prediction["C"], rel_tol=1e-9):
            raise RuntimeError(f"{path} registers a prediction at C={old['C']:.3g}, this study predicts at "
                               f"{prediction['C']:.3g}; move the old prediction and {run_dir} away first")
        print("a prediction for this run was already registered; keeping it")
        return old
    if started:
        prediction = {**prediction, "made_before_training": False}  # honest flag: the run predates it
    write_results(out, prediction, "prediction.json")
    return prediction


def determined(fn, *args, **kw):
    """``fn(*args, **kw)``, or None (with the reason printed) when the data cannot determine the
    fit (a ``UsageError``), e.g. in smoke mode."""
    from scaling.errors import UsageError

    try:
        return fn(*args, **kw)
    except UsageError as err:
        print(f"{getattr(fn, '__name__', fn)}: not determined: {err}")
        return None


def run_sweep(raw: dict, runs: Path, jobs: int = 1):
    """Parse a sweep mapping, write its manifest under ``runs`` and run what is not finished
    (finished trials are kept); prints the outcome. Returns ``(spec, trials)``."""
    import time

    from scaling.sweep import local, spec as spec_mod, store

    spec = spec_mod.parse(raw)
    trials = spec_mod.trials(spec)
    store.write_manifest(runs, spec, trials)
    t0 = time.time()
    counts = local.run_local(runs, trials, jobs=jobs, progress=False)
    print(f"{spec.name}: {len(trials)} trials: {counts}  ({time.time() - t0:.0f} s)")
    return spec, trials
