"""Every model on any mesh: ``Mesh(data, fsdp, tensor, expert)``, logical-axis rules, sharded
initialisation, batch sharding, per-device memory report.

The partitioner is JAX's own (GSPMD): parameters carry *logical* axis names in their nnx
metadata (``nnx.with_partitioning(init, ("embed", "mlp"))``), ``LOGICAL_RULES`` maps them to
mesh axes as MaxText does, and ``jax.jit`` with ``NamedSharding`` in/out shardings does the
rest. Mesh axes are ``Auto`` (GSPMD propagation), not ``Explicit``, so model code needs no
sharding-in-types annotations.

Typical use (what ``train.loop`` does)::

    mesh = make_mesh(cfg.mesh)                      # ConfigError on bad sizes
    validate(cfg.model, cfg.data, mesh)             # ConfigError before any compilation
    with mesh_context(mesh):
        model = create_sharded_model(lambda: Transformer(cfg.model, rngs=nnx.Rngs(seed)), mesh)
        opt = create_sharded_model(lambda: nnx.Optimizer(model, tx, wrt=nnx.Param), mesh)
        batch = shard_batch(host_batch, mesh)       # P(("data", "fsdp", "expert"), None)
        loss = train_step(model, opt, batch)

Over 400 lines: the mesh, placement, validation and the memory estimate are views of one table
(``LOGICAL_RULES``) and change with it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.linen import logical_to_mesh_axes
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from scaling.config import ConfigError, DataConfig, MeshConfig, ModelConfig
from scaling.distributed import initialize_distributed  # noqa: F401  (re-exported)

AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axis, in priority order (flax's rule semantics: a logical axis takes its
# mesh axes only if no earlier dimension of the same array already took them).
# - batch over data x fsdp x expert: FSDP is data parallelism whose parameters are gathered per
#   layer, and expert devices hold different experts but would otherwise repeat attention and
#   every dense layer on the same rows (GShard/MaxText split the batch over them too; the MoE
#   dispatch then moves tokens from batch shards to expert shards with an all-to-all).
# - embed over fsdp: the model dimension appears in every weight, so sharding it over fsdp
#   divides every parameter (and its Adam moments) by fsdp. In activations [batch, length,
#   embed] fsdp is already taken by batch, so embed stays unsharded there (rule order).
# - mlp, heads, vocab over tensor: Megatron-style column/row parallel matmuls; the vocab
#   projection is the largest matmul of small models.
# - kv (head_dim) unsharded: splitting a head across devices buys nothing and costs a
#   collective per attention; heads are split instead.
# - expert over expert: expert parallelism; the dispatch becomes an all-to-all.
# - length and layers unsharded: no sequence/pipeline parallelism (sequences here are short;
#   layers are a Python loop or a scan whose stacked axis must stay whole).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("length", None),
    ("layers", None),
)

# Which model/data field each sharded dimension comes from, for validate().
_SHARDED_FIELDS = {"embed": "model.d_model", "mlp": "model.d_ff", "heads": "model.n_heads",
                   "vocab": "model.vocab_size", "expert": "model.moe.n_experts", "batch": "data.batch_size"}


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


def parse_mesh(text: str) -> MeshConfig:
    """Parse ``"data=2,fsdp=4"`` (the ``--mesh`` flag) into a ``MeshConfig``.

    Axes not named are 1, except ``data`` which is ``-1`` ("the rest") unless some axis is
    given as ``-1`` or ``data`` is named. ``""`` means all devices on ``data``.
    """
    sizes: dict[str, int] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"mesh: expected axis=size pairs like data=2,fsdp=4; got {item!r}")
        name, value = (s.strip() for s in item.split("=", 1))
        if name not in AXES:
            raise ConfigError(f"mesh.{name}: unknown mesh axis; known axes: {', '.join(AXES)}")
        if name in sizes:
            raise ConfigError(f"mesh.{name}: given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(f"mesh.{name}: must be an integer or -1, got {value!r}") from None
    if "data" not in sizes:
        sizes["data"] = 1 if -1 in sizes.values() else -1
    return MeshConfig(**{a: sizes.get(a, 1) for a in AXES})


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Resolve ``-1`` and check that the axis sizes multiply to ``n_devices``.

    Raises ``ConfigError`` naming ``mesh.<axis>`` (the first axis at which the sizes stop
    dividing the device count) before any device work.
    """
    sizes = cfg.as_dict()
    fixed = 1
    for name in AXES:
        if sizes[name] == -1:
            continue
        fixed *= sizes[name]
        if n_devices % fixed:
            others = " x ".join(f"{a}={sizes[a]}" for a in AXES if sizes[a] != -1)
            raise ConfigError(f"mesh.{name}: {others} does not divide the {n_devices} devices; "
                              f"choose sizes whose product divides {n_devices}")
    rest = [a for a in AXES if sizes[a] == -1]
    if rest:
        sizes[rest[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"mesh.data: axis sizes multiply to {fixed} but there are {n_devices} devices; "
                          f"set one axis to -1 (e.g. mesh.data=-1) to use the rest")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor", "expert")`` over ``devices``
    (default: all devices of all processes), ``Auto`` axis types (GSPMD).

    Device order comes from ``jax.make_mesh`` (topology-aware on TPU/GPU). On a multi-slice TPU
    job (devices with several ``slice_index`` values) the slower inter-slice network carries
    only the ``data`` axis (``mesh_utils.create_hybrid_device_mesh``).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    axis_types = (AxisType.Auto,) * len(AXES)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        from jax.experimental import mesh_utils

        n = len(slices)
        if sizes["data"] % n:
            raise ConfigError(f"mesh.data: {sizes['data']} must be a multiple of the {n} TPU slices "
                              f"(only data parallelism crosses slices)")
        ici = (sizes["data"] // n,) + shape[1:]
        dcn = (n,) + (1,) * (len(AXES) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(grid, AXES, axis_types=axis_types)
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)


def _axis_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


# --------------------------------------------------------------------------------------------
# Logical axes -> partition specs
# --------------------------------------------------------------------------------------------


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_RULES) -> P:
    """``("batch", "length", "embed")`` -> ``P(("data", "fsdp", "expert"), None, None)`` (flax rule
    semantics: rules in priority order; a mesh axis is used at most once per array)."""
    return logical_to_mesh_axes(tuple(names), rules)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=LOGICAL_RULES) -> Iterator[Mesh]:
    """Make ``mesh`` the current mesh (``jax.set_mesh``) and ``rules`` the logical-axis rules.

    Needed while *tracing* sharded code: activation constraints (``constrain``, the MoE dispatch)
    read the current mesh, and nnx variables created with eager sharding read both."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield mesh


def constrain(x: jax.Array, names: Sequence[str | None], rules=LOGICAL_RULES) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op without a current mesh (single
    device, no ``mesh_context``) so model code can call it unconditionally."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, rules)
    return jax.lax.with_sharding_constraint(x, _fit_spec(spec, x.shape, dict(mesh.shape)))


def activation_spec(names: Sequence[str | None], shape: Sequence[int], rules=LOGICAL_RULES) -> P:
    """The ``PartitionSpec`` ``constrain`` gives an activation of ``shape`` under the current mesh
    (dims that do not divide stay whole), padded to the array's rank: the specs a per-shard
    kernel (``shard_map``) takes. ``P()`` without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return P()
    spec = _fit_spec(logical_to_spec(names, rules), shape, dict(mesh.shape))
    return P(*(tuple(spec) + (None,) * (len(shape) - len(spec))))


