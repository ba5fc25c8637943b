"""``scaling fit`` and ``scaling plot``.

    scaling fit TABLE_OR_SWEEP --law chinchilla|powerlaw|isoflop|kaplan|bcrit|clark|krajewski|upcycling
        [--bootstrap N] [--holdout-largest K] [--json] [--plot out.png]
        [--columns N=N_params,D=D_tokens] [--where "epoch_outlier_excluded == 0"]
    scaling plot SWEEP_OR_TABLE --figure isoflop|frontier|nopt|bcrit|moe --out FILE.png

Bad input raises ``UsageError`` (exit 2) naming the problem.

Over 400 lines: one argument parser per command plus the glue from flags to the fitters; the
fitting itself lives in one module per law.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

import numpy as np

from scaling.errors import UsageError

LAWS = ("chinchilla", "powerlaw", "isoflop", "kaplan", "bcrit", "cbs", "clark", "krajewski", "data_constrained", "upcycling", "fp_quant")
FIGURES = ("isoflop", "frontier", "nopt", "bcrit", "moe", "lr")


def _noise(text: str):
    """``--seed-noise``: a relative noise (float) or ``measured`` (each run's own)."""
    if text == "measured":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'measured', got {text!r}") from None


def _common(p) -> None:
    p.add_argument("input", help="CSV/JSONL table or sweep directory")
    p.add_argument("--columns", help="renames CANONICAL=SOURCE, e.g. N=N_params,D=D_tokens,C=C_flop")
    p.add_argument("--where", help='rows to keep: column comparisons joined by and/or/not, e.g. "epoch_outlier_excluded == 0 and N > 1e8"')
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap resamples for 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=("parabola", "akima", "envelope", "varpro"), default="parabola",
                   help="--law isoflop: per-budget minimum by parabola or Akima spline (approach 2), or the "
                   "envelope of per-step loss curves (approach 1; needs per-step logs: a sweep dir or run,C,N,loss rows)")
    p.add_argument("--budget-column", dest="budget_col", help="column naming each run's compute budget (IsoFLOP)")
    p.add_argument("--x", default="C", help="input variable of --law powerlaw: C (FLOPs), N or D")
    p.add_argument("--targets", default=None, metavar="L[,L..]",
                   help="--law bcrit: target losses (nats) to measure steps at (default: 5 every batch size reaches)")
    p.add_argument("--tolerance", type=float, default=None, metavar="EPS",
                   help="--law cbs: relative loss excess over the smallest batch still within the critical batch (default 0.01)")
    p.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log residuals (default 1e-3)")
    p.add_argument("--allow-mixed-schema", dest="allow_mixed_schema", action="store_true",
                   help="fit runs written under different schema versions together (refused by default)")
    p.add_argument("--allow-mixed-corpus", dest="allow_mixed_corpus", action="store_true",
                   help="fit runs trained on different texts (text_sha256) together (refused by default)")
    p.add_argument("--best-per", dest="best_per", metavar="KEYS", default=None,
                   help="keep the best-tuned run of each group, e.g. N,C (an LR grid per size, as Porian et al.; "
                        "seeds of one configuration are averaged)")
    p.add_argument("--allow-noncausal", dest="allow_noncausal", action="store_true",
                   help="keep runs whose loss looks at later tokens (expert-choice MoE); left out by default")
    p.add_argument("--seed-noise", dest="seed_noise", type=_noise, default=0.0,
                   help="bootstrap by perturbing each loss by this relative seed noise (e.g. 0.005), or by each run's "
                   "measured noise ('measured': loss_seed_std or loss_se), instead of resampling runs")


def register(sub) -> None:
    p = sub.add_parser("fit", help="fit a scaling law to runs (table or sweep directory)")
    _common(p)
    p.add_argument("--law", required=True, choices=LAWS)
    p.add_argument("--e-bounds", dest="e_bounds", default=None, metavar="LO,HI",
                   help="--law chinchilla --method varpro: a prior range on the asymptote E (nats), e.g. 1.5,2.0")
    p.add_argument("--pin", action="append", default=[], metavar="PARAM=VALUE",
                   help="hold a parameter fixed instead of fitting it, e.g. --pin E=1.69 (an asymptote the runs cannot identify)")
    p.add_argument("--holdout-largest", dest="holdout", type=int, default=None, metavar="K", help="backtest: refit without the largest K (>= 1) budgets and score them")
    p.add_argument("--window-dex", dest="window_dex", type=float, default=None, metavar="W",
                   help="--law isoflop --method parabola: fit each budget's parabola to the sizes within W decades of its "
                        "best run (default 0.5; 'inf' for every size)")
    p.add_argument("--predict", action="append", default=[], metavar="COL=V[,V..]", help="e.g. C=1e21,1e22 or N=1e9 --predict D=2e10")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PNG", help="save the matching figure")
    p.set_defaults(func=run_fit)

    q = sub.add_parser("plot", help="scaling-law figures from runs")
    _common(q)
    q.add_argument("--figure", required=True, choices=FIGURES)
    q.add_argument("--out", required=True, metavar="PNG")
    q.add_argument("--by", default=None, help="MoE figure: group by E (experts) or G (granularity); lr figure: one line per this column (default d_model)")
    q.add_argument("--law", default=None, choices=("clark", "krajewski", "chinchilla"), help="law drawn on the figure")
    q.set_defaults(func=run_plot)


