"""``scaling curves FIT_RUN [FIT_RUN ..] --predict RUN|FILE [..]``: fit a loss-curve law over lr
schedules (``scaling.fit.curves``: multi-power or LR-annealing) on the per-step held-out losses
of runs of one shape, and predict the curve of other schedules: a trained run's logged schedule
(its observed losses are then scored) or a file of per-step learning rates (an unseen schedule,
e.g. to compare decay shapes for a budget before training them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scaling.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("curves", help="fit a loss-curve law (multi-power, LR-annealing) over lr schedules; predict others")
    p.add_argument("fit", nargs="+", help="run directories (one shape; constant and decaying schedules together)")
    p.add_argument("--predict", action="append", default=[], metavar="RUN|FILE",
                   help="a run directory (its logged lr; its losses are scored) or a .csv/.txt/.json file of the "
                        "lr of every step (column 'lr', or one number per line); repeatable")
    p.add_argument("--law", default="multipower", help="multipower (Luo et al. 2025, default) or annealing (Tissue et al. 2024)")
    p.add_argument("--skip", type=int, default=0, metavar="STEPS", help="leave out points at steps <= STEPS (the initial transient)")
    p.add_argument("--loss", default="eval_loss", help="the logged column fitted (default eval_loss, the held-out loss)")
    p.add_argument("--plot", help="write a figure of the fitted and predicted curves to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _schedule_file(path: Path):
    """Per-step lr from a file: JSON list (or {"lr": [...]}), CSV with an ``lr`` column, or one
    number per line."""
    import numpy as np
    import pandas as pd

    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            v = json.loads(text)
            v = v["lr"] if isinstance(v, dict) else v
        elif path.suffix == ".csv":
            df = pd.read_csv(path)
            if "lr" not in df.columns:
                raise UsageError(f"--predict {path}: a CSV schedule needs an 'lr' column (one row per step)")
            v = df["lr"].tolist()
        else:
            v = [float(x) for x in text.split()]
        lr = np.asarray(v, float)
    except UnicodeDecodeError:
        raise UsageError(f"--predict {path}: not UTF-8 text; write the per-step learning rates as text "
                         "(.json list, .csv with an 'lr' column, or one number per line)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--predict {path}: not a list of per-step learning rates ({e})") from None
    if lr.ndim != 1 or len(lr) == 0 or not np.isfinite(lr).all() or (lr < 0).any():
        raise UsageError(f"--predict {path}: a schedule needs a finite lr >= 0 for every step")
    if not (lr > 0).any():
        raise UsageError(f"--predict {path}: every lr is 0, so nothing is trained; give the schedule's learning rates")
    return lr


def _load_run(path: str, loss: str):
    """The curves of a run (or sweep) directory, and each one's ``_shape_of``."""
    from scaling import runs
    from scaling.fit import curves

    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{path}: not a run directory")
    got = curves.curves_from_steps(runs.load_steps(p), loss=loss)
    if not got:
        raise UsageError(f"{path}: no trial with 3 logged values of {loss}")
    dirs = {str(desc.get("trial_id", d.name)): d for d, desc in runs._trial_dirs(p)}
    shapes = {c.name: _shape_of(dirs.get(c.name, p / c.name)) for c in got}
    if len(got) == 1:  # a single run: name it by its directory, not by its trial id
        got = [curves.Curve(p.name, got[0].lr, got[0].steps, got[0].loss)]
        shapes = {p.name: next(iter(shapes.values()))}
    return got, shapes


def _named_apart(loaded: list[tuple[str, list, dict, str]]) -> tuple[dict, dict]:
    """``({(path, role): curves}, {name: shape})`` for ``loaded``'s ``(path, curves, shapes,
    role)``: curves renamed by the path as given where two directories share a name (``a/run``
    and ``b/run``), so fit errors and predictions are never merged. A directory given twice in
    one role (fitted, predicted) is refused; one both fitted and predicted (an in-sample check)
    is one run with one name."""
    from scaling.fit import curves

    seen, first = {}, {}
    for path, got, _, role in loaded:
        real = Path(path).resolve()
        if (real, role) in seen:
            raise UsageError(f"curves: {path} is given twice (as {seen[real, role]} too); {role} each run once")
        seen[real, role] = path
        first.setdefault(real, (path, got))
    names = [c.name for _, got in first.values() for c in got]  # each directory once
    named, shapes = {}, {}
    for path, got, sh, role in loaded:
        where = Path(first[Path(path).resolve()][0])
        named[path, role] = []
        for c in got:
            name = c.name if names.count(c.name) == 1 else (str(where) if len(got) == 1 else f"{where}/{c.name}")
            named[path, role].append(curves.Curve(name, c.lr, c.steps, c.loss))
            shapes[name] = sh[c.name]
    return named, shapes