def _fit_spec(spec: P, shape: Sequence[int], sizes: Mapping[str, int]) -> P:
    # Activations may have dims that do not divide (e.g. a batch of 1 at eval); leave those
    # dims unconstrained rather than fail inside XLA.
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        n = math.prod(sizes.get(a, 1) for a in _as_tuple(axes))
        out.append(axes if n > 1 and dim % n == 0 else None)
    return P(*out)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _leaf_spec(leaf, rules) -> P:
    if not isinstance(leaf, nnx.Variable):
        return P()  # plain arrays (optimizer step counts, RNG keys): replicated
    names = leaf.get_metadata().get("out_sharding")
    if not names:
        return P()
    if isinstance(names, NamedSharding):
        return names.spec
    return logical_to_spec(tuple(names), rules)


def state_shardings(tree, mesh: Mesh, rules=LOGICAL_RULES):
    """``NamedSharding`` tree for a pytree of nnx Variables and/or arrays (concrete or
    abstract), from each Variable's partition metadata; other leaves are replicated.

    Works for nnx state, ``nnx.Optimizer`` state and raw optax state of nnx params (optax's
    ``zeros_like`` keeps the Variable wrappers, so Adam moments get their parameter's spec).
    Raises ``ConfigError`` naming the parameter path and mesh axis when a dimension does not
    divide by its mesh axes (shapes are known abstractly, so this is before compilation).
    """
    sizes = dict(mesh.shape)

    def one(path, leaf):
        spec = _leaf_spec(leaf, rules)
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        for dim, (size, axes) in enumerate(zip(getattr(value, "shape", ()), spec)):
            n = math.prod(sizes[a] for a in _as_tuple(axes))
            if size % n:
                name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                logical = leaf.get_metadata()["out_sharding"][dim]
                field = _SHARDED_FIELDS.get(logical, name)
                raise ConfigError(f"{field}: parameter {name} dim {dim} ({logical}={size}) is not divisible "
                                  f"by mesh axis {'x'.join(_as_tuple(axes))}={n}; change the size or the mesh")
        sharding = NamedSharding(mesh, spec)
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