def _predict_inputs(specs: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise UsageError(f"--predict: expected COL=V[,V..], got {spec!r}")
        k, v = spec.split("=", 1)
        try:
            out[k.strip()] = np.array([float(x) for x in v.split(",") if x.strip()])
        except ValueError:
            raise UsageError(f"--predict: values of {k} must be numbers, got {v!r}")
    return out


def _e_bounds(text) -> tuple[float, float]:
    if text is None:
        return (0.0, float("inf"))
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"--e-bounds {text}: expected LO,HI in nats, e.g. 1.5,2.0") from None
    if not (0 <= lo <= hi):
        raise UsageError(f"--e-bounds {text}: need 0 <= LO <= HI")
    return lo, hi


def _targets(spec):
    """``--targets 2.1,2.0``: target losses (nats), or None."""
    if spec is None:
        return None
    try:
        out = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--targets: {spec!r} is not a list of losses (nats), e.g. --targets 2.2,2.0,1.9") from None
    if not out or not all(0 < v < float("inf") for v in out):
        raise UsageError(f"--targets: losses must be positive numbers, got {spec!r}")
    return out


def _pins(items) -> dict[str, float]:
    """``["E=1.69"]`` -> ``{"E": 1.69}`` (UsageError naming the bad item)."""
    out = {}
    for item in items:
        k, sep, v = str(item).partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise UsageError(f"--pin {item}: expected PARAM=NUMBER, e.g. --pin E=1.69") from None
        if not sep or not k.strip():
            raise UsageError(f"--pin {item}: expected PARAM=NUMBER, e.g. --pin E=1.69")
    return out


def _window(args):
    """``--window-dex`` as ``isoflop(window_dex=...)``: the default, a width, or None (every size)."""
    from scaling.fit.isoflop import WINDOW_DEX

    w = getattr(args, "window_dex", None)
    if w is None:
        return WINDOW_DEX
    if not (w > 0):
        raise UsageError(f"--window-dex: must be a positive number of decades (or inf), got {w}")
    return None if np.isinf(w) else w


