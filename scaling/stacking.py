"""Which trials may train stacked, and the groups a sweep trains together (no jax here).

Trials stack (``scaling.train.stacked_run``) when they compile the same training step: the same
model, sequence layout, batch, mesh and compiled optimizer settings. They may differ in what a
lane keeps for itself: the seed, the budget, the traced hyperparameters
(``config.TRACED_OPTIM_FIELDS`` and the MoE/MoD aux-loss weights), the logging, evaluation and
checkpoint schedule, wandb and the divergence rule.

``stack_key(cfg)`` is one string per compiled step (None for a trial that never stacks, with
``refusal(cfg)`` saying why); ``groups`` cuts a sweep's trials into stacks of at most ``width``
trials of one key, in the sweep's order. The groups are computed over every trial of a run of
the sweep, finished ones included, and the finished ones then dropped: a rerun after a kill
gives each unfinished trial the same companions, which a bitwise resume needs.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

from scaling.config import TRACED_OPTIM_FIELDS, TrainConfig

LANE_FIELDS = ("seed", "name", "wandb", "progress", "budget", "log_every", "eval_every", "checkpoint_every",
               "checkpoint_at", "checkpoint_keep", "checkpoint_dir", "divergence_factor")
AUX_WEIGHTS = (("moe", "aux_loss_weight"), ("moe", "z_loss_weight"), ("mod", "aux_loss_weight"))
AUTO_WIDTH = 8  # --stack auto on an accelerator: at most this many trials per stack (memory narrows it)


def refusal(cfg: TrainConfig) -> str | None:
    """Why ``cfg`` cannot train in a stack (one line naming the field), or None."""
    if cfg.budget.kind == "seconds":
        return "budget.seconds: a wall-clock budget needs the trial's own clock"
    if cfg.init_from:
        return "init_from: a branch starts from another run's checkpoint"
    if cfg.data.batch_schedule:
        return "data.batch_schedule: the batch changes shape during the run"
    return None


def stack_key(cfg: TrainConfig) -> str | None:
    """One string per compiled training step: trials with equal keys may stack; None when
    ``refusal(cfg)``."""
    if refusal(cfg) is not None:
        return None
    d = cfg.to_dict()
    for name in LANE_FIELDS:
        d.pop(name, None)
    o = d["optim"]
    o["clips"] = o["grad_clip"] > 0  # clipping on/off is compiled in; its norm is traced
    every = cfg.log_every if cfg.optim.gns_every is None else cfg.optim.gns_every
    o["statistics"] = bool(every)  # how often is the lane's own affair; whether at all is compiled
    for name in (*TRACED_OPTIM_FIELDS, "gns_every"):
        o.pop(name, None)
    m = d["model"]
    for section, name in AUX_WEIGHTS:
        if isinstance(m.get(section), dict):
            m[section].pop(name, None)
    return json.dumps(d, sort_keys=True, default=str)


def groups(trials: Iterable[tuple[str, TrainConfig]], width: int) -> list[list[str]]:
    """``(id, config)`` pairs -> lists of ids: trials of one ``stack_key`` in stacks of at most
    ``width``, in the order given (a group sits where its first trial was); trials that cannot
    stack, or ``width`` 1, give one-trial groups."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    by_key: dict[str, list[str]] = {}
    order: list[tuple[str, str | None]] = []
    for tid, cfg in trials:
        key = stack_key(cfg) if width > 1 else None
        if key is None:
            order.append((tid, None))
            continue
        if key not in by_key:
            by_key[key] = []
            order.append(("", key))
        by_key[key].append(tid)
    out: list[list[str]] = []
    for tid, key in order:
        if key is None:
            out.append([tid])
        else:
            ids = by_key[key]
            out.extend(ids[i:i + width] for i in range(0, len(ids), width))
    return out


def parse_stack(text: str | int) -> str | int:
    """``--stack`` -> ``"auto"``, ``1`` (off) or a width ``K >= 2``; ValueError with the fix."""
    s = str(text).strip().lower()
    if s in ("auto", "off"):
        return s if s == "auto" else 1
    try:
        k = int(s)
    except ValueError:
        raise ValueError(f"expected auto, off or a number of trials per stack, got {text!r}") from None
    if k < 1:
        raise ValueError(f"must be at least 1 trial per stack (1 or off: one at a time), got {k}")
    return k


def describe(groups_: Sequence[Sequence[str]]) -> str:
    """``"12 trials in 4 stacks (3, 3, 3, 3), 2 alone"``."""
    stacks = [len(g) for g in groups_ if len(g) > 1]
    alone = sum(1 for g in groups_ if len(g) == 1)
    n = sum(stacks) + alone
    if not stacks:
        return f"{n} trials, one at a time"
    return f"{n} trials in {len(stacks)} stack{'s' if len(stacks) > 1 else ''} ({', '.join(map(str, stacks))})" + \
        (f", {alone} alone" if alone else "")
