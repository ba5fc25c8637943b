"""``scaling sweep``, ``scaling status`` and ``scaling quickstart``.

``scaling sweep SPEC`` validates the whole spec (every trial's config, budget and size) before
anything runs, writes the sweep manifest and trains the unfinished trials; rerun it to resume.
SPEC is a path or the name of a shipped spec (``quickstart``, ``isoflop_cpu``, ...).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from scaling.sweep import launch, local, spec as spec_mod, store, wsd


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a sweep spec (rerun to resume; --plan to only print it)")
    p.add_argument("spec", metavar="SPEC", help="sweep YAML file, or a shipped spec name (quickstart, isoflop_cpu, ...)")
    p.add_argument("--backend", choices=launch.BACKENDS, default="local",
                   help="local: worker processes on this machine (default); slurm: submitit array jobs")
    p.add_argument("--jobs", type=int, default=1, help="local backend: worker processes (default 1)")
    p.add_argument("--plan", action="store_true", help="print the trials and their compute (independent vs WSD-branched) and exit")
    p.add_argument("--only", metavar="FILTER", help="run a subset: key=value terms (bucket=1e12,lr=3e-3) or id substrings, comma-separated")
    p.add_argument("--out", metavar="DIR", help="sweep directory (default runs/<spec name>)")
    p.add_argument("--cluster", choices=("auto", "slurm", "local", "debug"), default="auto",
                   help="slurm backend: submitit cluster (auto = SLURM when sbatch exists)")
    p.add_argument("--run-fn", default=launch.DEFAULT_RUN_FN, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true",
                   help="accepted for clarity: every run resumes (finished trials are skipped, interrupted ones continue)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--stack", default="auto", metavar="auto|off|K",
                   help="local backend: train same-shape trials (differing in seed, budget, lr, warmup, weight decay) "
                        "as one vmapped program of up to K trials; auto: 8 on an accelerator, off on a CPU-only "
                        "machine, where it was measured slower (default auto)")
    p.set_defaults(func=cmd_sweep)

    s = sub.add_parser("status", help="table of a sweep's trials: state, N, D, C, loss, tok/s")
    s.add_argument("sweep_dir", metavar="SWEEP_DIR")
    s.add_argument("--all", action="store_true", help="also list trials from earlier versions of the spec")
    s.set_defaults(func=cmd_status)

    q = sub.add_parser("quickstart", help="tiny IsoFLOP sweep on the embedded corpus, then the fits and plots")
    q.add_argument("--out", metavar="DIR", default="runs/quickstart")
    q.add_argument("--smoke", action="store_true", help="a few-second version (two tiny budgets x 3 sizes) to check the install")
    q.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default 2, 1 on a one-core machine: tiny trials leave a core idle; "
                        "measured 1.42x trials per hour on 2 cores with `scaling bench sweep --jobs 2`)")
    q.add_argument("--stack", default="auto", metavar="auto|off|K", help="as for scaling sweep (default auto)")
    q.set_defaults(func=cmd_quickstart)


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------


def _fmt(x, spec="{:.3g}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return spec.format(x)


def plan_text(sp, trial_list: list) -> str:
    """The plan: one line per trial, then total compute of independent vs. WSD-branched runs."""
    from scaling import flops

    lines = [f"sweep {sp.name}: experiment {sp.experiment}, strategy {sp.strategy}, {len(trial_list)} trials"]
    lines += [f"rule {line}" for line in _rule_lines([t.describe().get("rules") for t in trial_list])]
    lines += [f"{'trial':<13}{'role':<12}{'bucket':>9}{'shape':>10}{'N':>10}{'batch':>6}{'lr':>10}{'steps':>8}"
              f"{'tokens':>10}{'FLOPs':>10}  grid"]
    for t in trial_list:
        n = flops.param_counts(t.config.model).active_non_embedding
        tokens = flops.tokens_for_steps(t.config, t.steps) if t.steps else None
        grid = " ".join(f"{k}={v}" for k, v in t.tags) + (f" seed={t.config.seed}" if len(sp.seeds) > 1 else "")
        role = t.role + (f"@{t.branch_step}" if t.branch_step else "")
        lines.append(f"{t.id:<13}{role:<12}{t.budget:>9.3g}{'d%dL%d' % (t.config.model.d_model, t.config.model.n_layers):>10}"
                     f"{n:>10.3g}{t.config.data.batch_size:>6d}{t.config.optim.lr:>10.3g}{_fmt(t.steps, '{:d}'):>8}"
                     f"{_fmt(tokens):>10}{_fmt(t.planned_flops):>10}  {grid}")
    indep = wsd.planned_compute(spec_mod.trials(sp, "independent"))
    if sp.strategy == "upcycle":
        by_arm = {}
        for t in trial_list:
            arm = dict(t.tags).get("arm", t.role)
            by_arm[arm] = by_arm.get(arm, 0.0) + (t.planned_flops or 0.0)
        lines.append("compute: " + ", ".join(f"{arm} {c:.4g} FLOPs" for arm, c in by_arm.items())
                     + f"; total {sum(by_arm.values()):.4g}")
        return "\n".join(lines)
    if sp.strategy == "cbs_branch":
        branched = wsd.planned_compute(trial_list)
        main = wsd.planned_compute([t for t in trial_list if t.role == "main"])
        lines.append(f"compute: main runs {main:.4g} FLOPs, branches {branched - main:.4g} FLOPs")
        return "\n".join(lines)
    try:
        branched = wsd.planned_compute(spec_mod.trials(sp, "wsd_branch"))
        lines.append(f"compute: independent {indep:.4g} FLOPs, wsd_branch {branched:.4g} FLOPs "
                     f"(ratio {branched / indep:.3f})" if indep else "compute: seconds budgets (no FLOP plan)")
    except Exception as err:  # the spec cannot branch (e.g. cosine schedule): say why
        lines.append(f"compute: independent {indep:.4g} FLOPs; wsd_branch n/a ({err})")
    return "\n".join(lines)


def stack_option(text) -> str | int:
    """``--stack`` parsed (``scaling.stacking.parse_stack``), a usage error naming the option."""
    from scaling import stacking
    from scaling.errors import UsageError

    try:
        return stacking.parse_stack(text)
    except ValueError as err:
        raise UsageError(f"--stack: {err}") from None


def stack_plan_lines(trial_list: list, mode) -> list[str]:
    """What ``--stack`` does with these trials: the groups an accelerator would train together
    (``auto`` on a CPU-only machine trains one at a time; not probed here)."""
    from scaling import stacking

    width = stacking.AUTO_WIDTH if mode == "auto" else int(mode)
    groups = local.plan_jobs(trial_list, width)
    head = f"stacks (--stack {mode}{', on an accelerator; one at a time on a CPU-only machine' if mode == 'auto' else ''}): "
    lines = [head + stacking.describe(groups)]
    for i, g in enumerate(x for x in groups if len(x) > 1):
        lines.append(f"  stack {i + 1}: {' '.join(g)}")
    return lines


def cmd_sweep(args) -> int:
    from scaling.errors import UsageError

    if args.jobs < 1:
        raise UsageError(f"--jobs: must be >= 1, got {args.jobs}")
    mode = stack_option(args.stack)
    path = spec_mod.resolve_path(args.spec)
    sp = spec_mod.load(path)  # every trial resolved and validated here, before anything runs
    all_trials = spec_mod.trials(sp)
    chosen = spec_mod.select(all_trials, args.only)
    if args.plan:
        print(plan_text(sp, chosen))
        print("\n".join(stack_plan_lines(chosen, mode)))
        return 0
    from scaling import storage

    out = storage.path(args.out or Path("runs") / sp.name)
    if isinstance(out, Path) and out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} is a file, not a directory; give a directory for the sweep")
    store.write_manifest(out, sp, all_trials, spec_path=str(path))
    print(f"sweep {sp.name}: {len(chosen)} trials -> {out}", file=sys.stderr)
    if args.backend == "local":
        from scaling import stacking

        width, widest = 1, stacking.AUTO_WIDTH if mode == "auto" else int(mode)
        if widest > 1 and any(len(g) > 1 for g in local.plan_jobs(chosen, widest)):
            width = local.stack_width(mode)  # auto asks the backend only when something could stack
        if width > 1:
            print(f"sweep {sp.name}: {stacking.describe(local.plan_jobs(chosen, width))}", file=sys.stderr)
        counts = local.run_local(out, chosen, jobs=args.jobs, run_fn=args.run_fn, progress=not args.quiet,
                                  stack=width)
    else:
        if mode not in ("auto", 1):
            print(f"sweep {sp.name}: --stack applies to the local backend; slurm trains one trial per task",
                  file=sys.stderr)
        counts = launch.run_slurm(out, chosen, run_fn=args.run_fn, progress=not args.quiet,
                                  cluster=None if args.cluster == "auto" else args.cluster)
    print(f"sweep {sp.name}: done {counts['done']}, diverged {counts['diverged']}, failed {counts['failed']}, "
          f"pending {counts['pending'] + counts['running']}  (scaling status {out})", file=sys.stderr)
    return 0 if counts["failed"] == 0 and counts["pending"] == 0 else 1


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------


def _rule_lines(texts) -> list[str]:
    """The distinct rules of a sweep, one ``target: rule`` line each (the part after ``->``, the
    trial's own resolved value, dropped)."""
    seen: dict[str, None] = {}
    for text in texts:
        if isinstance(text, str):
            for part in text.split("; "):
                line = part.split(" -> ")[0]  # the trial's own resolved batch
                seen.setdefault(re.sub(r"grid x\S+ of", "grid of", line))  # the trial's own grid factor
    return list(seen)


def _rules_short(text) -> str:
    """``lr: power_law 0.31 * C^-0.125; warmup: fraction 0.05`` -> ``lr=power_law warmup=fraction``."""
    if not isinstance(text, str) or not text:
        return "-"
    parts = [p.split(": ", 1) for p in text.split("; ")]
    return " ".join(f"{k}={v.split()[0]}" for k, v in parts if v)


def status_table(df) -> str:
    cols = [("trial_id", "trial", "{}"), ("state", "state", "{}"), ("bucket", "bucket", "{:.3g}"), ("shape", "shape", "{}"),
            ("N", "N", "{:.3g}"), ("D", "D", "{:.3g}"), ("C", "C", "{:.3g}"), ("batch", "batch", "{:.0f}"),
            ("lr", "lr", "{:.3g}"), ("loss", "loss", "{:.4f}"), ("tokens_per_s", "tok/s", "{:.3g}")]
    with_rules = "rules" in df and df["rules"].notna().any()
    if with_rules:
        cols.append(("rules", "set by", "{}"))
    rows = [[h for _, h, _ in cols]]
    for _, r in df.iterrows():
        rows.append([_rules_short(r.get(c)) if c == "rules" else
                     _fmt(r.get(c), f) if not isinstance(r.get(c), str) else r.get(c) for c, _, f in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    for _, r in df.iterrows():
        if r.get("state") in ("failed", "diverged") and isinstance(r.get("error"), str):
            lines.append(f"{r['trial_id']}: {r['state']}: {r['error']}")
    counts = df["state"].value_counts().to_dict() if len(df) else {}
    lines.append("  ".join(f"{s} {counts.get(s, 0)}" for s in store.STATES))
    if with_rules:
        lines += [f"rule {line}" for line in _rule_lines(df["rules"])]
    return "\n".join(lines)


def cmd_status(args) -> int:
    m = store.read_manifest(args.sweep_dir)
    df = store.load(args.sweep_dir, allow_mixed=True, allow_mixed_corpus=True)  # status shows every trial; fits refuse a mix
    if not args.all and "current" in df:
        df = df[df["current"].fillna(True).astype(bool)]
    print(f"sweep {m['name']} ({m['strategy']}): {len(df)} trials")
    print(status_table(df))
    return 0


# --------------------------------------------------------------------------------------------
# quickstart
# --------------------------------------------------------------------------------------------


def cmd_quickstart(args) -> int:
    import os

    from scaling.errors import UsageError
    from scaling.sweep import quickstart

    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise UsageError(f"--jobs: must be at least 1, got {jobs}")
    return quickstart.run(Path(args.out), smoke=args.smoke, jobs=jobs, stack=local.stack_width(stack_option(args.stack)))