# --------------------------------------------------------------------------------------------
# Validation before compilation
# --------------------------------------------------------------------------------------------


def validate(model_cfg: ModelConfig, data_cfg: DataConfig, mesh: Mesh | Mapping[str, int]) -> None:
    """Check that every sharded dimension divides by its mesh axes (``LOGICAL_RULES``).

    ``mesh``: a ``Mesh`` or a mapping axis -> size. Raises ``ConfigError`` naming the field and
    the mesh axis. Call before building the model: nothing is traced or compiled here.
    """
    sizes = {a: 1 for a in AXES} | _axis_sizes(mesh)
    rules = dict(LOGICAL_RULES)

    def need(field: str, value: int, logical: str) -> None:
        axes = _as_tuple(rules[logical])
        n = math.prod(sizes.get(a, 1) for a in axes)
        if value % n:
            mesh_desc = " x ".join(f"mesh.{a}={sizes[a]}" for a in axes)
            raise ConfigError(f"{field}: {value} is not divisible by {mesh_desc} ({logical} is sharded over "
                              f"{'x'.join(axes)}); change {field} or the mesh")

    need("data.batch_size", data_cfg.batch_size, "batch")
    accumulation(data_cfg, mesh)
    need("model.d_model", model_cfg.d_model, "embed")
    need("model.n_heads", model_cfg.n_heads, "heads")
    need("model.n_kv_heads", model_cfg.resolved_n_kv_heads, "heads")
    need("model.vocab_size", model_cfg.vocab_size, "vocab")
    from scaling import blocks

    used = blocks.used(model_cfg)
    if any(blocks.layer_kind(model_cfg, i, "mlp") is None for i in range(model_cfg.n_layers)):
        need("model.d_ff", model_cfg.resolved_d_ff, "mlp")  # some layer holds the dense MLP
    for axis in ("expert",):  # an axis only block kinds use: idle devices without one
        if sizes[axis] > 1 and not any(axis in k.mesh_axes for k in used):
            raise ConfigError(f"mesh.{axis}: {sizes[axis]} but the model has no experts "
                              f"(model.moe is unset); use mesh.{axis}=1")
    for kind in used:
        for field, value, logical in (kind.shard_needs(model_cfg) if kind.shard_needs else ()):
            need(field, value, logical)


