"""Sweep specs: a YAML file -> a validated, frozen ``SweepSpec`` -> a list of ``Trial``s.

A spec names an experiment family, base ``set:`` overrides, compute buckets (training FLOPs, or
accelerator-seconds as in the Languini Kitchen protocol), the model sizes of each bucket (an
IsoFLOP grid around a guessed optimum, explicit target parameter counts, or explicit shapes) and
grids over any config field (batch x LR, MoE experts x granularity, MoD capacity, seeds).
Every error names the spec field (``sweep.buckets[2].flops: ...``) and is raised before anything
runs. Example (see ``sweeps/*.yaml`` for all forms)::

    name: quickstart
    experiment: dense
    strategy: independent          # or wsd_branch (scaling/sweep/wsd.py), cbs_branch (scaling/sweep/cbs.py),
                                   # upcycle (scaling/sweep/upcycle.py)
    set: {data.seq_len: 64, data.batch_size: 16}
    sizes:                         # default for buckets without their own
      isoflop: {n: 5, ratio: 2, center: {params: 3.4e4, flops: 1e12, exponent: 0.5}}
    buckets: [3e11, 1e12, {flops: 3e12, sizes: [3e4, 1e5]}]
    grid: {lr: [1e-3, 3e-3]}
    seeds: [0]

Each trial's config has ``budget.flops`` = its bucket, so its tokens follow from the model's exact
FLOPs per token (``scaling.flops``) and its LR schedule ends at its own budget.

Over 400 lines: the spec grammar, each field with its own one-line error, in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from scaling import rules as rules_mod
from scaling.config import BudgetConfig, ConfigError, TrainConfig, config_hash
from scaling.overrides import apply_overrides, coerce_field
from scaling.rules import Rules

Strategy = Literal["independent", "wsd_branch", "cbs_branch", "upcycle"]
STRATEGIES = ("independent", "wsd_branch", "cbs_branch", "upcycle")

# Short grid keys -> config paths (any dotted TrainConfig path is accepted as well).
ALIASES = {
    "batch": "data.batch_size",
    "batch_size": "data.batch_size",
    "seq_len": "data.seq_len",
    "lr": "optim.lr",
    "experts": "model.moe.n_experts",
    "n_experts": "model.moe.n_experts",
    "granularity": "model.moe.granularity",
    "top_k": "model.moe.top_k",
    "capacity": "model.mod.capacity",
    "seed": "seed",
}
# Model fields that define a shape; a size rule owns them.
SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "head_dim", "n_kv_heads", "d_ff", "ffn_ratio")
TAG_NAMES = {v: k for k, v in ALIASES.items() if k in ("batch", "lr", "experts", "granularity", "capacity", "top_k", "seed")}


def _fail(path: str, msg: str):
    raise ConfigError(f"{path}: {msg}")


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IsoFlopGrid:
    """``n`` sizes (non-embedding params) spaced by ``ratio`` around a guessed optimum.

    Sizes snap to the ladder ``ratio**k`` so that neighbouring buckets share model shapes (which
    is what WSD branching saves on). The centre is ``center`` (params) if given, else the guessed
    law ``N_opt = params * (C / flops) ** exponent``, else Chinchilla's ``N = sqrt(C / (6 r))``
    with ``r = tokens_per_param``.
    """

    n: int = 5
    ratio: float = 2.0
    center: Optional[float] = None
    law: Optional[tuple[float, float, float]] = None  # (params, flops, exponent)
    tokens_per_param: float = 20.0

    def center_for(self, flops: float | None, path: str) -> float:
        if self.center is not None:
            return self.center
        if flops is None:
            _fail(path, "a tokens or accelerator-seconds bucket needs an explicit isoflop center (params)")
        if self.law is not None:
            p, c, e = self.law
            return p * (flops / c) ** e
        return math.sqrt(flops / (6.0 * self.tokens_per_param))

    def sizes_for(self, flops: float | None, path: str) -> tuple[float, ...]:
        k0 = math.log(self.center_for(flops, path)) / math.log(self.ratio)
        first = round(k0 - (self.n - 1) / 2)
        return tuple(float(self.ratio ** (first + j)) for j in range(self.n))


@dataclass(frozen=True)
class Sizes:
    """Model sizes of a bucket: ``isoflop`` grid, explicit ``params`` targets or ``shapes``."""

    kind: Literal["isoflop", "params", "shapes"]
    isoflop: Optional[IsoFlopGrid] = None
    params: tuple[float, ...] = ()
    shapes: tuple[tuple[tuple[str, Any], ...], ...] = ()  # model.* overrides per shape


@dataclass(frozen=True)
class Resources:
    """Per-trial resources for the slurm backend (submitit parameter names)."""

    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    gpus_per_node: int = 0
    mem_gb: Optional[float] = None
    timeout_min: int = 60
    partition: Optional[str] = None
    extra: tuple[tuple[str, Any], ...] = ()  # passed as slurm_additional_parameters

    @property
    def devices(self) -> int:
        return max(1, self.gpus_per_node) * self.nodes


BUCKET_KINDS = ("flops", "tokens", "accelerator_seconds")


@dataclass(frozen=True)
class Bucket:
    """A budget: training FLOPs (an IsoFLOP bucket), training tokens (a fixed-data comparison,
    e.g. learning-rate transfer across widths) or accelerator-seconds (Languini)."""

    kind: Literal["flops", "tokens", "accelerator_seconds"]
    value: float
    sizes: Optional[Sizes] = None  # None: the base model shape only
    resources: Optional[Resources] = None


@dataclass(frozen=True)
class Variant:
    """A named arm of the sweep (e.g. dense vs. MoD) with its own experiment and overrides."""

    name: str
    experiment: Optional[str] = None
    set: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class SweepSpec:
    name: str
    experiment: str
    buckets: tuple[Bucket, ...]
    strategy: Strategy = "independent"
    set: tuple[tuple[str, Any], ...] = ()
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    seeds: tuple[int, ...] = (0,)
    variants: tuple[Variant, ...] = (Variant("default"),)
    resources: Resources = field(default_factory=Resources)
    description: str = ""
    rules: Rules = field(default_factory=Rules)  # per-trial lr / batch / warmup (scaling.rules)
    raw: Any = None  # the YAML mapping as loaded (copied into the sweep manifest)
    cbs: Any = None  # strategy cbs_branch: the branch points and factors (scaling.sweep.cbs.CbsSpec)
    upcycle: Any = None  # strategy upcycle: D1 x D2 and the MoE (scaling.sweep.upcycle.UpcycleSpec)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_TOP_KEYS = ("name", "experiment", "description", "strategy", "set", "buckets", "sizes", "grid", "seeds", "variants", "resources",
             "rules", "cbs", "upcycle")


def load(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec. ``path`` is a file, or the name of a shipped spec
    (``quickstart`` -> ``sweeps/quickstart.yaml``)."""
    p = resolve_path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep: {p} is not valid YAML ({str(err).splitlines()[0]})") from None
    return parse(raw, default_name=p.stem)


