"""Hyperparameter rules: the one owner of how a trial's learning rate, batch size and warmup
follow from its size and budget.

A sweep spec's ``rules:`` section names them (``scaling.sweep.spec`` parses it with ``parse`` and
asks ``resolve`` for each trial's values); the critical-batch work reads the same rules. No jax:
``parse`` needs only ``scaling.errors`` (and ``scaling.runs`` for ``mup: {from: ...}``),
``resolve`` counts parameters and FLOPs with ``scaling.flops``. Forms::

    rules:
      lr: 3e-3                                            # one value for every trial
      lr: {power_law: {coef: 0.3118, C: -0.125}}           # DeepSeek LLM's eta_opt(C)
      lr: {power_law: {coef: 3e-3, B: 0.5}, at: {B: 4096}} # the sqrt(B) rule: 3e-3 at 4096-token batches
      lr: {mup: {lr: 1.5e-2, base_width: 64}}              # μP transfer from a tuned base
      lr: {mup: {from: runs/base_lr, base_width: 64}}      # ... its lr the best of an earlier sweep
      lr: {grid: {factors: [0.5, 1, 2], of: RULE}}         # a per-size grid around any rule above
      batch: {power_law: {coef: 0.292, C: 0.3271}}         # DeepSeek's B_opt(C), in tokens
      batch: {power_law: {...}, unit: sequences, multiple_of: 8}
      warmup: {steps: 25}                                  # fixed (what WSD branching needs)
      warmup: {fraction: 0.05}                             # scales with the run
      warmup: {steps: {power_law: {coef: 1.0, N: 0.5}}}    # steps as a power law

A power law is ``coef * prod_X (X / at_X) ** e_X`` over the variables

- ``N``: non-embedding parameters, ``N_active``: active non-embedding parameters (MoE),
- ``C``: the trial's training FLOPs (the bucket of a FLOP bucket, else the planned FLOPs),
- ``D``: training tokens (planned), ``B``: the batch in tokens, ``W``: the width ``d_model``.

The batch rule may use ``N``, ``N_active``, ``C`` and ``W`` only (``D`` and ``B`` follow from the
batch). Its value is rounded to a whole number of sequences, a multiple of ``multiple_of``
(default 2: without ``data.microbatch`` a statistics step splits the batch in two halves for the
gradient-noise statistics).
A per-size grid multiplies the rule's value by each factor; the fit keeps the best run per
``(N, C)`` (``scaling fit --best-per N,C``), as Porian et al. (2024) do.

``resolve`` returns ``(overrides, described)``: dotted config overrides and, per target, a short
text naming the rule that set it (``scaling status`` shows it).

Over 400 lines: the one owner of hyperparameter rules; each rule form is parsed and resolved
together, so a form is read in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from scaling.errors import ConfigError

VARIABLES = {"N": "non-embedding parameters", "N_active": "active non-embedding parameters",
             "C": "training FLOPs", "D": "training tokens", "B": "batch size in tokens", "W": "width d_model"}
BATCH_VARIABLES = ("N", "N_active", "C", "W")
TARGETS = ("lr", "batch", "warmup")
# the config fields each rule owns: setting them elsewhere in the spec as well is refused
OWNED = {"lr": ("optim.lr",), "batch": ("data.batch_size",), "warmup": ("optim.warmup_steps", "optim.warmup_fraction"),
         "mup": ("model.parametrization", "model.mup_base_width", "model.mup_base_head_dim")}


def _fail(path: str, msg: str):
    raise ConfigError(f"{path}: {msg}")


def _number(path: str, v: Any, *, positive: bool = True) -> float:
    if isinstance(v, bool):
        _fail(path, f"must be a number, got {v!r}")
    try:
        f = float(v)  # YAML reads 1e-3 (no dot) as a string
    except (TypeError, ValueError):
        _fail(path, f"must be a number, got {v!r}")
    if not math.isfinite(f):
        _fail(path, f"must be a finite number, got {v!r}")
    if positive and f <= 0:
        _fail(path, f"must be a positive number, got {v!r}")
    return f


def _mapping(path: str, v: Any) -> dict:
    if not isinstance(v, dict):
        _fail(path, f"expects a mapping, got {v!r}")
    return v


def _only(path: str, d: dict, known: tuple) -> None:
    unknown = sorted(set(map(str, d)) - set(known))
    if unknown:
        _fail(f"{path}.{unknown[0]}", f"unknown field; known fields: {', '.join(known)}")


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLaw:
    """``coef * prod (X / at_X) ** e_X``; ``exponents`` and ``at`` are ``((X, value), ...)``."""

    coef: float
    exponents: tuple[tuple[str, float], ...]
    at: tuple[tuple[str, float], ...] = ()

    def __call__(self, values: dict[str, float]) -> float:
        at = dict(self.at)
        out = self.coef
        for name, e in self.exponents:
            out *= (values[name] / at.get(name, 1.0)) ** e
        return out

    def text(self) -> str:
        at = dict(self.at)
        terms = [f"({x}/{at[x]:g})^{e:g}" if x in at else f"{x}^{e:g}" for x, e in self.exponents]
        return " * ".join([f"{self.coef:g}", *terms])

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(x for x, _ in self.exponents)


@dataclass(frozen=True)
class ValueRule:
    """A number for every trial: a constant, a power law, or (lr only) μP transfer."""

    kind: str  # constant | power_law | mup
    value: Optional[float] = None  # constant; mup: the base model's tuned lr
    law: Optional[PowerLaw] = None
    base_width: Optional[int] = None  # mup
    source: Optional[str] = None  # mup from a sweep: where the tuned lr came from

    def __call__(self, values: dict[str, float]) -> float:
        return self.law(values) if self.kind == "power_law" else float(self.value)

    def text(self) -> str:
        if self.kind == "power_law":
            return f"power_law {self.law.text()}"
        if self.kind == "mup":
            src = f" ({self.source})" if self.source else ""
            return f"mup lr {self.value:g} from base width {self.base_width}{src}"
        return f"constant {self.value:g}"

    @property
    def variables(self) -> tuple[str, ...]:
        return self.law.variables if self.law is not None else ()


@dataclass(frozen=True)
class LRRule:
    rule: ValueRule
    factors: tuple[float, ...] = (1.0,)  # a per-size grid: the rule's value times each factor

    @property
    def is_grid(self) -> bool:
        return self.factors != (1.0,)


@dataclass(frozen=True)
class BatchRule:
    rule: ValueRule
    unit: str = "tokens"  # what the rule's value counts: tokens or sequences
    multiple_of: int = 2


@dataclass(frozen=True)
class WarmupRule:
    kind: str  # steps | fraction
    steps: Optional[ValueRule] = None
    fraction: Optional[float] = None

    def text(self) -> str:
        return f"fraction {self.fraction:g}" if self.kind == "fraction" else f"steps {self.steps.text()}"


@dataclass(frozen=True)
class Rules:
    lr: Optional[LRRule] = None
    batch: Optional[BatchRule] = None
    warmup: Optional[WarmupRule] = None

    def __bool__(self) -> bool:
        return any((self.lr, self.batch, self.warmup))

    def owned_fields(self) -> tuple[str, ...]:
        """Config fields the rules set (refused elsewhere in the spec)."""
        out = []
        if self.lr is not None:
            out += OWNED["lr"]
            if self.lr.rule.kind == "mup":
                out += OWNED["mup"]
        if self.batch is not None:
            out += OWNED["batch"]
        if self.warmup is not None:
            out += OWNED["warmup"]
        return tuple(out)

    @property
    def lr_factors(self) -> tuple[float, ...]:
        return self.lr.factors if self.lr is not None else (1.0,)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _power_law(path: str, d: Any, allowed: tuple[str, ...], at: Any = None) -> PowerLaw:
    d = _mapping(path, d)
    if "coef" not in d:
        _fail(f"{path}.coef", "missing; a power law is coef * X^e, e.g. {coef: 0.3118, C: -0.125}")
    coef = _number(f"{path}.coef", d["coef"])
    exps = []
    for k, v in d.items():
        if k == "coef":
            continue
        if k not in VARIABLES:
            _fail(f"{path}.{k}", f"unknown variable; use {', '.join(f'{x} ({w})' for x, w in VARIABLES.items())}")
        if k not in allowed:
            _fail(f"{path}.{k}", f"the batch rule cannot depend on {k} ({VARIABLES[k]}): it follows from the "
                                 f"batch; use {', '.join(allowed)}")
        exps.append((str(k), _number(f"{path}.{k}", v, positive=False)))
    refs = []
    if at is not None:
        for k, v in _mapping(path.rsplit(".", 1)[0] + ".at", at).items():
            apath = path.rsplit(".", 1)[0] + f".at.{k}"
            if k not in dict(exps):
                _fail(apath, f"{k} is not a variable of the power law ({', '.join(x for x, _ in exps) or 'none'})")
            refs.append((str(k), _number(apath, v)))
    return PowerLaw(coef, tuple(exps), tuple(refs))


def _value_rule(path: str, v: Any, allowed: tuple[str, ...], *, allow_mup: bool, keys: tuple = ()) -> ValueRule:
    if not isinstance(v, dict):
        return ValueRule("constant", value=_number(path, v))
    forms = ("power_law", "mup") if allow_mup else ("power_law",)
    _only(path, v, (*forms, "at", *keys))
    given = [k for k in forms if k in v]
    if len(given) != 1:
        _fail(path, f"give exactly one of {', '.join(forms)} (or a number)")
    if given[0] == "power_law":
        return ValueRule("power_law", law=_power_law(f"{path}.power_law", v["power_law"], allowed, v.get("at")))
    if "at" in v:
        _fail(f"{path}.at", "only a power law takes reference values")
    m = _mapping(f"{path}.mup", v["mup"])
    _only(f"{path}.mup", m, ("lr", "base_width", "from"))
    if "base_width" not in m:
        _fail(f"{path}.mup.base_width", "missing; μP transfer needs the base model's width, e.g. {lr: 1.5e-2, base_width: 64}")
    bw = _number(f"{path}.mup.base_width", m["base_width"])
    if bw != int(bw):
        _fail(f"{path}.mup.base_width", f"must be a whole number of features, got {m['base_width']!r}")
    if ("lr" in m) == ("from" in m):
        _fail(f"{path}.mup", "give the base model's tuned lr, or from: SWEEP_DIR to take the best lr of the "
                             "base-width runs of an earlier sweep (not both)")
    if "from" in m:
        lr, source = tuned_lr(m["from"], int(bw), f"{path}.mup.from")
        return ValueRule("mup", value=lr, base_width=int(bw), source=source)
    return ValueRule("mup", value=_number(f"{path}.mup.lr", m["lr"]), base_width=int(bw))


def tuned_lr(sweep_dir: Any, base_width: int, path: str = "from") -> tuple[float, str]:
    """The best peak lr among the finished runs of width ``base_width`` in ``sweep_dir`` (the
    lowest loss; several seeds of one lr are averaged) and a description of where it came from.
    At its base width μP is SP exactly, so runs of either parametrization count."""
    from pathlib import Path

    from scaling import runs

    if not isinstance(sweep_dir, str) or not Path(sweep_dir).is_dir():
        _fail(path, f"{sweep_dir!r} is not a sweep directory; give the directory of the base-width LR sweep")
    try:
        df = runs.load(sweep_dir, allow_mixed=False)
    except Exception as err:  # a foreign or mixed-schema directory: one line, naming the field
        _fail(path, f"cannot read {sweep_dir}: {err}")
    need = {"d_model", "lr", "loss", "state"}
    if not need <= set(df.columns):
        _fail(path, f"{sweep_dir} has no runs with width, lr and loss")
    base = df[(df["state"] == "done") & (df["d_model"] == base_width)]
    if base.empty:
        _fail(path, f"{sweep_dir} has no finished run of width {base_width}; run the base-width LR sweep first")
    # the runs must be one model trained one way, differing only in lr (and seed): an average
    # over depths or budgets would tune nothing in particular (variants may differ only in the
    # parametrization, which at the base width changes nothing)
    same = [c for c in ("n_layers", "n_heads", "batch", "seq_len", "bucket", "steps", "experiment",
                        "warmup_steps", "warmup_fraction", "E", "G", "capacity") if c in base.columns]
    for c in same:
        values = base[c].dropna().astype(str).unique()
        if len(values) > 1:
            _fail(path, f"{sweep_dir}'s width-{base_width} runs differ in {c} ({', '.join(sorted(values))}), not only "
                        f"in lr; point it at a sweep of one base model over learning rates")
    by_lr = base.groupby("lr")["loss"].mean()
    if len(by_lr) < 3:
        _fail(path, f"{sweep_dir} has {len(by_lr)} learning rate(s) at width {base_width}; a tuned base needs a grid "
                    f"of at least 3")
    best = float(by_lr.idxmin())
    edge = " (the edge of its grid: widen it)" if best in (by_lr.index.min(), by_lr.index.max()) else ""
    return best, f"best of {len(by_lr)} lrs at width {base_width} in {sweep_dir}{edge}"


def _lr(path: str, v: Any) -> LRRule:
    if isinstance(v, dict) and "grid" in v:
        _only(path, v, ("grid",))
        g = _mapping(f"{path}.grid", v["grid"])
        _only(f"{path}.grid", g, ("factors", "of"))
        if "factors" not in g or "of" not in g:
            _fail(f"{path}.grid", "needs factors and of, e.g. {factors: [0.5, 1, 2], of: {power_law: {coef: 0.3, N: -0.25}}}")
        fs = g["factors"] if isinstance(g["factors"], list) else [g["factors"]]
        if not fs:
            _fail(f"{path}.grid.factors", "is empty; give at least one factor")
        factors = tuple(_number(f"{path}.grid.factors[{i}]", f) for i, f in enumerate(fs))
        if len(set(factors)) != len(factors):
            _fail(f"{path}.grid.factors", f"repeats a factor ({list(factors)}); list each once")
        return LRRule(_value_rule(f"{path}.grid.of", g["of"], tuple(VARIABLES), allow_mup=True), factors)
    return LRRule(_value_rule(path, v, tuple(VARIABLES), allow_mup=True))


def _batch(path: str, v: Any) -> BatchRule:
    if not isinstance(v, dict):
        _fail(path, f"a fixed batch is data.batch_size (sequences) in set:, not a rule; a batch rule is a power law, "
                    f"e.g. {{power_law: {{coef: 0.292, C: 0.3271}}, unit: tokens}} (got {v!r})")
    rule = _value_rule(path, v, BATCH_VARIABLES, allow_mup=False, keys=("unit", "multiple_of"))
    unit, multiple = "tokens", 2
    if isinstance(v, dict):
        unit = v.get("unit", "tokens")
        if unit not in ("tokens", "sequences"):
            _fail(f"{path}.unit", f"must be tokens or sequences, got {unit!r}")
        m = _number(f"{path}.multiple_of", v.get("multiple_of", 2))
        if m != int(m) or int(m) % 2:
            _fail(f"{path}.multiple_of", f"must be an even whole number of sequences (a statistics step splits the batch in two halves), "
                                         f"got {v.get('multiple_of')!r}")
        multiple = int(m)
    return BatchRule(rule, unit, multiple)


def _warmup(path: str, v: Any, strategy: str) -> WarmupRule:
    d = _mapping(path, v)
    _only(path, d, ("steps", "fraction"))
    if "steps" in d and "fraction" in d:
        _fail(path, "give steps (fixed) or fraction (scales with the run), not both")
    if "fraction" in d:
        if strategy == "wsd_branch":
            _fail(f"{path}.fraction", "WSD branching needs a fixed warmup (every branch shares its main run's "
                                      "warmup); use warmup: {steps: N}")
        f = _number(f"{path}.fraction", d["fraction"], positive=False)
        if not (0.0 <= f < 1.0):
            _fail(f"{path}.fraction", f"must be in [0, 1), got {d['fraction']!r}")
        return WarmupRule("fraction", fraction=f)
    if "steps" not in d:
        _fail(path, "give steps: N (fixed) or fraction: f (of the run)")
    s = d["steps"]
    if not isinstance(s, dict):
        n = _number(f"{path}.steps", s, positive=False)
        if n < 0 or n != int(n):
            _fail(f"{path}.steps", f"must be a whole number of steps >= 0, got {s!r}")
        return WarmupRule("steps", steps=ValueRule("constant", value=n))
    rule = _value_rule(f"{path}.steps", s, tuple(VARIABLES), allow_mup=False)
    budget_vars = sorted(set(rule.variables) & {"C", "D"})
    if strategy == "wsd_branch" and budget_vars:
        _fail(f"{path}.steps", f"depends on {', '.join(budget_vars)}, but WSD branching needs one warmup for every "
                               "budget of a shape; use N, N_active, W or B, or a number of steps")
    return WarmupRule("steps", steps=rule)


def parse(raw: Any, *, strategy: str = "independent", path: str = "sweep.rules") -> Rules:
    """Validate a spec's ``rules:`` mapping (ConfigError naming the field)."""
    if raw is None:
        return Rules()
    d = _mapping(path, raw)
    _only(path, d, TARGETS)
    return Rules(lr=_lr(f"{path}.lr", d["lr"]) if "lr" in d else None,
                 batch=_batch(f"{path}.batch", d["batch"]) if "batch" in d else None,
                 warmup=_warmup(f"{path}.warmup", d["warmup"], strategy) if "warmup" in d else None)


