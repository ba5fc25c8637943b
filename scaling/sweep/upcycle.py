"""Upcycling sweeps (Liew et al. 2025, "Scaling Laws for Upcycling Mixture-of-Experts Language
Models"): dense tokens D1 x upcycled tokens D2, beside from-scratch models at equal compute.

Each independent trial of the spec (a dense model per size, its bucket a token budget) becomes
a *main* run at a constant learning rate after a fixed warmup, keeping a checkpoint at every
``dense_tokens`` point D1. From each, one *upcycled* trial per ``upcycled_tokens`` D2 starts
(``init_from = "<main id>@<step>"``, ``init.upcycle=moe``): the dense model as an MoE (``moe``
overrides, default ``model.ffn: moe``), a fresh optimizer, ``set`` overrides (its schedule:
cosine by default), D2 tokens read on from the dense run's data position. ``scratch_flops``
adds from-scratch MoE trials (and dense ones with ``scratch_dense: true``) at those training
FLOPs, with the same ``set`` overrides, so the upcycled loss at total compute ``C1 + C2`` can be
read against them. Tags: ``arm`` (dense_main, upcycled, scratch_moe, scratch_dense), ``D1``,
``D2`` (tokens).

Spec::

    strategy: upcycle
    upcycle: {dense_tokens: [2.6e5, 5.2e5], upcycled_tokens: [2.6e5, 5.2e5], noise: 0.0,
              moe: {model.ffn: moe}, set: {optim.schedule: cosine}, scratch_flops: [1e11, 3e11]}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from scaling.config import BudgetConfig, ConfigError, config_hash

_KEYS = ("dense_tokens", "upcycled_tokens", "noise", "moe", "set", "scratch_flops", "scratch_dense")


@dataclass(frozen=True)
class UpcycleSpec:
    """Branch points (dense tokens D1), upcycled lengths (tokens D2), the MoE and stage
    overrides, expert-copy noise and the from-scratch FLOP budgets."""

    dense_tokens: tuple[int, ...]
    upcycled_tokens: tuple[int, ...]
    moe: tuple[tuple[str, object], ...] = (("model.ffn", "moe"),)
    set: tuple[tuple[str, object], ...] = (("optim.schedule", "cosine"),)
    noise: float = 0.0
    scratch_flops: tuple[float, ...] = ()
    scratch_dense: bool = False

    def __post_init__(self):
        for key in ("dense_tokens", "upcycled_tokens"):
            v = getattr(self, key)
            if not v or any(t <= 0 for t in v) or len(set(v)) != len(v):
                raise ConfigError(f"sweep.upcycle.{key}: give distinct positive token counts, got {list(v)}")
        if any(not (math.isfinite(c) and c > 0) for c in self.scratch_flops):
            raise ConfigError(f"sweep.upcycle.scratch_flops: give positive FLOP budgets, got {list(self.scratch_flops)}")


def parse(raw) -> UpcycleSpec:
    """The ``upcycle:`` mapping of a sweep spec; ConfigError naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError("sweep.upcycle: strategy upcycle needs a mapping {dense_tokens: [...], upcycled_tokens: [...]}")
    unknown = set(raw) - set(_KEYS)
    if unknown:
        raise ConfigError(f"sweep.upcycle.{sorted(unknown)[0]}: unknown key; use {', '.join(_KEYS)}")

    from scaling.sweep.spec import number_list

    def numbers(key, whole):
        return number_list(f"sweep.upcycle.{key}", raw.get(key, [] if key == "scratch_flops" else None), whole=whole)

    def overrides(key, default):
        v = raw.get(key, None)
        if v is None:
            return default
        if not isinstance(v, dict):
            raise ConfigError(f"sweep.upcycle.{key}: give a mapping of config fields, e.g. {{model.ffn: moe}}")
        return tuple((str(k), x) for k, x in v.items())

    noise = raw.get("noise", 0.0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ConfigError(f"sweep.upcycle.noise: must be a number >= 0, got {noise!r}")
    dense = raw.get("scratch_dense", False)
    if not isinstance(dense, bool):
        raise ConfigError(f"sweep.upcycle.scratch_dense: must be true or false, got {dense!r}")
    return UpcycleSpec(numbers("dense_tokens", True), numbers("upcycled_tokens", True),
                       overrides("moe", UpcycleSpec.moe), overrides("set", UpcycleSpec.set), float(noise),
                       numbers("scratch_flops", False), dense)


def branch(independent: list, up: UpcycleSpec) -> list:
    """Main runs, upcycled branches and from-scratch trials (module docstring). ConfigError for
    a main run that is not constant-LR with a fixed warmup, a D1 outside its constant-LR part,
    two D1 on one step, a D2 that is not a whole number of steps, or overrides that do not make
    an MoE the dense checkpoint can become."""
    from scaling import flops
    from scaling.models import upcycle as upcycle_model
    from scaling.overrides import apply_overrides
    from scaling.sweep.spec import flops_per_step

    def with_(cfg, items, where):
        try:
            return apply_overrides(cfg, dict(items))
        except ConfigError as err:
            raise ConfigError(f"sweep.upcycle.{where}: {err}") from None

    out = []
    seen_scratch = set()
    for t in independent:
        cfg = t.config
        o = cfg.optim
        if o.schedule != "constant" or o.warmup_steps is None:
            raise ConfigError(f"sweep.set.optim.schedule: strategy upcycle needs the dense runs at optim.schedule: "
                              f"constant with a fixed optim.warmup_steps, so a checkpoint at D1 tokens does not depend "
                              f"on the run's length (got {o.schedule!r}, warmup_steps {o.warmup_steps})")
        if cfg.data.batch_schedule:
            raise ConfigError("sweep.set.data.batch_schedule: strategy upcycle keeps one batch size; leave it unset")
        if t.steps is None or t.budget_kind != "tokens":
            raise ConfigError(f"sweep.buckets[{t.bucket}]: strategy upcycle needs token buckets (the dense main run's "
                              "length), e.g. buckets: [{tokens: 1.2e6}]")
        tps = cfg.tokens_per_step
        step_of = {}
        for d1 in up.dense_tokens:
            s = d1 // tps
            if d1 % tps or s <= o.warmup_steps or s > t.steps:
                raise ConfigError(f"sweep.upcycle.dense_tokens: {d1:.6g} tokens must be a whole number of steps "
                                  f"({tps} tokens each) after warmup step {o.warmup_steps} and at most {cfg.name}'s "
                                  f"{t.steps} steps")
            step_of[d1] = s
        for d2 in up.upcycled_tokens:
            if d2 % tps:
                raise ConfigError(f"sweep.upcycle.upcycled_tokens: {d2:.6g} tokens is not a whole number of steps of "
                                  f"{tps} tokens; use a multiple of {tps}")
        mcfg = dataclasses.replace(cfg, checkpoint_at=tuple(sorted(set(step_of.values()))))
        main_id = config_hash(mcfg)
        out.append(dataclasses.replace(t, id=main_id, config=mcfg, role="main", tags=t.tags + (("arm", "dense_main"),)))
        staged = with_(with_(cfg, up.set, "set"), up.moe, "moe")
        upcycle_model.check(cfg.model, staged.model)
        probe = dataclasses.replace(staged, init=dataclasses.replace(staged.init, upcycle="moe"), init_from="x@1")
        try:
            upcycle_model.check_data(cfg, probe)
        except ConfigError as err:
            raise ConfigError(f"sweep.upcycle.set: {err}") from None
        for d1, s in sorted(step_of.items()):
            for d2 in up.upcycled_tokens:
                bcfg = dataclasses.replace(
                    staged, budget=BudgetConfig(flops=None, tokens=d2), init_from=f"{main_id}@{s}",
                    init=dataclasses.replace(staged.init, upcycle="moe", noise=up.noise),
                    name=f"{cfg.name}_up{d1}_{d2}", checkpoint_at=())
                fps = flops_per_step(bcfg)
                steps = int(flops.steps_for_budget(bcfg))
                out.append(dataclasses.replace(
                    t, id=config_hash(bcfg), config=bcfg, role="branch", main=main_id, branch_step=s, steps=steps,
                    budget_kind="tokens", budget=d2, flops_per_step=fps, planned_flops=steps * fps,
                    tags=t.tags + (("arm", "upcycled"), ("D1", d1), ("D2", d2))))
        arms = [("scratch_moe", staged)] + ([("scratch_dense", with_(cfg, up.set, "set"))] if up.scratch_dense else [])
        for arm, base in arms:
            for c in up.scratch_flops:
                scfg = dataclasses.replace(base, budget=BudgetConfig(flops=c), name=f"{cfg.name}_{arm}_C{c:.3g}",
                                           checkpoint_at=())
                tid = config_hash(scfg)
                if tid in seen_scratch:
                    continue
                seen_scratch.add(tid)
                fps = flops_per_step(scfg)
                steps = int(flops.steps_for_budget(scfg))
                if steps < 1:
                    raise ConfigError(f"sweep.upcycle.scratch_flops: {c:.3g} FLOPs is less than one step of {cfg.name} "
                                      f"({fps:.3g} FLOPs); raise it")
                out.append(dataclasses.replace(
                    t, id=tid, config=scfg, role="independent", steps=steps, budget_kind="flops", budget=c,
                    flops_per_step=fps, planned_flops=steps * fps, tags=t.tags + (("arm", arm),)))
    return sorted(out, key=lambda t: (t.bucket, t.variant, t.group, t.role != "main"))