def _shape_of(run_dir: Path) -> dict:
    """What a curve law holds fixed, from a run's ``config.json``: the ``model`` section and
    ``data.batch_size`` / ``data.seq_len`` ({} when the run records no config)."""
    from scaling.files import read_json
    from scaling.schema import LATE_FIELDS

    cfg = read_json(run_dir / "config.json")
    if not isinstance(cfg, dict):
        return {}
    # a field added after the run was written holds its old value there
    model = {name: old for (section, name), old in LATE_FIELDS.items() if section == "model"}
    model.update(cfg.get("model") or {})
    out = {f"model.{k}": (tuple(v) if isinstance(v, list) else v) for k, v in model.items()}
    data = cfg.get("data") or {}
    out.update({f"data.{k}": data[k] for k in ("batch_size", "seq_len") if k in data})
    out["data.batch_schedule"] = tuple(data.get("batch_schedule") or ())  # a batch warmup is another curve
    return out


def _one_shape(shapes: dict) -> None:
    """A curve law describes one model shape and batch: refuse runs (fitted or predicted) that
    differ in a recorded model field, the batch or the sequence length."""
    known = [(name, sh) for name, sh in shapes.items() if sh]
    for name, sh in known[1:]:
        ref_name, ref = known[0]
        for k in sorted(set(ref) | set(sh)):
            if ref.get(k) != sh.get(k):
                raise UsageError(f"curves: {k} is {ref.get(k)!r} in {ref_name} but {sh.get(k)!r} in {name}; "
                                 "a curve law is fitted on runs of one shape and batch")


def run(args) -> int:
    import numpy as np

    from scaling.fit import curves
    from scaling.fit.cli import _clean

    if args.law not in ("multipower", "annealing"):
        raise UsageError(f"--law: {args.law!r}; choose multipower or annealing")
    if args.skip < 0:
        raise UsageError(f"--skip: {args.skip} steps; use 0 or more")
    run_paths = [s for s in args.predict if Path(s).is_dir()]
    loaded = [(path, *_load_run(path, args.loss), role) for paths, role in ((args.fit, "fit"), (run_paths, "predict"))
              for path in paths]
    by_path, shapes = _named_apart(loaded)
    fitted = [c for path in args.fit for c in by_path[path, "fit"]]
    _one_shape(shapes)
    with np.errstate(all="ignore"):
        r = curves.fit(fitted, warmup_skip=args.skip, law=args.law)
    preds = []
    shown = [(c, "fitted") for c in fitted]
    for spec in args.predict:
        p = Path(spec)
        if p.is_dir():
            for c in by_path[spec, "predict"]:
                final = float(r.predict_curve(c.lr, [len(c.lr)])[0])
                # scored at the last evaluation, which need not be the schedule's last step
                last = int(c.steps[-1])
                at_last = float(r.predict_curve(c.lr, [last])[0])
                keep = c.steps > args.skip
                curve_err = np.log(r.predict_curve(c.lr, c.steps[keep]) / c.loss[keep]) if keep.any() else np.zeros(0)
                preds.append({"name": c.name, "steps": len(c.lr), "predicted": final,
                              "observed_step": last, "predicted_at_observed": at_last, "observed": float(c.loss[-1]),
                              "rel_error": at_last / float(c.loss[-1]) - 1,
                              "curve_rmse_log": float(np.sqrt(np.mean(curve_err ** 2))) if len(curve_err) else None})
                shown.append((c, "predicted"))
        elif p.is_file():
            lr = _schedule_file(p)
            preds.append({"name": spec, "steps": len(lr), "predicted": float(r.predict_curve(lr, [len(lr)])[0])})
            shown.append((curves.Curve(spec, lr, np.zeros(0, int), np.zeros(0)), "predicted"))
        else:
            raise UsageError(f"--predict {spec}: neither a run directory nor a schedule file")
    out = _clean({"law": r.law, "params": r.params, "objective_mse_log": r.objective, "rmse_log": r.rmse_log,
                  "n_points": r.n_points, "skip": args.skip, "fitted_on": [c.name for c in fitted],
                  "predictions": preds, "warnings": r.warnings})
    if args.plot:
        _plot(r, shown, args.skip, Path(args.plot))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{r.law} law fitted on {len(fitted)} curve(s), {r.n_points} points after step {args.skip}: "
              + ", ".join(f"{k}={v:.4g}" for k, v in r.params.items()))
        for name, e in r.rmse_log.items():
            print(f"  fit {name}: RMSE {e:.2%} (log)")
        for d in preds:
            obs = ""
            if d.get("observed") is not None:
                at = "" if d["observed_step"] == d["steps"] else \
                    f" at its last evaluation, step {d['observed_step']}: predicted {d['predicted_at_observed']:.4f},"
                obs = f";{at} observed {d['observed']:.4f} ({d['rel_error']:+.2%})"
            print(f"predict {d['name']} ({d['steps']} steps): final loss {d['predicted']:.4f}{obs}")
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _plot(r, shown, skip: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c, kind in shown:
        # a few hundred log-spaced steps draw the line: predict_curve builds [steps, decrements]
        # arrays, which over every step of a long schedule would take gigabytes
        steps = np.unique(np.geomspace(max(skip, 1) + 1, len(c.lr), 400).round().astype(int))
        (line,) = ax.plot(steps, r.predict_curve(c.lr, steps), lw=1.2, ls="-" if kind == "fitted" else "--",
                          label=f"{c.name} ({kind})")
        if len(c.steps):
            ax.plot(c.steps, c.loss, "o", ms=2.0, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title(f"{r.law} law: lines fitted/predicted, dots observed", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
