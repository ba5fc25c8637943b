"""WSD branching (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
Training Durations").

With a warmup-stable-decay schedule and a fixed number of warmup steps, the learning rate up to
the start of the cooldown does not depend on the run's length. So for each model shape (all
settings equal but the budget) one *main* run trains to the shape's largest budget and keeps a
checkpoint at the cooldown start of every smaller budget; each smaller budget is a *branch* that
starts from that checkpoint (``init_from``) and runs only its own cooldown. A branch's result is
the result the independent run of that budget would have had, at a fraction of the compute.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from scaling.config import ConfigError, OptimConfig, config_hash


def cooldown_start(steps: int, optim: OptimConfig) -> int:
    """First step of the WSD cooldown in a run of ``steps`` steps: where a branch leaves the main
    run. The trainer's own definition, so the two always agree."""
    from scaling.train.optim import wsd_decay_start

    return int(wsd_decay_start(optim, steps))


def branch(independent: list) -> list:
    """Turn independent trials into main runs and cooldown branches (same trial set, fewer FLOPs).

    Each group of trials that differ only in their FLOP budget becomes one main run (the largest
    budget, ``checkpoint_at`` = the branch points) and one branch per smaller budget with
    ``init_from = "<main trial id>@<step>"`` and ``planned_flops`` = its cooldown only.
    """
    groups: dict[str, list] = defaultdict(list)
    for t in independent:
        if t.budget_kind != "flops":
            raise ConfigError(f"sweep.buckets[{t.bucket}]: wsd_branch needs FLOP buckets; use strategy: independent for "
                              f"{t.budget_kind} buckets")
        o = t.config.optim
        if t.config.data.batch_schedule:
            raise ConfigError("sweep.set.data.batch_schedule: wsd_branch shares one run across budgets at a fixed "
                              "batch; use strategy: independent for a batch schedule")
        if o.schedule != "wsd":
            raise ConfigError(f"sweep.set.optim.schedule: wsd_branch needs optim.schedule: wsd (got {o.schedule!r})")
        if o.warmup_steps is None:
            raise ConfigError("sweep.set.optim.warmup_steps: wsd_branch needs a fixed warmup_steps so the LR before the cooldown is the same for every budget")
        groups[t.group].append(t)
    out = []
    for members in groups.values():
        members = sorted(members, key=lambda t: t.steps)
        main = members[-1]
        points = {}
        for t in members[:-1]:
            s = cooldown_start(t.steps, t.config.optim)
            if s > t.config.optim.warmup_steps and s < main.steps:
                points[t.id] = s
        cfg = dataclasses.replace(main.config, checkpoint_at=tuple(sorted(set(points.values()))))
        main_id = config_hash(cfg)
        out.append(dataclasses.replace(main, id=main_id, config=cfg, role="main" if points else "independent"))
        for t in members[:-1]:
            if t.id not in points:  # cooldown would start inside warmup: nothing to share
                out.append(t)
                continue
            s = points[t.id]
            bcfg = dataclasses.replace(t.config, init_from=f"{main_id}@{s}")
            out.append(dataclasses.replace(t, id=config_hash(bcfg), config=bcfg, role="branch", main=main_id,
                                           branch_step=s, planned_flops=(t.steps - s) * t.flops_per_step))
    return sorted(out, key=lambda t: (t.bucket, t.variant, t.group))


def planned_compute(trial_list: list) -> float:
    """Total FLOPs the trials will compute (branches count only their cooldown)."""
    return float(sum(t.planned_flops or 0.0 for t in trial_list))