def shipped_dir() -> Path:
    """Directory of the shipped specs: ``sweeps/`` of a source checkout (editable install), else
    the copy a regular ``pip install`` puts in ``<prefix>/share/scaling/sweeps`` (pyproject
    ``data-files``)."""
    repo = Path(__file__).resolve().parents[2] / "sweeps"
    if repo.is_dir():
        return repo
    return Path(sys.prefix) / "share" / "scaling" / "sweeps"


def resolve_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    for cand in (shipped_dir() / p.name, shipped_dir() / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    names = ", ".join(sorted(q.stem for q in shipped_dir().glob("*.yaml")))
    raise ConfigError(f"sweep: spec file {str(path)!r} not found; give a path or a shipped spec ({names})")


def _number(path: str, v: Any, *, positive: bool = True) -> float:
    if isinstance(v, bool):
        _fail(path, f"must be a number, got {v!r}")
    try:
        f = float(v)  # YAML reads 1e12 (no dot) as a string
    except (TypeError, ValueError):
        _fail(path, f"must be a number, got {v!r}")
    if not math.isfinite(f) or (positive and f <= 0):
        _fail(path, f"must be a positive number, got {v!r}")
    return f


def _int(path: str, v: Any, *, minimum: int = 1) -> int:
    f = _number(path, v, positive=False)
    if f != int(f) or f < minimum:
        _fail(path, f"must be an integer >= {minimum}, got {v!r}")
    return int(f)


def number_list(path: str, v: Any, *, whole: bool) -> tuple:
    """A YAML list of numbers (whole numbers: ints) for a strategy's own mapping (``sweep.cbs``,
    ``sweep.upcycle``); ConfigError naming ``path`` or ``path[i]``."""
    if not isinstance(v, list):
        _fail(path, f"give a list, got {v!r}")
    out = []
    for i, x in enumerate(v):
        try:
            f = math.nan if isinstance(x, bool) else float(x)
        except (TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f) or (whole and f != int(f)):
            _fail(f"{path}[{i}]", f"must be a {'whole ' if whole else ''}number, got {x!r}")
        out.append(int(f) if whole else f)
    return tuple(out)


def _mapping(path: str, v: Any) -> dict:
    if not isinstance(v, dict):
        _fail(path, f"expects a mapping, got {v!r}")
    return v


def _list(path: str, v: Any, *, nonempty: bool = True) -> list:
    if not isinstance(v, list):
        v = [v]
    if nonempty and not v:
        _fail(path, "is empty; give at least one value")
    return v


def _check_keys(path: str, d: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(map(str, d)) - set(known))
    if unknown:
        _fail(f"{path}.{unknown[0]}" if path else unknown[0], f"unknown field; known fields: {', '.join(known)}")


MAPPING_VALUES = ("data.mixture",)  # fields whose value is written as a mapping


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """``{model: {d_model: 32}}`` and ``{model.d_model: 32}`` both give ``[("model.d_model", 32)]``;
    a mapping under ``model.moe`` stays whole only when it is empty (``{}`` = switch on); a mapping
    that is a field's value (``data.mixture: {source: weight}``) stays whole."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in MAPPING_VALUES:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, "on" if isinstance(v, dict) and key not in MAPPING_VALUES else v))
    return out


def _parse_sizes(path: str, v: Any) -> Sizes:
    if isinstance(v, list):
        if not v:
            _fail(path, "is empty; give target parameter counts, e.g. [1e4, 3e4]")
        if all(isinstance(x, dict) for x in v):
            shapes = []
            for i, s in enumerate(v):
                items = tuple(sorted((k if k.startswith("model.") else f"model.{k}", x) for k, x in _flatten(s)))
                if not items:
                    _fail(f"{path}[{i}]", "empty shape; give e.g. {d_model: 32, n_layers: 2}")
                shapes.append(items)
            return Sizes("shapes", shapes=tuple(shapes))
        return Sizes("params", params=tuple(_number(f"{path}[{i}]", x) for i, x in enumerate(v)))
    d = _mapping(path, v)
    if set(d) == {"shapes"}:
        return _parse_sizes(path + ".shapes", d["shapes"] if d["shapes"] else [])
    if set(d) == {"params"}:
        return _parse_sizes(path + ".params", d["params"] if d["params"] else [])
    _check_keys(path, d, ("isoflop", "params", "shapes"))
    iso = _mapping(path + ".isoflop", d.get("isoflop"))
    ip = path + ".isoflop"
    _check_keys(ip, iso, ("n", "ratio", "center", "tokens_per_param"))
    n = _int(ip + ".n", iso.get("n", 5))
    ratio = _number(ip + ".ratio", iso.get("ratio", 2.0))
    if ratio <= 1:
        _fail(ip + ".ratio", f"must be > 1, got {ratio}")
    center, law = None, None
    c = iso.get("center")
    if isinstance(c, dict):
        _check_keys(ip + ".center", c, ("params", "flops", "exponent"))
        for k in ("params", "flops"):
            if k not in c:
                _fail(f"{ip}.center.{k}", "missing; a centre law needs params, flops and exponent (default 0.5)")
        law = (_number(ip + ".center.params", c["params"]), _number(ip + ".center.flops", c["flops"]),
               _number(ip + ".center.exponent", c.get("exponent", 0.5)))
    elif c is not None:
        center = _number(ip + ".center", c)
    tpp = _number(ip + ".tokens_per_param", iso.get("tokens_per_param", 20.0))
    return Sizes("isoflop", isoflop=IsoFlopGrid(n=n, ratio=ratio, center=center, law=law, tokens_per_param=tpp))


# Values that reach submitit become lines of a generated sbatch script: a newline would start
# a shell command there, so control characters are refused at spec load (and so by --plan).
_SLURM_PARTITION = re.compile(r"[A-Za-z0-9_.,-]+")
_SLURM_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _slurm_partition(path: str, v: Any) -> str:
    if not isinstance(v, str) or not _SLURM_PARTITION.fullmatch(v):
        _fail(path, f"a SLURM partition is letters, digits and _.,- only (comma-separated names), got {v!r}")
    return v


def _slurm_key(path: str, k: Any) -> str:
    if not isinstance(k, str) or not _SLURM_KEY.fullmatch(k):
        _fail(path, f"{k!r} is not a SLURM option name (letters, digits, _ and -, e.g. constraint)")
    if k in RESERVED_SLURM:
        _fail(f"{path}.{k}", f"is set by the sweep runner itself (logs, arrays, signals); remove it")
    return k


def slurm_value(path: str, v: Any) -> Any:
    if isinstance(v, bool) or isinstance(v, (int, float)):
        return v
    if not isinstance(v, str):
        _fail(path, f"must be a string or a number, got {type(v).__name__}")
    if _CONTROL.search(v):
        _fail(path, f"must be one line without control characters (it becomes an #SBATCH line), got {v!r}")
    return v


# sbatch options submitit sets itself (logs, arrays, signals): overriding them breaks the runner
RESERVED_SLURM = ("output", "error", "array", "signal", "open-mode", "open_mode", "job-name", "job_name", "wrap")


def check_resources(res: "Resources", path: str = "resources") -> None:
    """ConfigError unless every value of ``res`` that reaches an #SBATCH line is safe."""
    if res.partition is not None:
        _slurm_partition(f"{path}.partition", res.partition)
    for k, v in res.extra:
        _slurm_key(f"{path}.extra", k)
        slurm_value(f"{path}.extra.{k}", v)


def _parse_resources(path: str, v: Any, base: Resources | None = None) -> Resources:
    d = _mapping(path, v)
    names = tuple(f.name for f in dataclasses.fields(Resources))
    _check_keys(path, d, names)
    kw = dataclasses.asdict(base or Resources())
    for k, x in d.items():
        if k in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            kw[k] = _int(f"{path}.{k}", x)
        elif k == "gpus_per_node":
            kw[k] = _int(f"{path}.{k}", x, minimum=0)
        elif k == "mem_gb":
            kw[k] = _number(f"{path}.{k}", x)
        elif k == "partition":
            kw[k] = _slurm_partition(f"{path}.{k}", x)
        elif k == "extra":
            kw[k] = tuple(sorted((_slurm_key(f"{path}.extra", e), slurm_value(f"{path}.extra.{e}", y))
                                 for e, y in _mapping(f"{path}.extra", x).items()))
    kw["extra"] = tuple(tuple(e) for e in kw["extra"])
    return Resources(**kw)


def _parse_bucket(path: str, v: Any, default_sizes: Sizes | None, resources: Resources) -> Bucket:
    if not isinstance(v, dict):
        return Bucket("flops", _number(path, v), default_sizes, resources)
    _check_keys(path, v, (*BUCKET_KINDS, "sizes", "resources"))
    kinds = [k for k in BUCKET_KINDS if k in v]
    if len(kinds) != 1:
        _fail(path, "give exactly one of flops, tokens or accelerator_seconds")
    sizes = _parse_sizes(path + ".sizes", v["sizes"]) if "sizes" in v else default_sizes
    res = _parse_resources(path + ".resources", v["resources"], resources) if "resources" in v else resources
    value = _int(f"{path}.tokens", v["tokens"]) if kinds[0] == "tokens" else _number(f"{path}.{kinds[0]}", v[kinds[0]])
    return Bucket(kinds[0], value, sizes, res)


def parse(raw: Any, *, default_name: str = "sweep") -> SweepSpec:
    """Validate a loaded YAML mapping into a ``SweepSpec`` (ConfigError naming the field)."""
    import experiments

    d = _mapping("sweep", raw)
    _check_keys("sweep", d, _TOP_KEYS)
    name = str(d.get("name", default_name))
    if not name or "/" in name or name.startswith("."):
        _fail("sweep.name", f"must be a plain directory name, got {name!r}")
    if "experiment" not in d:
        _fail("sweep.experiment", f"missing; choose one of {', '.join(experiments.names())}")
    experiment = str(d["experiment"])
    if experiment not in experiments.names():
        _fail("sweep.experiment", f"unknown experiment {experiment!r}; choose one of {', '.join(experiments.names())}")
    strategy = d.get("strategy", "independent")
    if strategy not in STRATEGIES:
        _fail("sweep.strategy", f"must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    base_set = tuple(_flatten(_mapping("sweep.set", d.get("set") or {})))
    cbs_spec = None
    if strategy == "cbs_branch":
        from scaling.sweep import cbs

        cbs_spec = cbs.parse(d.get("cbs"))
    elif "cbs" in d:
        _fail("sweep.cbs", "applies to strategy: cbs_branch only; remove it or set the strategy")
    upcycle_spec = None
    if strategy == "upcycle":
        from scaling.sweep import upcycle

        upcycle_spec = upcycle.parse(d.get("upcycle"))
    elif "upcycle" in d:
        _fail("sweep.upcycle", "applies to strategy: upcycle only; remove it or set the strategy")
    resources = _parse_resources("sweep.resources", d["resources"]) if "resources" in d else Resources()
    default_sizes = _parse_sizes("sweep.sizes", d["sizes"]) if "sizes" in d else None
    if "buckets" not in d:
        _fail("sweep.buckets", "missing; give compute budgets, e.g. buckets: [1e11, 1e12]")
    buckets = tuple(_parse_bucket(f"sweep.buckets[{i}]", b, default_sizes, resources)
                    for i, b in enumerate(_list("sweep.buckets", d["buckets"])))
    grid = []
    for k, vals in _mapping("sweep.grid", d.get("grid") or {}).items():
        vals = _list(f"sweep.grid.{k}", vals)
        field_path = ALIASES.get(str(k), str(k))
        # YAML reads 1e-3 as a string: give every value the field's type before comparing or
        # hashing, so 1e-3 and 0.001 are one value (and the lr column stays numeric)
        try:
            typed = [coerce_field(field_path, v) for v in vals]
        except ConfigError as err:
            _fail(f"sweep.grid.{k}", str(err))
        if len(set(map(repr, typed))) != len(typed):
            dup = next(v for i, v in enumerate(typed) if repr(v) in map(repr, typed[:i]))
            _fail(f"sweep.grid.{k}", f"repeats a value ({vals} are {typed}: {dup!r} twice); list each value once")
        vals = typed
        grid.append((str(k), tuple(vals)))
    seeds = tuple(_int(f"sweep.seeds[{i}]", s, minimum=0) for i, s in enumerate(_list("sweep.seeds", d.get("seeds", [0]))))
    if len(set(seeds)) != len(seeds):
        _fail("sweep.seeds", f"repeats a seed ({list(seeds)}); list each seed once")
    variants = (Variant("default"),)
    if "variants" in d:
        vd = _mapping("sweep.variants", d["variants"])
        if not vd:
            _fail("sweep.variants", "is empty; remove it or name at least one variant")
        variants = []
        for vname, vv in vd.items():
            vp = f"sweep.variants.{vname}"
            vv = _mapping(vp, vv or {})
            _check_keys(vp, vv, ("experiment", "set"))
            vexp = vv.get("experiment")
            if vexp is not None and vexp not in experiments.names():
                _fail(vp + ".experiment", f"unknown experiment {vexp!r}; choose one of {', '.join(experiments.names())}")
            variants.append(Variant(str(vname), vexp, tuple(_flatten(_mapping(vp + ".set", vv.get("set") or {})))))
        variants = tuple(variants)
    rules = rules_mod.parse(d.get("rules"), strategy=strategy)
    _check_rule_owned(rules, base_set, grid, variants, strategy)
    spec = SweepSpec(name=name, experiment=experiment, buckets=buckets, strategy=strategy, set=base_set,
                     grid=tuple(grid), seeds=seeds, variants=variants, resources=resources,
                     description=str(d.get("description", "")), rules=rules, raw=d, cbs=cbs_spec,
                     upcycle=upcycle_spec)
    trials(spec)  # resolve everything now: every error surfaces before anything runs
    return spec


def _check_rule_owned(rules: Rules, base_set, grid, variants, strategy: str) -> None:
    """A field set by a rule may not also be set by ``set:``, a grid or a variant."""
    owned = rules.owned_fields()
    if not owned:
        return
    target_of = {f: t for t, fs in rules_mod.OWNED.items() for f in fs}
    places = [("sweep.set", k) for k, _ in base_set]
    places += [(f"sweep.grid.{k}", ALIASES.get(k, k)) for k, _ in grid]
    places += [(f"sweep.variants.{v.name}.set", k) for v in variants for k, _ in v.set]
    for where, key in places:
        if key in owned:
            rule = "lr" if target_of[key] == "mup" else target_of[key]
            hint = " (a per-size grid is rules.lr: {grid: {factors: [...], of: RULE}})" if rule == "lr" else ""
            _fail(where if where.startswith("sweep.grid") else f"{where}.{key}",
                  f"{key} is set by sweep.rules.{rule}; remove one of them{hint}")
    if strategy == "wsd_branch":
        for target in ("lr", "batch"):
            r = getattr(rules, target)
            budget_vars = sorted(set(r.rule.variables) & {"C", "D"}) if r is not None else []
            if budget_vars:
                _fail(f"sweep.rules.{target}", f"depends on {', '.join(budget_vars)}, but wsd_branch shares one run "
                                               "across budgets; use N or W, or strategy: independent")


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One training run of the sweep.

    ``id`` is ``config_hash(config)``. ``role`` is ``independent``, or under WSD branching
    ``main`` (the warmup-stable run to the shape's largest budget) or ``branch`` (a cooldown
    started from the main run's checkpoint at ``branch_step``; ``config.init_from`` is then
    ``"<main id>@<step>"``, resolved to the main run's directory at launch).
    """

    id: str
    config: TrainConfig
    bucket: int  # index into spec.buckets
    budget_kind: str  # flops | tokens | accelerator_seconds
    budget: float  # FLOPs, tokens or accelerator-seconds
    variant: str
    target_params: Optional[float]  # size-rule target (non-embedding params), None for shapes
    tags: tuple[tuple[str, Any], ...]  # grid values, e.g. (("lr", 3e-3), ("seed", 0))
    steps: Optional[int]  # training steps (None for seconds budgets)
    flops_per_step: Optional[float]
    planned_flops: Optional[float]  # FLOPs this trial itself computes (a branch: its cooldown)
    group: str  # everything but the budget: trials sharing it share a WSD main run
    resources: Resources = field(default_factory=Resources)
    role: str = "independent"
    main: Optional[str] = None
    branch_step: Optional[int] = None
    rules: tuple[tuple[str, str], ...] = ()  # (target, the rule that set it), e.g. ("lr", "power_law ...")

    def describe(self) -> dict:
        """Flat, JSON-friendly description (manifest rows, ``--only`` matching, store columns)."""
        m = self.config.model
        d = {"trial_id": self.id, "name": self.config.name, "bucket": self.budget, "bucket_kind": self.budget_kind,
             "bucket_index": self.bucket, "variant": self.variant, "target_params": self.target_params,
             "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "batch": self.config.data.batch_size,
             "seq_len": self.config.data.seq_len, "lr": self.config.optim.lr, "seed": self.config.seed,
             "E": m.moe.n_experts if m.moe else None, "G": m.moe.granularity if m.moe else None,
             "capacity": m.mod.capacity if m.mod else None, "steps": self.steps, "planned_flops": self.planned_flops,
             "role": self.role, "main": self.main, "branch_step": self.branch_step, "group": self.group,
             "experiment": self.config.experiment, "warmup_steps": self.config.optim.warmup_steps,
             "warmup_fraction": self.config.optim.warmup_fraction, "parametrization": m.parametrization,
             "rules": "; ".join(f"{k}: {v}" for k, v in self.rules) or None}
        d.update({k: v for k, v in self.tags})
        return d


@functools.lru_cache(maxsize=4096)
def _sized(experiment: str, n: float, base):
    """The family's size rule ``(n_non_embedding, base_model) -> ModelConfig`` (memoised: a grid
    asks for the same few sizes in many buckets): the experiment's own ``model_for_params`` when
    it has one, else ``scaling.models.family.model_for_params``."""
    import experiments

    fn = getattr(experiments.load(experiment), "model_for_params", None)
    if fn is None:
        from scaling.models.family import model_for_params

        return model_for_params(n, base)
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) >= 2 or "base" in inspect.signature(fn).parameters:
        return fn(n, base)
    return _keep_non_shape(fn(n), base)


def _model_sizer(experiment: str):
    return lambda n, base: _sized(experiment, float(n), base)


def _keep_non_shape(sized, base):
    """A size rule that ignores the base model only decides the shape fields."""
    return dataclasses.replace(base, **{k: getattr(sized, k) for k in SHAPE_KEYS})


def _tag(key: str) -> str:
    """Column name of a grid key: the short name (lr, batch, experts -> E, ...) or the key."""
    path = ALIASES.get(key, key)
    return TAG_NAMES.get(path, key)


def _short(x: float) -> str:
    return f"{x:.3g}".replace("+", "")


def _apply(path: str, cfg: TrainConfig, items) -> TrainConfig:
    try:
        return apply_overrides(cfg, dict(items) if not isinstance(items, dict) else items)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def flops_per_step(cfg: TrainConfig) -> float:
    """Training FLOPs of one optimizer step (forward + backward, exact count)."""
    from scaling import flops

    return float(flops.train_flops_per_token(cfg.model, cfg.data.seq_len)) * cfg.tokens_per_step


def _independent(spec: SweepSpec) -> list[Trial]:
    import experiments

    out: list[Trial] = []
    seen: dict[str, str] = {}
    grid_keys = [k for k, _ in spec.grid]
    for variant in spec.variants:
        exp = variant.experiment or spec.experiment
        vpath = "sweep.set" if variant.name == "default" else f"sweep.variants.{variant.name}"
        base = _apply("sweep.set", experiments.get(exp), spec.set)
        base = _apply(vpath + ".set", base, variant.set)
        base = dataclasses.replace(base, experiment=exp, progress=False)
        sizer = None
        for point in itertools.product(*[vals for _, vals in spec.grid]):
            gitems = list(zip(grid_keys, point))
            gpath = "sweep.grid." + ",".join(f"{k}={v}" for k, v in gitems) if gitems else "sweep.grid"
            gcfg = _apply(gpath, base, [(ALIASES.get(k, k), v) for k, v in gitems])
            for seed in spec.seeds:
                scfg = dataclasses.replace(gcfg, seed=seed)
                for bi, bucket in enumerate(spec.buckets):
                    bpath = f"sweep.buckets[{bi}]"
                    if bucket.sizes is None:
                        models = [(None, scfg.model, bpath)]
                    elif bucket.sizes.kind == "shapes":
                        models = [(None, _apply(f"{bpath}.sizes[{i}]", scfg, s).model, f"{bpath}.sizes[{i}]")
                                  for i, s in enumerate(bucket.sizes.shapes)]
                    else:
                        flops_v = bucket.value if bucket.kind == "flops" else None
                        targets = (bucket.sizes.params if bucket.sizes.kind == "params"
                                   else bucket.sizes.isoflop.sizes_for(flops_v, bpath + ".sizes.isoflop.center"))
                        sizer = sizer or _model_sizer(exp)
                        models = []
                        for i, n in enumerate(targets):
                            try:
                                models.append((n, sizer(n, scfg.model), f"{bpath}.sizes[{i}]"))
                            except ConfigError as err:
                                raise ConfigError(f"{bpath}.sizes[{i}] ({n:.3g} params): {err}") from None
                    for target, model, mpath in models:
                        for factor in spec.rules.lr_factors:
                            out.append(_make_trial(spec, variant.name, scfg, model, bi, bucket, target, gitems, seed,
                                                   mpath, seen, factor))
    if not out:
        _fail("sweep", "the grid is empty; give at least one bucket, size, grid value and seed")
    return out


def _with_rules(spec, cfg: TrainConfig, bucket, factor: float, where: str, sized: bool) -> tuple[TrainConfig, tuple, list]:
    """``cfg`` with the spec's rules applied; the rule descriptions; the extra grid tag.
    ``sized``: the model came from the family's size rule (μP then takes that rule's head
    dimension at the base width)."""
    if not spec.rules:
        return cfg, (), []
    overrides, said = rules_mod.resolve(spec.rules, cfg, budget_kind=bucket.kind, budget=bucket.value, factor=factor,
                                        where=where)
    if sized and overrides.get("model.parametrization") == "mup" and cfg.model.mup_base_head_dim is None:
        from scaling.models.family import head_dim_for

        overrides["model.mup_base_head_dim"] = head_dim_for(overrides["model.mup_base_width"])
    try:
        cfg = apply_overrides(cfg, overrides)
    except ConfigError as err:
        raise ConfigError(f"sweep.rules ({where}): {err}") from None
    tags = [("lr_factor", factor)] if spec.rules.lr is not None and spec.rules.lr.is_grid else []
    return cfg, tuple(said.items()), tags


def _make_trial(spec, variant, scfg, model, bi, bucket, target, gitems, seed, mpath, seen, factor=1.0) -> Trial:
    try:
        cfg = dataclasses.replace(scfg, model=model)
    except ConfigError as err:
        raise ConfigError(f"{mpath}: {err}") from None
    # (a direct replace: apply_overrides re-reads type hints and costs ~10 ms a call)
    if bucket.kind == "flops":
        cfg = dataclasses.replace(cfg, budget=BudgetConfig(flops=bucket.value))
    elif bucket.kind == "tokens":
        cfg = dataclasses.replace(cfg, budget=BudgetConfig(flops=None, tokens=int(bucket.value)))
    else:
        cfg = dataclasses.replace(cfg, budget=BudgetConfig(flops=None, seconds=bucket.value / bucket.resources.devices))
    shape = f"d{model.d_model}L{model.n_layers}"
    cfg, rule_text, rule_tags = _with_rules(spec, cfg, bucket, factor, f"{mpath} ({shape}, bucket {bucket.value:.3g})",
                                            sized=target is not None)
    gitems = list(gitems) + rule_tags
    tag_str = "_".join(f"{_tag(k)}{v}" for k, v in gitems)
    group_name = "_".join(x for x in (spec.name, variant if variant != "default" else "", shape, tag_str, f"s{seed}") if x)
    letter = {"flops": "C", "tokens": "D", "accelerator_seconds": "C"}[bucket.kind]
    cfg = dataclasses.replace(cfg, name=f"{group_name}_{letter}{_short(bucket.value)}")
    steps = fps = planned = None
    if bucket.kind in ("flops", "tokens"):
        fps = flops_per_step(cfg)
        per_step = fps if bucket.kind == "flops" else cfg.tokens_per_step
        if bucket.value < per_step:
            _fail(f"sweep.buckets[{bi}].{bucket.kind}", f"{bucket.value:.3g} {bucket.kind} is less than one step of {shape} "
                  f"(batch {cfg.data.batch_size} x seq {cfg.data.seq_len}: {per_step:.3g} {bucket.kind}); "
                  "raise the budget or shrink the model/batch")
        from scaling import flops

        steps = int(flops.steps_for_budget(cfg))
        planned = steps * fps if not cfg.data.batch_schedule else (
            flops.tokens_for_steps(cfg, steps) * fps / cfg.tokens_per_step)
    group = config_hash(dataclasses.replace(cfg, name=group_name, budget=BudgetConfig(flops=1.0)))
    tid = config_hash(cfg)
    where = f"{mpath} ({shape}, {tag_str or 'no grid'}, seed {seed}, variant {variant})"
    if tid in seen:
        _fail(where, f"duplicates the trial from {seen[tid]} (same resolved config {tid}); "
              "remove one, widen the isoflop ratio or list distinct sizes")
    seen[tid] = where
    tags = tuple((_tag(k), v) for k, v in gitems)
    return Trial(id=tid, config=cfg, bucket=bi, budget_kind=bucket.kind, budget=bucket.value, variant=variant,
                 target_params=target, tags=tags, steps=steps, flops_per_step=fps, planned_flops=planned,
                 group=group, resources=bucket.resources, rules=rule_text)


def trials(spec: SweepSpec, strategy: str | None = None) -> list[Trial]:
    """All trials of the sweep under ``strategy`` (default: the spec's own).

    Raises ConfigError naming the spec field for an empty grid, a budget smaller than one step,
    two grid points that resolve to the same config, or an invalid override.
    """
    strategy = strategy or spec.strategy
    indep = _independent(spec)
    if strategy == "independent":
        return indep
    if strategy == "cbs_branch":
        from scaling.sweep import cbs

        if spec.cbs is None:
            _fail("sweep.cbs", "strategy cbs_branch needs a cbs: mapping in the spec")
        return cbs.branch(indep, spec.cbs)
    if strategy == "upcycle":
        from scaling.sweep import upcycle

        if spec.upcycle is None:
            _fail("sweep.upcycle", "strategy upcycle needs an upcycle: mapping in the spec")
        return upcycle.branch(indep, spec.upcycle)
    from scaling.sweep import wsd

    return wsd.branch(indep)


def select(trial_list: list[Trial], only: str | None) -> list[Trial]:
    """Trials matching ``--only``: comma-separated ``key=value`` terms (all must match; keys are
    ``describe()`` fields such as bucket, lr, batch, d_model, seed, variant, role) or plain
    substrings of the trial id / name. WSD branches pull in their main run."""
    if not only:
        return trial_list
    terms = [t.strip() for t in only.split(",") if t.strip()]

    def match(t: Trial) -> bool:
        d = t.describe()
        for term in terms:
            if "=" in term:
                k, v = term.split("=", 1)
                if k not in d:
                    raise ConfigError(f"--only {term}: unknown key {k!r}; use one of {', '.join(sorted(d))}")
                have = d[k]
                try:
                    ok = have is not None and math.isclose(float(have), float(v), rel_tol=1e-9)
                except (TypeError, ValueError):
                    ok = str(have) == v
                if not ok:
                    return False
            elif term not in t.id and term not in t.config.name:
                return False
        return True

    chosen = {t.id for t in trial_list if match(t)}
    if not chosen:
        raise ConfigError(f"--only {only}: matches no trial")
    chosen |= {t.main for t in trial_list if t.id in chosen and t.main}
    return [t for t in trial_list if t.id in chosen]