def _fit(args):
    from scaling.fit import batch, extrapolate, parametric
    from scaling.fit.isoflop import isoflop as fit_isoflop

    kw = dict(columns=args.columns, where=args.where)
    if getattr(args, "pin", None) and args.law in ("isoflop", "bcrit"):
        raise UsageError(f"--pin: --law {args.law} has no parameters to pin; use it with a parametric law (chinchilla, powerlaw, ...)")
    if args.method == "varpro" and args.law != "chinchilla":
        raise UsageError("--method varpro: variable projection is for --law chinchilla")
    if getattr(args, "tolerance", None) is not None and args.law != "cbs":
        raise UsageError(f"--tolerance: the loss tolerance is for --law cbs, not --law {args.law}")
    if args.law == "cbs" and (args.bootstrap or args.holdout is not None or getattr(args, "pin", None)):
        raise UsageError("--law cbs: reports a t-interval on the exponent p; --bootstrap, --holdout-largest and --pin "
                         "do not apply")
    if getattr(args, "targets", None) is not None and args.law != "bcrit":
        raise UsageError(f"--targets: target losses are for --law bcrit, not --law {args.law}")
    if args.e_bounds is not None and args.method != "varpro":
        raise UsageError("--e-bounds: needs --law chinchilla --method varpro (or pin E with --pin E=VALUE)")
    if args.method == "varpro" and args.holdout is not None:
        raise UsageError("--holdout-largest: the backtest refits with the Huber fitter; it is not wired to --method varpro")
    if getattr(args, "pin", None) and args.holdout is not None:
        raise UsageError("--holdout-largest: the backtest does not carry --pin yet; drop one of them")
    if args.budget_col:
        from scaling.fit.isoflop import _renamed

        args.budget_col = _renamed(args.budget_col, args.columns)  # renames apply first, for the fit and the backtest
    if args.law == "chinchilla" and args.method == "varpro":
        from scaling.fit.varpro import chinchilla_varpro

        bounds = _e_bounds(args.e_bounds)
        pins = _pins(getattr(args, "pin", []))
        if set(pins) - {"E"}:
            raise UsageError("--pin: with --method varpro only E can be pinned (the linear part is solved exactly)")
        if "E" in pins:
            if args.e_bounds is not None:
                raise UsageError("--pin E and --e-bounds: give one of them")
            bounds = (pins["E"], pins["E"])
        res = chinchilla_varpro(args.input, E_bounds=bounds, bootstrap=args.bootstrap, seed=args.seed, **kw)
    elif args.law == "isoflop" and args.method == "envelope":
        from scaling.fit.isoflop import envelope

        res = envelope(args.input, bootstrap=args.bootstrap, seed=args.seed, **kw)
    elif args.law == "isoflop":
        res = fit_isoflop(args.input, method=args.method, bootstrap=args.bootstrap, seed=args.seed, budget_col=args.budget_col,
                          seed_noise=args.seed_noise, window_dex=_window(args), **kw)
    elif args.law == "cbs":
        tol = batch.CBS_TOLERANCE if args.tolerance is None else args.tolerance
        res = batch.branched_cbs(args.input, tolerance=tol, **kw)
    elif args.law == "bcrit":
        res = batch.tradeoff(args.input, targets=_targets(args.targets), bootstrap=args.bootstrap, seed=args.seed, **kw)
    elif args.law == "data_constrained":
        from scaling.fit import data_constrained

        if args.bootstrap or args.holdout is not None or args.plot:
            raise UsageError("--law data_constrained: reports its flat direction and near-optimal ranges instead of "
                             "--bootstrap; --holdout-largest and --plot are not wired to it")
        res = data_constrained.fit(args.input, base=_pins(getattr(args, "pin", [])) or None, delta=args.delta, **kw)
    else:
        fitters = {
            "chinchilla": parametric.chinchilla,
            "powerlaw": lambda d, **k: parametric.saturating(d, x=args.x, **k),
            "kaplan": parametric.kaplan,
            "clark": parametric.clark,
            "krajewski": parametric.krajewski,
            "upcycling": parametric.upcycling,
            "fp_quant": parametric.fp_quant,
        }
        pin = _pins(getattr(args, "pin", []))
        res = fitters[args.law](args.input, bootstrap=args.bootstrap, seed=args.seed, delta=args.delta, seed_noise=args.seed_noise,
                                **kw, **({"pin": pin} if pin else {}))
    if args.predict:
        inp = _predict_inputs(args.predict)
        if args.law == "isoflop":
            if set(inp) != {"C"}:
                raise UsageError("--predict: an IsoFLOP fit predicts from C only (C=1e21,...)")
            table = res.predict(inp["C"])
        elif args.law == "cbs":
            if set(inp) != {"D"}:
                raise UsageError("--predict: a cbs fit predicts from D only (D=1e9,...)")
            table = res.predict(inp["D"])
        elif args.law == "bcrit":
            if set(inp) != {"loss"}:
                raise UsageError("--predict: a B_crit fit predicts from loss only (loss=2.5,...)")
            table = res.predict(inp["loss"])
        else:
            table = res.predict(**inp)
        res.predictions = table.replace({np.nan: None}).to_dict(orient="records")
    if args.holdout is not None:
        if args.holdout < 1:
            raise UsageError(f"--holdout-largest: must be >= 1 budgets to hold out, got {args.holdout} (omit it for no backtest)")
        if args.law == "bcrit":
            raise UsageError("--holdout-largest: not available for --law bcrit")
        fkw = {"method": args.method} if args.law == "isoflop" else {"delta": args.delta}
        if args.law == "isoflop" and args.method == "envelope":
            raise UsageError("--holdout-largest: not available with --method envelope")
        if args.law == "powerlaw":
            raise UsageError("--holdout-largest: use --law chinchilla or isoflop (powerlaw backtest is not wired to --x)")
        res.backtest = extrapolate.backtest(args.input, args.law, args.holdout, budget_col=args.budget_col, **kw, **fkw)
    return res


