"""Branched critical-batch-size measurement (Merrill et al. 2025, "Critical Batch Size Revisited:
A Simple Empirical Approach to Large-Batch Language Model Training").

One *main* run per model trains at batch ``B`` with a constant learning rate (after a fixed
warmup) and keeps a checkpoint at every branch point. From each checkpoint, one short *branch*
per factor ``k`` trains ``delta_tokens`` more tokens at batch ``k * B`` with learning rate
``lr * k ** lr_exponent`` (``1/2``: the square-root rule for Adam). The branch switches batch
through ``data.batch_schedule`` at exactly the checkpoint's token count, so it reads the
sequences the main run would have read next, regrouped. ``scaling.fit.batch.branched_cbs``
then finds, per branch point, the largest batch whose loss after ``delta_tokens`` stays within a
tolerance of the smallest batch's: the critical batch size as a function of the tokens seen.

Spec::

    strategy: cbs_branch
    cbs: {at_tokens: [1e5, 3e5, 1e6], factors: [1, 2, 4, 8], delta_tokens: 131072, lr_exponent: 0.5}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from scaling.config import BudgetConfig, ConfigError, config_hash


@dataclass(frozen=True)
class CbsSpec:
    """Branch points (training tokens of the main run), batch factors, tokens per branch and
    the learning-rate exponent of the batch factor."""

    at_tokens: tuple[int, ...]
    factors: tuple[int, ...]
    delta_tokens: int
    lr_exponent: float = 0.5

    def __post_init__(self):
        if not self.at_tokens or any(t <= 0 for t in self.at_tokens) or len(set(self.at_tokens)) != len(self.at_tokens):
            raise ConfigError(f"sweep.cbs.at_tokens: give distinct positive token counts, got {list(self.at_tokens)}")
        if len(self.factors) < 2 or any(k < 1 for k in self.factors) or len(set(self.factors)) != len(self.factors):
            raise ConfigError(f"sweep.cbs.factors: give at least two distinct integer batch factors >= 1, "
                              f"got {list(self.factors)}")
        if self.delta_tokens <= 0:
            raise ConfigError(f"sweep.cbs.delta_tokens: must be a positive token count, got {self.delta_tokens}")
        if not 0 <= self.lr_exponent <= 2:
            raise ConfigError(f"sweep.cbs.lr_exponent: must be in [0, 2] (0.5: the square-root rule), got {self.lr_exponent:g}")


def parse(raw) -> CbsSpec:
    """The ``cbs:`` mapping of a sweep spec; ConfigError naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError("sweep.cbs: strategy cbs_branch needs a mapping {at_tokens: [...], factors: [...], "
                          "delta_tokens: N}")
    unknown = set(raw) - {"at_tokens", "factors", "delta_tokens", "lr_exponent"}
    if unknown:
        raise ConfigError(f"sweep.cbs.{sorted(unknown)[0]}: unknown key; use at_tokens, factors, delta_tokens, lr_exponent")

    from scaling.sweep.spec import number_list

    def ints(key):
        return number_list(f"sweep.cbs.{key}", raw.get(key), whole=True)

    def number(key, default=None):
        v = raw.get(key, default)
        try:
            f = math.nan if isinstance(v, bool) else float(v)
        except (TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f):
            raise ConfigError(f"sweep.cbs.{key}: must be a number, got {v!r}")
        return f

    delta = number("delta_tokens")
    if delta != int(delta):
        raise ConfigError(f"sweep.cbs.delta_tokens: must be a whole number of tokens, got {raw.get('delta_tokens')!r}")
    return CbsSpec(ints("at_tokens"), tuple(sorted(ints("factors"))), int(delta), number("lr_exponent", 0.5))


