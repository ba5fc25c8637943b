"""``scaling forecast RUNS --at C=...``: the frontier loss at larger budgets, with the law and fit
window chosen by nested leave-future-out and an interval whose coverage was measured
(``scaling.fit.forecast``)."""

from __future__ import annotations

import json
import sys

from scaling.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("forecast", help="forecast the compute frontier at larger budgets (law and window chosen by leave-future-out)")
    p.add_argument("input", help="CSV/JSONL table or sweep directory (columns C, loss; N, D for chinchilla)")
    p.add_argument("--at", required=True, metavar="C=V[,V..]", help="budgets to forecast, e.g. C=1e14,1e15 (FLOPs)")
    p.add_argument("--laws", default="saturating,powerlaw,chinchilla", help="candidate laws: saturating, powerlaw, chinchilla (the default three), kaplan, data_constrained "
                        "(needs unique tokens U and runs that repeat data)")
    p.add_argument("--windows", default="all,3,4", help="fit windows in budgets, 'all' for every budget (default all,3,4)")
    p.add_argument("--level", type=float, default=0.9, help="interval level (default 0.9)")
    p.add_argument("--horizon", default="match",
                   help="how far ahead backtests reach: 'match' (as far as the forecast, the default) or a number "
                        "of budgets (1: the next budget)")
    p.add_argument("--tol-dex", dest="tol_dex", type=float, default=0.1, help="budget clustering / bin width in decades of C")
    p.add_argument("--columns", help="renames CANONICAL=SOURCE, e.g. C=flops")
    p.add_argument("--where", help="rows to keep (see scaling fit --where)")
    p.add_argument("--allow-mixed-schema", dest="allow_mixed_schema", action="store_true")
    p.add_argument("--allow-mixed-corpus", dest="allow_mixed_corpus", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _at(spec: str) -> list[float]:
    key, sep, vals = spec.partition("=")
    if key.strip() != "C" or not sep:
        raise UsageError(f"--at: expected C=V[,V..] (FLOPs), got {spec!r}")
    try:
        out = [float(v) for v in vals.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--at: {vals!r} is not a list of numbers") from None
    if not out or any(not (v > 0) for v in out):
        raise UsageError(f"--at: budgets must be positive numbers, got {vals!r}")
    return out


def _windows(spec: str) -> tuple:
    out = []
    for w in spec.split(","):
        w = w.strip()
        if w == "all":
            out.append(None)
            continue
        try:
            n = int(w)
        except ValueError:
            raise UsageError(f"--windows: {w!r} is not 'all' or a number of budgets") from None
        if n < 3:
            raise UsageError(f"--windows: {n} budgets is too few to fit a law; use 3 or more")
        out.append(n)
    return tuple(out)


def _horizon(spec: str):
    spec = spec.strip()
    if spec == "match":
        return spec
    try:
        h = int(spec)
    except ValueError:
        raise UsageError(f"--horizon: {spec!r} is not 'match' or a number of budgets") from None
    if h < 1:
        raise UsageError(f"--horizon: {h} budgets ahead; use 1 or more, or 'match'")
    return h


def run(args) -> int:
    import numpy as np

    from scaling.fit import forecast, io
    from scaling.fit.cli import _clean

    src = args.input
    if args.allow_mixed_schema or args.allow_mixed_corpus:
        src = io.Source(src, allow_mixed_schema=args.allow_mixed_schema, allow_mixed_corpus=args.allow_mixed_corpus)
    laws = tuple(x.strip() for x in args.laws.split(",") if x.strip())
    with np.errstate(all="ignore"):
        r = forecast.forecast(src, _at(args.at), laws=laws, windows=_windows(args.windows), level=args.level,
                              tol_dex=args.tol_dex, columns=args.columns, where=args.where, horizon=_horizon(args.horizon))
    d = _clean(r.to_dict())
    if args.json:
        print(json.dumps(d))
        return 0
    reach = "as far as the forecast" if d["horizon"] == "match" else f"{d['horizon']} budget(s) ahead"
    print(f"chosen by leave-future-out, backtests {reach}: {d['chosen']}  ({len(d['budgets'])} budgets, "
          f"C {d['budgets'][0]['C']:.3g} .. {d['budgets'][-1]['C']:.3g})")
    print(f"{'config':>16} {'backtests':>9} {'mean |ln err|':>14} {'bias':>9}  status")
    for s in d["selection"]:
        m = f"{s['mean_abs_log_err']:.4f}" if s["mean_abs_log_err"] is not None else "-"
        b = f"{s['bias']:+.4f}" if s["bias"] is not None else "-"
        chosen = " (chosen)" if s["config"] == d["chosen"] else ""
        print(f"{s['config']:>16} {s['n_backtests']:>9} {m:>14} {b:>9}  {s['status']}{chosen}")
    if d["nested"]:
        errs = [abs(x["log_err"]) for x in d["nested"]]
        cov, ci = d["coverage"], d["coverage_ci"]
        print(f"nested procedure: {len(errs)} outer forecasts, mean |ln err| {sum(errs) / len(errs):.4f}, "
              f"coverage {cov:.0%} at {d['level']:.0%} [{ci[0]:.2f}, {ci[1]:.2f}]")
    for f in d["forecasts"]:
        print(f"forecast C={f['C']:.4g}: loss {f['loss']:.4f} nats, {d['level']:.0%} interval [{f['lo']:.4f}, {f['hi']:.4f}]")
    for n in d["notes"]:
        print(f"note: {n}")
    for w in d["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0