# --------------------------------------------------------------------------------------------
# Resolving one trial
# --------------------------------------------------------------------------------------------


def _checked(path: str, value: float, what: str, where: str) -> float:
    if not (math.isfinite(value) and value > 0):
        _fail(path, f"gives {what} = {value!r} for {where}; a rule must give a positive finite value for every trial")
    return value


def resolve(rules: Rules, cfg, *, budget_kind: str, budget: float, factor: float = 1.0,
            where: str = "this trial", path: str = "sweep.rules") -> tuple[dict, dict]:
    """The config overrides the rules give ``cfg`` (a ``TrainConfig`` with its model and budget
    set) and a description per target (``{"lr": "power_law 0.3118 * C^-0.125", ...}``).
    ``factor`` is the per-size grid's factor on the learning rate. ConfigError naming the rule
    for a non-positive or non-finite value."""
    from scaling import flops

    pc = flops.param_counts(cfg.model)
    fpt = float(flops.train_flops_per_token(cfg.model, cfg.data.seq_len))
    values = {"N": float(pc.non_embedding), "N_active": float(pc.active_non_embedding), "W": float(cfg.model.d_model)}
    values["C"] = float(budget) if budget_kind == "flops" else math.nan
    out: dict[str, Any] = {}
    said: dict[str, str] = {}
    seq = cfg.data.seq_len
    batch = cfg.data.batch_size
    if rules.batch is not None:
        if budget_kind != "flops" and "C" in rules.batch.rule.variables:
            _fail(f"{path}.batch", f"uses C, but {where} has a {budget_kind} budget; use N or W, or FLOP buckets")
        raw = _checked(f"{path}.batch", rules.batch.rule(values), "a batch", where)
        seqs = raw / seq if rules.batch.unit == "tokens" else raw
        m = rules.batch.multiple_of
        batch = int(math.floor(seqs / m + 0.5)) * m  # halves round up, as optim's schedule rounds
        if batch < m:
            _fail(f"{path}.batch", f"gives {raw:.4g} {rules.batch.unit} ({seqs:.3g} sequences of {seq}) for {where}, "
                                   f"which rounds below {m} sequences (multiple_of); raise the rule's coef or lower "
                                   f"multiple_of")
        out["data.batch_size"] = batch
        said["batch"] = f"{rules.batch.rule.text()} {rules.batch.unit} -> {batch} x {seq}"
    tokens_per_step = batch * seq
    steps = None
    if budget_kind in ("flops", "tokens"):
        import dataclasses

        sized = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))
        try:
            steps = int(flops.steps_for_budget(sized))
        except ConfigError:
            steps = 0
        if steps < 1:
            _fail(f"{path}.batch" if rules.batch is not None else path,
                  f"{where}: a batch of {batch} x {seq} tokens is more than the whole {budget_kind} budget "
                  f"({budget:.3g}); lower the batch or raise the budget")
    values["B"] = float(tokens_per_step)
    # D follows a batch schedule where there is one (B stays the first batch: the rule's anchor)
    values["D"] = float(flops.tokens_for_steps(sized, steps)) if steps is not None else math.nan
    if budget_kind != "flops":
        values["C"] = values["D"] * fpt
    if rules.warmup is not None:
        w = rules.warmup
        if w.kind == "fraction":
            out["optim.warmup_steps"] = None
            out["optim.warmup_fraction"] = w.fraction
        else:
            _need(w.steps.variables, values, f"{path}.warmup.steps", where)
            n = w.steps(values)
            if not (math.isfinite(n) and n >= 0):
                _fail(f"{path}.warmup.steps", f"gives {n!r} warmup steps for {where}; it must be >= 0")
            out["optim.warmup_steps"] = int(round(n))
        said["warmup"] = w.text()
    if rules.lr is not None:
        r = rules.lr.rule
        _need(r.variables, values, f"{path}.lr", where)
        lr = _checked(f"{path}.lr", r(values) * factor, "lr", where)
        out["optim.lr"] = lr
        if r.kind == "mup":
            out["model.parametrization"] = "mup"
            out["model.mup_base_width"] = r.base_width
        said["lr"] = f"grid x{factor:g} of {r.text()}" if rules.lr.is_grid else r.text()
    return out, said


def _need(variables, values, path: str, where: str) -> None:
    for x in variables:
        if not math.isfinite(values.get(x, math.nan)):
            _fail(path, f"uses {x} ({VARIABLES[x]}), which {where} does not know before it runs "
                        f"(an accelerator-seconds budget); use N, N_active, W or B")