def branch(independent: list, cbs: CbsSpec) -> list:
    """Each independent trial becomes a main run (checkpoints at the branch points) plus one
    branch per (branch point, factor): ``init_from = "<main id>@<step>"``, batch ``k * B`` from
    the checkpoint's token count on, lr times ``k ** lr_exponent``, ``delta_tokens`` more tokens.
    ConfigError for a main run that is not constant-LR with a fixed warmup, a branch point past
    its budget or inside its warmup, two points on one step, or a ``delta_tokens`` that some
    branch batch does not divide (every branch trains exactly ``delta_tokens``)."""
    out = []
    for t in independent:
        cfg = t.config
        o, d = cfg.optim, cfg.data
        if o.schedule != "constant" or o.warmup_steps is None:
            raise ConfigError(f"sweep.set.optim.schedule: cbs_branch needs optim.schedule: constant and a fixed "
                              f"optim.warmup_steps, so a branch's learning rate does not depend on its length "
                              f"(got {o.schedule!r}, warmup_steps {o.warmup_steps})")
        if d.batch_schedule:
            raise ConfigError("sweep.set.data.batch_schedule: cbs_branch sets the branches' batch schedule; "
                              "leave it unset for the main run")
        if o.batch_lr_exponent:
            raise ConfigError("sweep.set.optim.batch_lr_exponent: cbs_branch scales each branch's lr by "
                              "k^cbs.lr_exponent itself; leave optim.batch_lr_exponent at 0")
        if t.steps is None:
            raise ConfigError(f"sweep.buckets[{t.bucket}]: cbs_branch needs token or FLOP buckets (the main run's length)")
        tps = cfg.tokens_per_step
        step_of, at_of = {}, {}
        for at in cbs.at_tokens:
            s = at // tps
            if s <= o.warmup_steps or s >= t.steps:
                raise ConfigError(f"sweep.cbs.at_tokens: {at:.6g} tokens is step {s} of {cfg.name}, outside its "
                                  f"constant-LR part (after warmup step {o.warmup_steps}, before its last step {t.steps})")
            if s in at_of:
                raise ConfigError(f"sweep.cbs.at_tokens: {at_of[s]} and {at} tokens are both step {s} at {tps} tokens "
                                  "per step; give branch points at least one step apart")
            step_of[at], at_of[s] = s, at
        # every branch must train exactly delta_tokens, so every branch batch divides it
        unit = math.lcm(*cbs.factors) * tps
        if cbs.delta_tokens % unit:
            raise ConfigError(f"sweep.cbs.delta_tokens: {cbs.delta_tokens} is not a whole number of steps at every "
                              f"branch batch (factors {list(cbs.factors)} x {tps} tokens); use a multiple of {unit}")
        mcfg = dataclasses.replace(cfg, checkpoint_at=tuple(sorted(set(step_of.values()))))
        main_id = config_hash(mcfg)
        out.append(dataclasses.replace(t, id=main_id, config=mcfg, role="main"))
        fps = t.flops_per_step
        for at, s in sorted(step_of.items()):
            start = s * tps
            for k in cbs.factors:
                data = d if k == 1 else dataclasses.replace(d, batch_schedule=(f"{start}:{k * d.batch_size}",))
                bcfg = dataclasses.replace(
                    cfg, data=data, optim=dataclasses.replace(o, lr=o.lr * k ** cbs.lr_exponent),
                    budget=BudgetConfig(flops=None, tokens=start + cbs.delta_tokens),
                    name=f"{cfg.name}_at{start}_k{k}", init_from=f"{main_id}@{s}")
                from scaling import flops

                steps = int(flops.steps_for_budget(bcfg))
                assert flops.tokens_for_steps(bcfg, steps) == start + cbs.delta_tokens
                tags = t.tags + (("cbs_at_tokens", start), ("cbs_factor", k), ("cbs_batch", k * d.batch_size))
                out.append(dataclasses.replace(
                    t, id=config_hash(bcfg), config=bcfg, role="branch", main=main_id, branch_step=s, steps=steps,
                    tags=tags, planned_flops=cbs.delta_tokens / tps * fps if fps else None))
    return sorted(out, key=lambda t: (t.bucket, t.variant, t.group, t.role != "main"))