def _clean(o):
    """JSON-safe: numpy scalars -> Python, NaN/inf -> null."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, float)):
        v = float(o)
        return v if math.isfinite(v) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def _print_table(d: dict) -> None:
    print(f"law: {d.get('law')}" + (f"   {d['formula']}" if d.get("formula") else ""))
    ci = d.get("ci", {})
    print(f"{'param':>10} {'value':>14} {'95% CI':>30}")
    for k, v in d.get("params", {}).items():
        c = ci.get(k)
        cs = f"[{c[0]:.6g}, {c[1]:.6g}]" if c and None not in c else "-"
        print(f"{k:>10} {v:>14.6g} {cs:>30}")
    if d.get("objective") is not None:
        how = (f"  (Huber delta {d['delta']:g}, summed on log residuals)" if d.get("delta") is not None
               else "  (least squares on relative residuals)" if "variable projection" in str(d.get("formula")) else "")
        print(f"objective: {d['objective']:.6g}" + how)
    if "n_starts" in d:
        print(f"starts: {d['n_starts']} ({d['n_converged']} converged); best start converged: {d['converged']}; points: {d['n_points']}")
    if d.get("n_boot"):
        print(f"bootstrap: {d['n_boot']} resamples")
    if d.get("a") is not None and "a" not in d.get("params", {}):
        a_ci, b_ci = ci.get("a"), ci.get("b")
        print(f"compute-optimal: N_opt ~ C^a, a = {d['a']:.4f}" + (f" [{a_ci[0]:.4f}, {a_ci[1]:.4f}]" if a_ci else ""))
        print(f"                 D_opt ~ C^b, b = {d['b']:.4f}" + (f" [{b_ci[0]:.4f}, {b_ci[1]:.4f}]" if b_ci else ""))
    for t in d.get("targets", []):
        ci_b = f" [{t['B_crit_lo']:.4g}, {t['B_crit_hi']:.4g}]" if t.get("B_crit_lo") is not None else ""
        flag = "" if t.get("status", "fitted") == "fitted" else f"  ({t['status']})"
        print(f"  target L={t['target']:.4g}: S_min={t['S_min']:.4g} steps, E_min={t['E_min']:.4g}, "
              f"B_crit={t['B_crit']:.4g}{ci_b}{flag}")
    for t in d.get("branch_points", []):
        left = set(t.get("unfinished") or [])
        ex = ", ".join(f"{b:g}:" + ("not finished" if b in left else "diverged" if e is None else f"{e:+.2%}")
                       for b, e in zip(t["batches"], t["excess"]))
        cbs = f"{t['cbs']:.4g} tokens (grid {t['cbs_grid']:.4g}; " if t.get("cbs") is not None else "- ("
        print(f"  D={t['D']:.4g}: cbs={cbs}{t['status']})  loss excess by batch: {ex}")
    for t in d.get("unusable_targets", []):
        print(f"  target L={t['target']:.4g}: {t['status']}")
    if d.get("table") and d.get("law", "").startswith("isoflop"):
        for t in d["table"]:
            n = f"{t['N_opt']:.4g}" if t["N_opt"] is not None else "-"
            print(f"  C={t['C']:.4g}: N_opt={n} ({t['n_points']} sizes){' ' + t['flag'] if t['flag'] else ''}")
    for p in d.get("predictions", []):
        print("prediction: " + ", ".join(f"{k}={v:.5g}" for k, v in p.items() if v is not None))
    if d.get("backtest"):
        bt = d["backtest"]
        keys = [k for k in ("mae", "mape", "max_abs_err", "bias", "mean_abs_log_err_N") if bt.get(k) is not None]
        print(f"backtest (held out budgets {', '.join(f'{c:.3g}' for c in bt['holdout_budgets'])}): "
              + ", ".join(f"{k}={bt[k]:.4g}" for k in keys))
    for n in d.get("notes", []):
        print(f"note: {n}")
    for w in d.get("warnings", []):
        print(f"warning: {w}")


def _with_source_options(args) -> None:
    """Wrap ``args.input`` so every fitter below reads it with the command's reading options."""
    mixed, noncausal = getattr(args, "allow_mixed_schema", False), getattr(args, "allow_noncausal", False)
    best, corpus = getattr(args, "best_per", None), getattr(args, "allow_mixed_corpus", False)
    if mixed or noncausal or best or corpus:
        from scaling.fit import io, select

        args.input = io.Source(args.input, allow_mixed_schema=mixed, allow_noncausal=noncausal,
                               best_per=select.parse_keys(best) if best else None, allow_mixed_corpus=corpus)


