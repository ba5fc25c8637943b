"""``scaling train``: one run of an experiment family with overrides.

The config is built in three layers: ``experiments.get(--experiment)`` (default ``dense``), then
the settings of ``--config FILE.json`` (a full or partial TrainConfig as JSON, e.g. a run's
config.json), then each ``--set key=value`` in order. ``--wandb`` and ``--no-progress`` are
applied last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from scaling.config import ConfigError, TrainConfig


EPILOG = """budgets (set exactly one; setting one clears the others):
  --set budget.flops=1e13    training FLOPs as counted by scaling.flops (default kind)
  --set budget.tokens=5e6    training tokens
  --set budget.steps=2000    optimizer steps
  --set budget.seconds=600   wall-clock training seconds (schedule sized from a timed step)
The LR schedule always ends exactly at the budget's last step.

writes OUT/config.json, OUT/metrics.jsonl, OUT/summary.json, OUT/ckpt/; rerunning a finished
run does nothing, rerunning an interrupted one resumes from its latest checkpoint.

example:
  scaling train --experiment dense --set model.d_model=128 --set model.n_layers=4 \\
      --set budget.flops=2e11 --out runs/demo
"""


def register(sub) -> None:
    p = sub.add_parser("train", help="train one model until its budget is spent (resumable)",
                       description=__doc__.replace("``", ""), epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default=None, help="experiment family in experiments/ (default: dense, "
                   "or the 'experiment' field of --config)")
    p.add_argument("--config", metavar="FILE.json", help="TrainConfig as JSON (full or partial)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set model.d_model=256 --set budget.flops=1e13")
    p.add_argument("--out", required=True, help="run directory (created; rerun to resume)")
    p.add_argument("--wandb", choices=("off", "offline", "online"), default=None,
                   help="mirror metrics to wandb (online needs WANDB_API_KEY; default: the config's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="train even when the estimated memory per device exceeds what the device has")
    p.set_defaults(func=main)


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"model": {"d_model": 8}}`` -> ``{"model.d_model": 8}`` (None sections stay whole)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _read_config_file(path: str) -> dict:
    from scaling.errors import UsageError

    try:
        d = json.loads(Path(path).read_text())
    except OSError as err:
        raise UsageError(f"--config: cannot read {path} ({err.strerror or err})") from None
    except ValueError as err:
        raise UsageError(f"--config: {path} is not valid JSON ({err})") from None
    if not isinstance(d, dict):
        raise UsageError(f"--config: {path} must hold a JSON object of TrainConfig fields")
    from scaling.schema import config_fields

    return config_fields(d)  # a run's config.json also records facts about the run


def build_config(args) -> TrainConfig:
    """TrainConfig from the parsed ``scaling train`` arguments (ConfigError/UsageError on bad input)."""
    import experiments

    from scaling.errors import UsageError

    file_cfg = _read_config_file(args.config) if args.config else {}
    in_file = file_cfg.get("experiment")
    if args.experiment and in_file and args.experiment != in_file:
        raise UsageError(f"--experiment: {args.experiment} disagrees with experiment={in_file!r} in {args.config}; "
                         f"drop one of them (the label is stored with the run)")
    name = args.experiment or in_file or "dense"
    cfg = experiments.get(name)
    if file_cfg:
        flat = _flatten(file_cfg)
        # a budget in the file replaces the family's (a budget has exactly one kind)
        budget = {k: v for k, v in flat.items() if k.startswith("budget.") and v is not None}
        if len(budget) > 1:
            raise UsageError(f"--config: {args.config} sets {len(budget)} budgets ({', '.join(sorted(budget))}); "
                             f"a run has exactly one budget kind: keep one")
        rest = {k: v for k, v in flat.items() if not k.startswith("budget.")}
        cfg = cfg.with_overrides(rest)
        if budget:
            cfg = cfg.with_overrides(budget)
    if args.overrides:
        cfg = cfg.with_overrides(args.overrides)
    late = {}
    if args.wandb:
        late["wandb"] = args.wandb
    if args.no_progress:
        late["progress"] = False
    return cfg.with_overrides(late) if late else cfg


def main(args) -> int:
    from scaling.train import loop

    cfg = build_config(args)
    if getattr(args, "skip_memory_check", False):
        os.environ["SCALING_SKIP_MEMORY_CHECK"] = "1"
    summary = loop.run(cfg, args.out)
    state = summary.get("state")
    loss = summary.get("final_eval_loss")
    loss_s = f"{loss:.4f}" if isinstance(loss, (int, float)) else str(loss)
    print(f"{args.out}: {state}; steps {summary.get('steps')}, tokens {summary.get('tokens')}, "
          f"FLOPs {summary.get('flops', 0) or 0:.3g}, final eval loss {loss_s} nats", file=sys.stderr)
    return 0  # diverged is a result, not an error (sweeps carry on)
