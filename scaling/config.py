"""Frozen, validated run configuration.

Every config is a frozen dataclass validated in ``__post_init__``; a bad value raises
``ConfigError`` whose message names the field (``model.d_model``) and the fix. The CLI turns a
``ConfigError`` into a one-line message and exit status 2.

A ``TrainConfig`` round-trips through JSON (``to_json`` / ``from_json``) and takes
``--set a.b=value`` overrides with the value parsed and type-checked against the field's type
(``scaling.overrides``).

Over 400 lines: every section of the schema a user writes, with its checks, in one
file, so the whole of what a run can be told is read in one place.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from scaling.errors import ConfigError  # noqa: F401  (re-exported: the config's own error type)


def _fail(path: str, msg: str) -> None:
    raise ConfigError(f"{path}: {msg}")


def _positive(path: str, value: float | int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not (value > 0) or (isinstance(value, float) and not math.isfinite(value)):
        _fail(path, f"must be a positive number, got {value!r}")


def _one_of(path: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(path, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

RouterKind = Literal["token_choice", "expert_choice", "dropless"]


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLP (replaces the dense MLP in every ``every``-th block).

    Fine-grained experts follow Krajewski et al. 2024: ``n_experts`` is the expansion rate E
    (experts of the dense MLP's size); with granularity G the layer holds ``n_experts * G``
    experts of hidden size ``d_ff * expert_size / G`` and routes each token to ``top_k * G`` of
    them, so active parameters do not change with G.
    """

    n_experts: int = 8
    top_k: int = 2
    router: RouterKind = "token_choice"
    capacity_factor: float = 1.25
    granularity: int = 1
    expert_size: float = 1.0  # expert hidden size relative to the dense d_ff, before / G
    n_shared_experts: int = 0
    every: int = 1  # MoE in blocks where (layer_index + 1) % every == 0
    aux_loss_weight: float = 1e-2
    z_loss_weight: float = 1e-3
    backend: Literal["auto", "einsum", "ragged_dot"] = "auto"  # grouped matmul for dropless

    def __post_init__(self):
        for name in ("n_experts", "top_k", "granularity", "every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                _fail(f"model.moe.{name}", f"must be an integer >= 1, got {v!r}")
        if self.top_k > self.n_experts:
            _fail("model.moe.top_k", f"top_k={self.top_k} exceeds n_experts={self.n_experts}; lower top_k or add experts")
        _one_of("model.moe.router", self.router, ("token_choice", "expert_choice", "dropless"))
        _positive("model.moe.capacity_factor", self.capacity_factor)
        _positive("model.moe.expert_size", self.expert_size)
        if self.n_shared_experts < 0:
            _fail("model.moe.n_shared_experts", "must be >= 0")
        for name in ("aux_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                _fail(f"model.moe.{name}", "must be >= 0")
        _one_of("model.moe.backend", self.backend, ("auto", "einsum", "ragged_dot"))

    @property
    def n_routed(self) -> int:
        """Number of routed experts actually held: E * G."""
        return self.n_experts * self.granularity

    @property
    def k_routed(self) -> int:
        """Experts each token is sent to: top_k * G."""
        return self.top_k * self.granularity


@dataclass(frozen=True)
class MoDConfig:
    """Mixture-of-depths (Raposo et al. 2024): in every ``every``-th block only the top
    ``capacity`` fraction of each sequence's tokens pass through attention + MLP."""

    capacity: float = 0.125
    every: int = 2  # routed blocks where (layer_index + 1) % every == 0
    router_scale: bool = True  # multiply the block output by the router weight (so it learns)
    causal_aux: Literal["aux_loss", "predictor", "none"] = "aux_loss"
    aux_loss_weight: float = 1e-2

    def __post_init__(self):
        if not (0.0 < self.capacity <= 1.0):
            _fail("model.mod.capacity", f"must be in (0, 1], got {self.capacity!r}")
        if not isinstance(self.every, int) or self.every < 1:
            _fail("model.mod.every", f"must be an integer >= 1, got {self.every!r}")
        _one_of("model.mod.causal_aux", self.causal_aux, ("aux_loss", "predictor", "none"))
        if self.aux_loss_weight < 0:
            _fail("model.mod.aux_loss_weight", "must be >= 0")


class BlockSections(tuple):
    """``model.blocks``: the config sections of registered block kinds (``scaling.blocks``)
    other than moe/mod, as ``((name, section), ...)`` sorted by name (hashable, so a
    ``ModelConfig`` stays a static jit argument); serialised as ``{name: {field: value}}``."""

    def __new__(cls, items=()):
        pairs = tuple(sorted(dict(items).items()))
        for name, sec in pairs:  # a dict only as dataclasses.asdict rebuilds it
            if not isinstance(name, str) or not (dataclasses.is_dataclass(sec) or isinstance(sec, dict)) or isinstance(sec, type):
                raise ConfigError(f"model.blocks.{name}: expects a block kind's section of settings, got {sec!r}")
        return super().__new__(cls, pairs)

    def as_dict(self) -> dict:
        return {name: sec if isinstance(sec, dict) else dataclasses.asdict(sec) for name, sec in self}


@dataclass(frozen=True)
class PrecisionConfig:
    """``model.precision``: fake-quantized matmul inputs (``scaling.models.quant``) in the
    attention projections and the dense MLP. Formats (``scaling.formats``): ``none``, ``bf16``,
    ``e4m3``, ``e5m2``, ``e3m2``, ``e2m3``, ``e2m1`` or ``eXmY`` (at most 16 bits). ``weights``
    and ``acts`` are the matmul operands, ``grads`` the gradient flowing into each matmul's
    backward pass (straight-through estimator); ``block``: elements per power-of-two scale along
    the contracted axes (None: one scale per tensor)."""

    weights: str = "none"
    acts: str = "none"
    grads: str = "none"
    block: Optional[int] = None

    def __post_init__(self):
        from scaling import formats

        for name in ("weights", "acts", "grads"):
            v = getattr(self, name)
            f = formats.parse(v, f"model.precision.{name}")
            object.__setattr__(self, name, "none" if f is None else f.name)
        if self.block is not None and (isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1):
            _fail("model.precision.block", f"must be a positive integer (elements per scale) or none, got {self.block!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape. Sizes in elements; ``d_ff`` defaults to
    ``ffn_ratio * d_model`` rounded to a multiple of 8."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: Optional[int] = None  # default d_model // n_heads
    n_kv_heads: Optional[int] = None  # grouped-query attention; default n_heads
    ffn_ratio: float = 4.0
    d_ff: Optional[int] = None
    activation: Literal["swiglu", "gelu"] = "gelu"
    qk_norm: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"  # activation/compute dtype; params stay float32
    # sp: standard parametrization; mup: maximal-update (Yang et al. 2022), relative to a base
    # model of width mup_base_width that it equals exactly (rules in scaling/models/mup.py)
    parametrization: Literal["sp", "mup"] = "sp"
    mup_base_width: Optional[int] = None
    # head dimension of the base model (sets the 1/head_dim attention scale); None: head_dim when
    # set, else mup_base_width / n_heads (sweeps sized by a size rule fill in the rule's own)
    mup_base_head_dim: Optional[int] = None
    moe: Optional[MoEConfig] = None
    mod: Optional[MoDConfig] = None
    # low-precision training: fake-quantized matmuls (scaling.models.quant); None: float32/bf16 as dtype says
    precision: Optional[PrecisionConfig] = None
    # sections of registered block kinds other than moe/mod (scaling.blocks), by kind name:
    # written {name: {field: value}}, set with --set model.blocks.NAME.FIELD=VALUE
    blocks: "BlockSections" = field(default_factory=lambda: BlockSections())
    # rematerialisation per block (jax.checkpoint): none | full (keep only each block's input) |
    # dots_saveable | dots_with_no_batch_dims_saveable (keep matmul outputs). Memory, not maths
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = "none"
    # attention kernel: auto (cudnn flash attention on a GPU in bfloat16, Pallas splash attention
    # on a TPU, else xla) | xla | cudnn | splash
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    # store the blocks stacked and run them with one lax.scan over the repeating group of
    # blocks (the program no longer grows with depth; scaling.models.transformer)
    scan_layers: bool = False

    def __post_init__(self):
        _one_of("model.remat", self.remat, REMAT_POLICIES)
        _one_of("model.attention", self.attention, ("auto", "xla", "cudnn", "splash"))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                _fail(f"model.{name}", f"must be a positive integer, got {v!r}")
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            _fail("model.n_heads", f"n_heads={self.n_heads} does not divide d_model={self.d_model}; pick a divisor or set model.head_dim")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            _fail("model.head_dim", f"must be a positive integer, got {self.head_dim!r}")
        if self.resolved_head_dim % 2 != 0:
            _fail("model.head_dim", f"RoPE needs an even head_dim, got {self.resolved_head_dim}")
        if self.n_kv_heads is not None:
            if not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
                _fail("model.n_kv_heads", f"must be a positive divisor of n_heads={self.n_heads}, got {self.n_kv_heads!r}")
        _positive("model.ffn_ratio", self.ffn_ratio)
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            _fail("model.d_ff", f"must be a positive integer, got {self.d_ff!r}")
        _one_of("model.activation", self.activation, ("swiglu", "gelu"))
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16"))
        _positive("model.rope_theta", self.rope_theta)
        _positive("model.norm_eps", self.norm_eps)
        _positive("model.init_std", self.init_std)
        _one_of("model.parametrization", self.parametrization, ("sp", "mup"))
        if self.parametrization == "mup":
            b = self.mup_base_width
            if b is None:
                _fail("model.mup_base_width", "model.parametrization=mup needs the width of the tuned base model, "
                                              "e.g. model.mup_base_width=64")
            if not isinstance(b, int) or b < 1:
                _fail("model.mup_base_width", f"must be a positive integer, got {b!r}")
            h0 = self.mup_base_head_dim
            if h0 is not None and (not isinstance(h0, int) or h0 < 1):
                _fail("model.mup_base_head_dim", f"must be a positive integer, got {h0!r}")
            if h0 is None and self.head_dim is None and b % self.n_heads:
                _fail("model.mup_base_width", f"{b} is not divisible by n_heads={self.n_heads}: the base model's head_dim "
                                              f"(base width / n_heads, which sets the 1/head_dim attention scale) must be "
                                              f"a whole number; pick a multiple of {self.n_heads} or set model.mup_base_head_dim")
            if self.mod is not None:
                _fail("model.parametrization", "mup does not cover mixture-of-depths routers and predictors yet; "
                                               "use model.parametrization=sp for MoD models")
        elif self.mup_base_width is not None and (not isinstance(self.mup_base_width, int) or self.mup_base_width < 1):
            _fail("model.mup_base_width", f"must be a positive integer, got {self.mup_base_width!r}")
        if self.moe is not None:
            expert_ff = self.resolved_d_ff * self.moe.expert_size
            if expert_ff % self.moe.granularity != 0 or int(expert_ff) != expert_ff:
                _fail("model.moe.granularity", f"granularity={self.moe.granularity} must divide the expert hidden size {expert_ff:g}; pick a divisor")
        if not isinstance(self.scan_layers, bool):
            _fail("model.scan_layers", f"must be true or false, got {self.scan_layers!r}")
        if self.precision is not None:
            self._check_precision()
        from scaling import blocks as block_kinds

        if not isinstance(self.blocks, BlockSections):  # a plain mapping: hashable, sorted
            object.__setattr__(self, "blocks", BlockSections(self.blocks))
        block_kinds.check_sections(self)
        for kind in block_kinds.used(self):
            if kind.validate is not None:
                kind.validate(self)
        kinds = block_kinds.layer_names(self)  # also refuses two kinds of one role in a layer
        pattern = block_kinds.pattern_period(self)
        if self.scan_layers and self.n_layers % pattern:
            listed = ", ".join(f"{i}:{k}" for i, k in enumerate(kinds))
            _fail("model.scan_layers", f"the blocks ({listed}) end in a partial group: the moe/mod pattern repeats "
                                       f"every {pattern} layers and n_layers={self.n_layers} is not a multiple of "
                                       f"{pattern}, so they cannot be stacked for a scan; use a multiple of {pattern} "
                                       "or model.scan_layers=false")

    def _check_precision(self) -> None:
        p = self.precision
        if self.moe is not None or self.mod is not None or len(self.blocks):
            _fail("model.precision", "quantizes the dense attention and MLP matmuls; MoE, MoD and other block kinds "
                                     "are not quantized yet; drop model.precision or use a dense model")
        if self.dtype == "bfloat16":
            from scaling import formats

            for name in ("weights", "acts", "grads"):
                f = formats.parse(getattr(p, name))
                if f is not None and (f.M > 7 or f.E > 8):
                    _fail(f"model.precision.{name}", f"{f.name} is finer than model.dtype=bfloat16, whose operands are "
                                                     "bf16 already; use model.dtype=float32 or a format of at most 7 "
                                                     "mantissa bits")
        if p.block is not None:
            hd = self.resolved_head_dim
            sizes = {"model.d_model": self.d_model, "model.d_ff": self.resolved_d_ff,
                     "model.n_heads x head_dim": self.n_heads * hd, "model.head_dim": hd}
            for what, n in sizes.items():
                if n % p.block:
                    _fail("model.precision.block", f"{p.block} does not divide {what}={n} (a contracted or gradient "
                                                   f"axis of a quantized matmul); use a divisor of {n}, e.g. "
                                                   f"{math.gcd(n, p.block)}, or none for per-tensor scales")

    def layer_period(self) -> int:
        """Blocks in the smallest repeating group of the layer pattern (dense / MoE / MoD / any
        registered kind): a scanned model stacks ``n_layers / period`` copies of that group."""
        from scaling import blocks as block_kinds

        kinds = block_kinds.layer_names(self)
        n = self.n_layers
        return next(p for p in range(1, n + 1) if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)))

    @property
    def ffn(self) -> str:
        """The MLP kind (``mlp``, ``moe``, ``peer``, ``pkm``; set with ``--set model.ffn=NAME``,
        a shorthand for switching the kinds' sections, ``scaling.blocks.select_ffn``)."""
        from scaling import blocks

        return blocks.ffn(self)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_n_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return max(8, int(round(self.ffn_ratio * self.d_model / 8)) * 8)

    @property
    def expert_d_ff(self) -> int:
        """Hidden size of one routed expert (d_ff * expert_size / G)."""
        assert self.moe is not None
        return int(self.resolved_d_ff * self.moe.expert_size) // self.moe.granularity

    @property
    def causal_eval(self) -> bool:
        """Whether the model's evaluation (``train=False``, causal MoD routing) lets no token
        see later ones: false for expert-choice MoE, whose experts pick among all tokens, and
        for MoD with ``causal_aux="none"``, which trains no causal decision (its top-k loss is
        stored instead)."""
        if self.moe is not None and self.moe.router == "expert_choice":
            return False
        return self.mod is None or self.mod.causal_aux != "none"

    def is_moe_layer(self, i: int) -> bool:
        from scaling import blocks

        return blocks.get("moe").in_layer(self, i)

    def is_mod_layer(self, i: int) -> bool:
        from scaling import blocks

        return blocks.get("mod").in_layer(self, i)


# --------------------------------------------------------------------------------------------
# Data, optimiser, budget, mesh
# --------------------------------------------------------------------------------------------

DataSource = Literal["stdlib", "packages", "local_text", "hf", "tfds", "shards", "mixture", "synthetic", "tasks"]


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. ``batch_size`` is the global batch in sequences of ``seq_len``
    tokens; a step consumes ``batch_size * seq_len`` tokens."""

    source: DataSource = "stdlib"
    # local_text: directory of text files; hf: save_to_disk dir or parquet/jsonl/arrow files;
    # tfds: data_dir; shards: a directory written by `scaling data prepare`
    path: Optional[str] = None
    # bytes | bpe:PATH | hf:PATH | sentencepiece:PATH (scaling.data.tokenize); shards carry their own
    tokenizer: str = "bytes"
    include: tuple[str, ...] = ()  # local_text: fnmatch globs over relative paths (none = all files)
    exclude: tuple[str, ...] = ()  # local_text: globs of files to leave out
    packages: tuple[str, ...] = ()  # packages: distributions to read (none = this package's dependencies)
    # training batches from this many grain worker processes (0 = in the training process)
    worker_count: int = 0
    # mixture: SOURCE=WEIGHT entries, SOURCE a shard directory or stdlib/packages (scaling.data.mixture)
    mixture: tuple[str, ...] = ()
    tfds_name: Optional[str] = None  # tfds: dataset name, e.g. "my_corpus:1.0.0"
    # tasks: built-in synthetic task suites to train on (scaling.tasks: arithmetic, copy,
    # brackets), `task_examples` training examples of each (their held-out examples: a tenth)
    tasks: tuple[str, ...] = ()
    task_examples: int = 200_000
    text_feature: str = "text"
    seq_len: int = 128
    batch_size: int = 32
    # the held-out set: this many tokens (rounded down to whole sequences), the same for every
    # batch size, mesh and host count; None = min(2^18, the whole held-out split)
    eval_tokens: Optional[int] = None
    eval_batches: Optional[int] = None  # replaced by eval_tokens; must be left unset (older configs: ignored)
    shuffle_seed: int = 0
    # synthetic source: a seeded Markov chain over `synthetic_vocab` symbols whose transition
    # rows are Zipf(`synthetic_zipf`) over a random permutation; its entropy rate is exact.
    synthetic_vocab: int = 64
    synthetic_zipf: float = 1.2
    synthetic_tokens: int = 20_000_000
    # train on at most this many unique tokens (a data-constrained run): whole training windows
    # spread evenly over the training split, repeated epoch after epoch; the held-out set is
    # unchanged. None = the whole training split
    unique_tokens: Optional[int] = None
    # gradient accumulation: sequences per device in one forward/backward pass; a step makes
    # batch_size / (devices x microbatch) passes and updates once. None = one pass per step
    microbatch: Optional[int] = None
    # batch-size schedule: "TOKENS:BATCH" entries; from the first step that starts at or after
    # TOKENS training tokens the batch is BATCH sequences (data.batch_size before the first
    # entry). The data order stays a pure function of the step (scaling.data.batch_schedule)
    batch_schedule: tuple[str, ...] = ()

    def __post_init__(self):
        _one_of("data.source", self.source, ("stdlib", "packages", "local_text", "hf", "tfds", "shards", "mixture",
                                             "synthetic", "tasks"))
        from scaling.data.tokenize import parse_spec

        parse_spec(self.tokenizer)
        if self.source == "synthetic" and self.tokenizer != "bytes":
            _fail("data.tokenizer", "data.source=synthetic emits token ids directly; leave data.tokenizer=bytes")
        if self.source == "shards" and self.tokenizer != "bytes":
            _fail("data.tokenizer", "data.source=shards were tokenized when prepared (their manifest names the "
                                    "tokenizer); leave data.tokenizer unset")
        if (self.include or self.exclude) and self.source != "local_text":
            _fail("data.include", "include/exclude globs apply to data.source=local_text only")
        if self.packages and self.source != "packages":
            _fail("data.packages", "names distributions for data.source=packages only")
        if self.source == "tasks":
            from scaling.tasks import BUILTIN

            if not self.tasks:
                _fail("data.tasks", f"data.source=tasks needs suites to train on, e.g. data.tasks=arithmetic,copy "
                                    f"(built-in: {', '.join(BUILTIN)})")
            for t in self.tasks:
                if t not in BUILTIN:
                    _fail("data.tasks", f"unknown suite {t!r}; use built-in suites ({', '.join(BUILTIN)})")
            if len(set(self.tasks)) != len(self.tasks):
                _fail("data.tasks", "names a suite twice; name each once")
            if isinstance(self.task_examples, bool) or not isinstance(self.task_examples, int) or self.task_examples < 64:
                _fail("data.task_examples", f"must be an integer >= 64 (examples per suite), got {self.task_examples!r}")
        elif self.tasks:
            _fail("data.tasks", "names suites for data.source=tasks only (in a mixture: tasks:SUITE=WEIGHT)")
        if self.task_examples != 200_000 and self.source != "tasks" and not any(
                str(m).startswith("tasks:") for m in self.mixture):
            _fail("data.task_examples", "applies to task suites in training only (data.source=tasks or tasks:SUITE "
                                        "mixture components); leave it unset")
        if self.source == "mixture":
            from scaling.data.mixture import parse

            parse(self)
        elif self.mixture:
            _fail("data.mixture", "set data.source=mixture to train on a mixture")
        if not isinstance(self.worker_count, int) or self.worker_count < 0:
            _fail("data.worker_count", f"must be an integer >= 0, got {self.worker_count!r}")
        for name in ("seq_len", "batch_size", "synthetic_vocab", "synthetic_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                _fail(f"data.{name}", f"must be a positive integer, got {v!r}")
        if self.microbatch is not None and (isinstance(self.microbatch, bool) or not isinstance(self.microbatch, int)
                                            or self.microbatch < 1 or self.batch_size % self.microbatch):
            _fail("data.microbatch", f"must be a positive number of sequences dividing data.batch_size={self.batch_size}, "
                                     f"got {self.microbatch!r}")
        if self.batch_schedule:
            from scaling.data.batch_schedule import parse_entries

            for i, (_, b) in enumerate(parse_entries(self.batch_schedule, self.batch_size)):
                if self.microbatch is not None and b % self.microbatch:
                    _fail(f"data.batch_schedule[{i}]", f"batch {b} is not a multiple of data.microbatch={self.microbatch}")
            if self.source == "mixture":
                _fail("data.batch_schedule", "is not supported with data.source=mixture yet; use one batch size")
        if self.unique_tokens is not None:
            if isinstance(self.unique_tokens, bool) or not isinstance(self.unique_tokens, int) \
                    or self.unique_tokens < self.seq_len * self.batch_size:
                _fail("data.unique_tokens", f"must be a whole number of tokens, at least one batch "
                                            f"({self.seq_len * self.batch_size}), got {self.unique_tokens!r}")
            if self.source == "mixture":
                _fail("data.unique_tokens", "caps one source's training split; a mixture's components are not capped "
                                            "(prepare smaller shards for a component instead)")
        if self.eval_tokens is not None and (not isinstance(self.eval_tokens, int) or self.eval_tokens < self.seq_len):
            _fail("data.eval_tokens", f"must be a whole number of at least one sequence ({self.seq_len} tokens), "
                                      f"got {self.eval_tokens!r}")
        if self.source == "local_text" and not self.path:
            _fail("data.path", "data.source=local_text needs data.path=<directory of text files>")
        if self.source in ("hf", "shards") and not self.path:
            what = "a dataset saved with save_to_disk, or parquet/jsonl/arrow files" if self.source == "hf" \
                else "a directory written by `scaling data prepare`"
            _fail("data.path", f"data.source={self.source} needs data.path=<{what}>")
        if self.source == "tfds" and not self.tfds_name:
            _fail("data.tfds_name", "data.source=tfds needs data.tfds_name=<dataset name>")
        _positive("data.synthetic_zipf", self.synthetic_zipf)


Schedule = Literal["cosine", "linear", "wsd", "constant"]
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


# the optimizer fields the trainer passes to its compiled step as values, not constants
# (``scaling.train.optim.hparams``)
TRACED_OPTIM_FIELDS = ("lr", "final_lr_fraction", "warmup_steps", "warmup_fraction", "wsd_decay_fraction",
                       "weight_decay", "b1", "b2", "eps", "grad_clip", "z_loss")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then a decay that ends exactly at the run's last step."""

    lr: float = 3e-3
    schedule: Schedule = "cosine"
    warmup_fraction: float = 0.05  # of total steps (warmup_steps overrides when set)
    warmup_steps: Optional[int] = None
    final_lr_fraction: float = 0.1  # lr at the last step, relative to peak (cosine/linear/wsd)
    wsd_decay_fraction: float = 0.2  # WSD: fraction of steps spent in the final cooldown
    wsd_cooldown: Literal["linear", "1-sqrt"] = "linear"  # WSD cooldown shape
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    z_loss: float = 1e-4  # weight of log(Z)^2 on the output logits
    # gradient-noise statistics on every n-th step (and the last); None = every logging step
    # (log_every), 0 = never. Other steps pay nothing for them (scaling.train.step)
    gns_every: Optional[int] = None
    # with data.batch_schedule: the lr of a step at batch B is lr * (B / data.batch_size)^this
    # (0.5: the square-root rule for Adam; 0: one lr whatever the batch)
    batch_lr_exponent: float = 0.0

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        if isinstance(self.batch_lr_exponent, bool) or not isinstance(self.batch_lr_exponent, (int, float)) \
                or not (0.0 <= self.batch_lr_exponent <= 1.0):
            _fail("optim.batch_lr_exponent", f"must be a number in [0, 1] (0.5: lr x sqrt of the batch ratio), "
                                             f"got {self.batch_lr_exponent!r}")
        _one_of("optim.schedule", self.schedule, ("cosine", "linear", "wsd", "constant"))
        if not (0.0 <= self.warmup_fraction < 1.0):
            _fail("optim.warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            _fail("optim.warmup_steps", "must be >= 0")
        if not (0.0 <= self.final_lr_fraction <= 1.0):
            _fail("optim.final_lr_fraction", "must be in [0, 1]")
        if not (0.0 < self.wsd_decay_fraction <= 1.0):
            _fail("optim.wsd_decay_fraction", "must be in (0, 1]")
        _one_of("optim.wsd_cooldown", self.wsd_cooldown, ("linear", "1-sqrt"))
        for name in ("weight_decay", "grad_clip", "z_loss", "eps"):
            if getattr(self, name) < 0:
                _fail(f"optim.{name}", "must be >= 0")
        for name in ("b1", "b2"):
            if not (0.0 <= getattr(self, name) < 1.0):
                _fail(f"optim.{name}", "must be in [0, 1)")
        if self.gns_every is not None and (isinstance(self.gns_every, bool) or not isinstance(self.gns_every, int)
                                           or self.gns_every < 0):
            _fail("optim.gns_every", f"must be a whole number of steps >= 0 (0: no noise-scale statistics), "
                                     f"got {self.gns_every!r}")


@dataclass(frozen=True)
class BudgetConfig:
    """The run's compute budget. Exactly one of the fields is set; FLOPs are training FLOPs as
    counted by ``scaling.flops`` (forward + backward, exact), tokens are training tokens."""

    flops: Optional[float] = 1e12
    tokens: Optional[int] = None
    steps: Optional[int] = None
    seconds: Optional[float] = None  # wall-clock training seconds (Languini-style compute class)

    def __post_init__(self):
        set_fields = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if len(set_fields) != 1:
            _fail("budget", f"set exactly one of flops, tokens, steps, seconds (got {', '.join(set_fields) or 'none'})")
        name = set_fields[0]
        _positive(f"budget.{name}", getattr(self, name))

    @property
    def kind(self) -> str:
        return next(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))


@dataclass(frozen=True)
class InitConfig:
    """How a run starts from ``init_from``. ``upcycle=moe``: the checkpoint is a dense run's and
    this run is its MoE upcycling (Komatsuzaki et al. 2023; Liew et al. 2025): every expert a
    copy of the dense MLP (plus ``noise`` x the tensor's std of Gaussian noise), a fresh router,
    the rest copied, a fresh optimizer, the step counter and schedule from 0 (``budget`` counts
    the upcycled stage alone). ``data``: ``continue`` reads on from the dense run's data
    position (no token seen twice); ``restart`` from this run's own first batch."""

    upcycle: Literal["none", "moe"] = "none"
    noise: float = 0.0
    data: Literal["continue", "restart"] = "continue"

    def __post_init__(self):
        _one_of("init.upcycle", self.upcycle, ("none", "moe"))
        _one_of("init.data", self.data, ("continue", "restart"))
        if isinstance(self.noise, bool) or not (isinstance(self.noise, (int, float)) and math.isfinite(self.noise)
                                                and self.noise >= 0):
            _fail("init.noise", f"must be a finite number >= 0 (the noise std relative to each copied tensor's), "
                                f"got {self.noise!r}")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; their product is the device count. ``-1`` means "the rest"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def __post_init__(self):
        sizes = self.as_dict()
        if sum(1 for v in sizes.values() if v == -1) > 1:
            _fail("mesh", "at most one axis may be -1 ('the rest')")
        for k, v in sizes.items():
            if not isinstance(v, int) or (v < 1 and v != -1):
                _fail(f"mesh.{k}", f"must be a positive integer or -1, got {v!r}")

    def as_dict(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "expert": self.expert}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one trial needs. ``experiment`` names the family in ``experiments/``."""

    experiment: str = "dense"
    name: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    log_every: int = 10  # steps between metrics rows
    eval_every: int = 200  # steps between evaluations (and always at the end)
    checkpoint_every: int = 500  # steps between checkpoints (and always at the end)
    checkpoint_keep: int = 2
    checkpoint_at: tuple[int, ...] = ()  # extra steps to checkpoint at (WSD branch points), kept
    divergence_factor: float = 3.0  # loss > factor * min(loss so far) (after warmup) => diverged
    # mirror metrics to wandb: offline by default (a local wandb/ folder, `wandb sync` later);
    # metrics.jsonl stays the truth and analysis never needs wandb. Not part of trial ids
    wandb: Literal["off", "offline", "online"] = "offline"
    progress: bool = True  # console progress bar
    # WSD branching (sweeps): resume from this checkpoint directory/step, then cool down.
    init_from: Optional[str] = None
    # how the run starts from init_from (a WSD/batch branch by default; init.upcycle=moe: a dense
    # checkpoint becomes an MoE)
    init: InitConfig = field(default_factory=InitConfig)
    # where checkpoints go (default OUT/ckpt): a local directory or a URL orbax writes natively
    # (gs://). Unhashed (it does not change what the run computes); a resume must name the
    # location the run recorded.
    checkpoint_dir: Optional[str] = None
    # task suites scored on the final model (scaling.tasks: built-in names or JSONL task files):
    # RUN/tasks.json and final_tasks/SUITE/METRIC in the summary; eval_task_examples per built-in
    eval_tasks: tuple[str, ...] = ()
    eval_task_examples: int = 200

    def __post_init__(self):
        for name in ("log_every", "eval_every", "checkpoint_every", "checkpoint_keep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                _fail(name, f"must be a positive integer, got {v!r}")
        if not (self.divergence_factor > 1.0):
            _fail("divergence_factor", f"must be > 1, got {self.divergence_factor!r}")
        _one_of("wandb", self.wandb, ("off", "offline", "online"))
        if self.eval_tasks:
            from scaling.tasks import BUILTIN

            for t in self.eval_tasks:
                if t not in BUILTIN and not str(t).endswith((".jsonl", ".json")):
                    _fail("eval_tasks", f"{t!r} is neither a built-in suite ({', '.join(BUILTIN)}) nor a .jsonl task file")
            if self.data.source == "synthetic":
                _fail("eval_tasks", "data.source=synthetic has no text for task prompts; train on text or leave it unset")
        if isinstance(self.eval_task_examples, bool) or not isinstance(self.eval_task_examples, int) \
                or self.eval_task_examples < 1:
            _fail("eval_task_examples", f"must be a positive integer, got {self.eval_task_examples!r}")
        # byte tokens; a subword tokenizer's vocabulary is checked when the trainer loads it
        need = self.data.synthetic_vocab if self.data.source == "synthetic" else 256
        if self.model.vocab_size < need and self.data.tokenizer == "bytes" and self.data.source != "shards":
            what = (f"data.synthetic_vocab={need} symbols" if self.data.source == "synthetic"
                    else f"{need} byte tokens for data.source={self.data.source}")
            _fail("model.vocab_size", f"{self.model.vocab_size} is below the data's vocabulary ({what}); "
                                      f"set model.vocab_size >= {need}")
        if self.init.upcycle == "none" and self.init != InitConfig():
            _fail("init.noise" if self.init.noise else "init.data", "applies to upcycling only; set init.upcycle=moe or "
                                                                     "leave init.noise and init.data at their defaults")
        if self.init.upcycle != "none":
            if not self.init_from:
                _fail("init.upcycle", "needs the dense checkpoint to start from; set init_from=RUN_DIR@STEP")
            if self.model.moe is None:
                _fail("init.upcycle", "moe upcycles into an MoE model, but model.moe is not set; set model.ffn=moe "
                                      "(or model.moe=on)")
        if self.model.moe is not None and self.mesh.expert not in (1, -1) and self.model.moe.n_routed % self.mesh.expert:
            _fail("mesh.expert", f"expert axis {self.mesh.expert} must divide the number of experts {self.model.moe.n_routed}")

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        from scaling.overrides import as_dict

        return as_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        from scaling.overrides import build

        return build(cls, d)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "TrainConfig":
        """Apply ``a.b=value`` overrides (strings are parsed against the field type)."""
        from scaling.overrides import apply_overrides

        return apply_overrides(self, overrides)


# --------------------------------------------------------------------------------------------
# Trial ids (parsing text into configs: scaling.overrides)
# --------------------------------------------------------------------------------------------


def hashed_dict(cfg: TrainConfig) -> dict:
    """``cfg.to_dict()`` without the ``scaling.schema.LATE_FIELDS`` that hold their old value
    (fields added later: a new field never renames the trials of an existing sweep)."""
    from scaling.schema import without_late_defaults

    return without_late_defaults(cfg.to_dict())


def config_hash(cfg: TrainConfig, length: int = 12) -> str:
    """Stable short hash of a resolved config (used as the trial id)."""
    import hashlib

    text = json.dumps(hashed_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