def run_fit(args) -> int:
    _with_source_options(args)
    with warnings.catch_warnings(record=True) as caught:  # numerical warnings become one-line result flags
        warnings.simplefilter("always", RuntimeWarning)
        with np.errstate(under="ignore"):  # exp/log-sum-exp underflow to 0 is expected, not a problem
            res = _fit(args)
    d = _clean(res.to_dict())
    seen = []
    for w in caught:
        if not issubclass(w.category, RuntimeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # not ours to relabel
            continue
        text = f"numerical warning during the fit ({w.category.__name__}): {str(w.message).splitlines()[0]}"
        if text not in seen:
            seen.append(text)
    if seen:
        d.setdefault("warnings", []).extend(seen)
    if args.plot:
        _plot_for_fit(args, res)
        d["plot"] = args.plot
    if args.json:
        print(json.dumps(d))
    else:
        _print_table(d)
    return 0


def _plot_for_fit(args, res) -> None:
    from scaling.fit import io, plots

    if args.law == "isoflop":
        (plots.nopt if args.method == "envelope" else plots.isoflop)(res, out=args.plot)
    elif args.law == "bcrit":
        plots.bcrit(res, out=args.plot)
    elif args.law == "chinchilla":
        df, _ = io.load_table(args.input, columns=args.columns, where=args.where)
        if "C" not in df.columns:
            df["C"] = 6.0 * df["N"] * df["D"]
        plots.frontier(df, res, out=args.plot)
    elif args.law in ("clark", "krajewski"):
        df, _ = io.load_table(args.input, columns=args.columns, where=args.where)
        plots.moe(df, by="E" if args.law == "clark" else "G", fit=res, out=args.plot)
    else:
        df, _ = io.load_table(args.input, columns=args.columns, where=args.where)
        plots.law1d(df, res, out=args.plot)


def run_plot(args) -> int:
    from scaling.fit import batch, io, parametric, plots
    from scaling.fit.isoflop import isoflop as fit_isoflop

    if args.method == "varpro":
        raise UsageError("--method varpro: is for `scaling fit --law chinchilla`; the figures use the Huber fit")

    _with_source_options(args)
    kw = dict(columns=args.columns, where=args.where)
    fig = args.figure
    if fig == "isoflop" and args.method == "envelope":
        raise UsageError("--figure isoflop: needs --method parabola or akima (IsoFLOP profiles), not envelope")
    if fig == "nopt" and args.method == "envelope":
        from scaling.fit.isoflop import envelope

        plots.nopt(envelope(args.input, bootstrap=args.bootstrap, seed=args.seed, **kw), out=args.out)
    elif fig in ("isoflop", "nopt"):
        res = fit_isoflop(args.input, method=args.method, bootstrap=args.bootstrap, seed=args.seed, budget_col=args.budget_col, seed_noise=args.seed_noise, **kw)
        (plots.isoflop if fig == "isoflop" else plots.nopt)(res, out=args.out)
    elif fig == "frontier":
        df, _ = io.load_table(args.input, **kw)
        io.require(df, ["C", "loss", "N"], what="--figure frontier", min_points=1)
        fit = None
        if "D" in df.columns:
            fit = parametric.chinchilla(df, bootstrap=args.bootstrap, seed=args.seed, delta=args.delta)
        plots.frontier(df, fit, out=args.out)
    elif fig == "bcrit":
        plots.bcrit(batch.tradeoff(args.input, bootstrap=args.bootstrap, seed=args.seed, **kw), out=args.out)
    elif fig == "moe":
        df, _ = io.load_table(args.input, **kw)
        by = args.by or ("G" if "G" in df.columns and df["G"].nunique() > 1 else "E")
        io.require(df, ["N", "loss", by], what="--figure moe", min_points=2)
        fit = None
        law = args.law or ("krajewski" if by == "G" and "D" in df.columns else "clark" if by == "E" else None)
        if law in ("clark", "krajewski"):
            fit = getattr(parametric, law)(df, delta=args.delta)
        plots.moe(df, by=by, fit=fit, out=args.out)
    elif fig == "lr":
        src = args.input
        if isinstance(src, io.Source):  # the figure shows every learning rate: no --best-per here
            src = io.Source(src.path, allow_mixed_schema=src.allow_mixed_schema, allow_noncausal=src.allow_noncausal,
                            allow_mixed_corpus=src.allow_mixed_corpus)
        df, _ = io.load_table(src, **kw)
        by = args.by or "d_model"
        io.require(df, ["lr", "loss", by], what="--figure lr", min_points=2)
        plots.lr(df, by=by, out=args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