def accumulation(data_cfg: DataConfig, mesh: Mesh | Mapping[str, int]) -> tuple[int, int]:
    """``(accum, shards)``: forward/backward passes per step and the row blocks the batch splits
    into (the batch axes' product). ``data.microbatch`` sequences per device per pass; unset:
    one pass. Raises ``ConfigError`` when it does not divide the per-device batch."""
    sizes = {a: 1 for a in AXES} | _axis_sizes(mesh)
    shards = int(math.prod(sizes.get(a, 1) for a in batch_axes()))
    per_device, m = data_cfg.batch_size // shards, data_cfg.microbatch
    if m is None:
        return 1, shards
    if data_cfg.batch_size % shards or per_device % m:
        raise ConfigError(f"data.microbatch: {m} sequences does not divide the per-device batch of {per_device} "
                          f"(data.batch_size={data_cfg.batch_size} over {shards} device(s)); use a divisor of "
                          f"{per_device}")
    return per_device // m, shards


# --------------------------------------------------------------------------------------------
# Sharded creation
# --------------------------------------------------------------------------------------------


def abstract_sharded(fn: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES):
    """The output of ``fn()`` as ``jax.ShapeDtypeStruct`` leaves carrying their target
    ``NamedSharding`` on ``mesh``; nothing is allocated or compiled. The restore target for an
    orbax checkpoint onto ``mesh`` (``ocp.args.StandardRestore(abstract_sharded(...))``)."""
    with mesh_context(mesh, rules):
        abstract = jax.eval_shape(fn)
        shardings = state_shardings(abstract, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def sharded_abstract_state(make: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES):
    """``(graphdef, abstract_state)`` of the nnx object ``make()``, leaves as in
    ``abstract_sharded``."""
    with mesh_context(mesh, rules):
        graphdef, _ = nnx.split(nnx.eval_shape(make))
    return graphdef, abstract_sharded(lambda: nnx.split(make())[1], mesh, rules)


def shard_init(fn: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES):
    """Run the pure initialiser ``fn() -> pytree`` under ``jax.jit`` with ``out_shardings`` from
    the partition metadata of its (abstract) output, so every array is born sharded.

    For optimizer state over sharded nnx params use ``shard_init(lambda: tx.init(params), mesh)``:
    a plain ``jax.jit(tx.init)(params)`` leaves Adam's moments *replicated* (measured), since
    ``zeros_like`` carries no data dependence for GSPMD to propagate along.
    """
    with mesh_context(mesh, rules):
        shardings = state_shardings(jax.eval_shape(fn), mesh, rules)
        lowered = jax.jit(fn, out_shardings=shardings).lower()
        return lowered.compile(_INIT_COMPILER_OPTIONS.get(mesh.devices.flat[0].platform))()


# An initialiser runs once: on CPU, LLVM -O0 compiles it ~4x faster (6 s vs 23 s for a 2-layer
# model under load) and random-number generation is integer arithmetic, so values are unchanged.
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def create_sharded_model(make: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES):
    """Build ``make()`` (an ``nnx.Module`` or ``nnx.Optimizer``) with every array created directly
    in its sharding on ``mesh``: the constructor runs under ``jax.jit`` with ``out_shardings``
    from the partition metadata, so no array is ever materialised whole on one device.

    ``make`` must be pure: create its own ``nnx.Rngs`` inside. For an optimizer,
    ``create_sharded_model(lambda: nnx.Optimizer(model, tx, wrt=nnx.Param), mesh)``: Adam's
    moments copy each parameter's metadata, so they get the parameter's sharding.
    """
    with mesh_context(mesh, rules):
        graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = shard_init(lambda: nnx.split(make())[1], mesh, rules)
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------
# Batches and per-host data
# --------------------------------------------------------------------------------------------


def batch_axes(rules=LOGICAL_RULES) -> tuple[str, ...]:
    """Mesh axes the batch rows are split over (the ``batch`` rule: data x fsdp x expert)."""
    return _as_tuple(dict(rules)["batch"])


def batch_rows_multiple(mesh: Mesh) -> int:
    """Rows a batch must be a multiple of to split over ``mesh``: the product of the batch axes."""
    sizes = dict(mesh.shape)
    return int(math.prod(sizes.get(a, 1) for a in batch_axes()))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a ``[B, L]`` token batch: rows over ``batch_axes()``, replicated over
    ``tensor``."""
    return NamedSharding(mesh, P(batch_axes(), None))


def host_data_shard(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """``(shard_index, shard_count)`` of the global batch this process must load.

    Equal to ``(process_index, process_count)`` when every host owns distinct batch rows; when
    a ``tensor`` group spans hosts, those hosts load the same rows (fewer shards).
    Raises ``ConfigError`` if a host's rows are not one contiguous block.
    """
    index_map = batch_sharding(mesh).devices_indices_map((global_batch, 1))
    rows_by_process: dict[int, set[tuple[int, int]]] = {}
    for device, (rows, _) in index_map.items():
        start, stop, _ = rows.indices(global_batch)
        rows_by_process.setdefault(device.process_index, set()).add((start, stop))
    blocks = {}
    for p, spans in rows_by_process.items():
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        if sum(e - s for s, e in spans) != hi - lo:
            raise ConfigError(f"mesh: process {p} would hold non-contiguous batch rows; "
                              f"order the mesh so each host's devices are adjacent on data x fsdp x expert")
        blocks[p] = (lo, hi)
    starts = sorted({b for b in blocks.values()})
    return starts.index(blocks[jax.process_index()]), len(starts)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local ``{name: [B_local, ...]}`` -> global arrays sharded by ``batch_sharding``.

    Single process: ``B_local`` is the global batch. Multi-host: each process passes the rows
    of its ``host_data_shard`` and the global batch is assembled without any host holding it.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def per_device_bytes(tree) -> int:
    """Largest total bytes any single device holds of the arrays in ``tree`` (measured from
    the arrays' addressable shards, so it reflects the real sharding)."""
    totals: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
        elif hasattr(leaf, "nbytes"):
            totals[None] = totals.get(None, 0) + leaf.nbytes
    return max(totals.values(), default=0)


def activation_bytes_estimate(model_cfg: ModelConfig, data_cfg: DataConfig, mesh: Mesh | Mapping[str, int]) -> int:
    """Bytes per device of the activations a training step keeps for the backward pass
    (no rematerialisation), a first-order estimate.

    Per layer and token: residual/norm tensors ``5 d`` (replicated over ``tensor``), q/k/v and
    the attention output ``(2 H + 2 H_kv) d_head``, attention probabilities twice (scores and
    softmax) ``2 H L``, MLP hidden ``2 f`` (GELU: pre/post activation) or ``3 f`` (SwiGLU), the
    last three divided over ``tensor``; MoE layers count ``k G`` routed expert hiddens times the
    capacity factor. Plus float32 logits and their gradient ``2 V`` per token over ``tensor``.
    Tokens per device = ``B L / (data x fsdp x expert)``, or ``data.microbatch x L`` with
    gradient accumulation (one pass's activations are live at a time). ``model.remat=full``
    keeps only each block's input (``d`` per token and layer) plus one block's activations
    while it is recomputed; the ``dots`` policies are counted as no rematerialisation (an upper
    bound).
    """
    sizes = {a: 1 for a in AXES} | _axis_sizes(mesh)
    m = model_cfg
    tokens = data_cfg.batch_size * data_cfg.seq_len / math.prod(sizes[a] for a in batch_axes())
    if data_cfg.microbatch is not None:
        tokens = min(tokens, data_cfg.microbatch * data_cfg.seq_len)
    width = 2 if m.dtype == "bfloat16" else 4
    hd, t = m.resolved_head_dim, sizes["tensor"]
    per_mult = 3 if m.activation == "swiglu" else 2
    per_layer = []
    from scaling import blocks

    for i in range(m.n_layers):
        kind = blocks.layer_kind(m, i, "mlp")
        ff = kind.hidden_width(m, i) if kind is not None and kind.hidden_width else m.resolved_d_ff
        sharded = (2 * m.n_heads + 2 * m.resolved_n_kv_heads) * hd + 2 * m.n_heads * data_cfg.seq_len + per_mult * ff
        per_layer.append(tokens * (5 * m.d_model + sharded / t) * width)
    if getattr(m, "remat", "none") == "full":
        total = m.n_layers * tokens * m.d_model * width + max(per_layer)
    else:
        total = sum(per_layer)
    total += tokens * 2 * m.vocab_size / t * 4
    return int(total)


def memory_estimate(cfg, mesh: Mesh) -> int:
    """Bytes per device a training step needs, from the config alone (before anything is
    allocated): float32 parameters, their gradients and two Adam moments (``16`` bytes per
    parameter) divided over the parameter-sharding axes (``fsdp x tensor x expert``), plus
    ``activation_bytes_estimate``. A first-order figure, for the pre-compile memory check."""
    from scaling import flops

    sizes = {a: 1 for a in AXES} | _axis_sizes(mesh)
    params = flops.param_counts(cfg.model).total
    shards = sizes["fsdp"] * sizes["tensor"] * sizes["expert"]
    return int(16 * params / shards + activation_bytes_estimate(cfg.model, cfg.data, mesh))


def available_memory_per_device(mesh: Mesh) -> int | None:
    """Bytes one device of ``mesh`` can use: the accelerator's own limit, or on CPU the host's
    available memory shared by this host's devices of the mesh. ``None`` when unknown."""
    dev = mesh.devices.flat[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        return int(stats["bytes_limit"]) if "bytes_limit" in stats else None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        avail = int(info["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    return avail // max(1, local)


def check_memory(cfg, mesh: Mesh) -> None:
    """Raise ``ConfigError`` before any allocation when the step's estimated memory exceeds
    what a device has. ``SCALING_SKIP_MEMORY_CHECK=1`` (``scaling train --skip-memory-check``)
    skips it, for when the estimate is known to be pessimistic."""
    import os

    if os.environ.get("SCALING_SKIP_MEMORY_CHECK"):
        return
    need, have = memory_estimate(cfg, mesh), available_memory_per_device(mesh)
    if have is not None and need > have:
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        raise ConfigError(f"model: a training step needs about {gib(need)} per device (parameters, gradients, Adam "
                          f"state, activations) but {gib(have)} is available; shrink the model or batch, shard it "
                          f"(--mesh fsdp=N), or pass --skip-memory-check")


def _arrays(obj, *filters):
    if isinstance(obj, nnx.Pytree):  # Module, Optimizer
        return nnx.state(obj, *filters)
    return obj if obj is not None else {}


def memory_report(model, optimizer, cfg, mesh: Mesh, compiled=None) -> dict[str, int]:
    """Per-device memory in bytes: ``params`` and ``opt_state`` measured from the sharded arrays'
    addressable shards, ``activations_est`` from ``activation_bytes_estimate``, ``total_est``
    their sum; also ``params_unsharded`` (one full copy) and ``devices``. Given the ``compiled``
    train step (``jitted.lower(...).compile()``), also ``xla_temp``: XLA's own per-device
    temporary buffer size for one step (activations, gradients, gathered weights), measured.

    ``model``: an nnx Module (its ``nnx.Param`` state is counted) or a params pytree;
    ``optimizer``: an ``nnx.Optimizer``, a raw optax state, or ``None``; ``cfg``: the ``TrainConfig``.
    """
    params = _arrays(model, nnx.Param)
    opt_state = _arrays(optimizer)
    report = {
        "devices": int(mesh.size),
        "params": per_device_bytes(params),
        "opt_state": per_device_bytes(opt_state),
        "activations_est": activation_bytes_estimate(cfg.model, cfg.data, mesh),
        "params_unsharded": sum(int(x.nbytes) for x in jax.tree.leaves(params)),
    }
    report["total_est"] = report["params"] + report["opt_state"] + report["activations_est"]
    analysis = compiled.memory_analysis() if compiled is not None else None
    if analysis is not None:
        report["xla_temp"] = int(analysis.temp_size_in_bytes)
    return report


def format_memory_report(report: Mapping[str, int]) -> str:
    """One line for the console: per-device MiB of each part."""
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    return (f"memory/device ({report['devices']} devices): params {mib(report['params'])} MiB, "
            f"opt state {mib(report['opt_state'])} MiB, activations ~{mib(report['activations_est'])} MiB, "
            f"total ~{mib(report['total_est'])} MiB"
            + (f" (XLA step temp {mib(report['xla_temp'])} MiB)" if "xla_temp" in report else ""))
