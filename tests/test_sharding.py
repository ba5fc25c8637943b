"""Every model on any mesh: on 8 host CPU devices (conftest), the dense Transformer trained by
the real train step gives the one-device losses on every (data, fsdp, tensor, expert) mesh, its
per-device parameter and optimizer bytes shrink as 1/(fsdp*tensor), a checkpoint written on one
mesh resumes on another with the same losses, and bad mesh input fails before compilation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling import sharding as S
from scaling.config import ConfigError, DataConfig, MeshConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig
from scaling.distributed import distributed_plan, initialize_distributed

MODEL = ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=8, d_ff=256)  # every sharded dim divides 8
DATA = DataConfig(source="synthetic", batch_size=16, seq_len=16)
STEPS = 10
MESHES = [(8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 1), (1, 4, 2, 1), (1, 1, 8, 1)]


def _mesh(shape, devices=None):
    return S.make_mesh(MeshConfig(**dict(zip(S.AXES, shape))), devices)


def _batches():
    rng = np.random.default_rng(0)
    # Low-entropy tokens (a few symbols) so the loss moves visibly over 10 steps.
    toks = rng.integers(0, 8, size=(STEPS, DATA.batch_size, DATA.seq_len + 1), dtype=np.int32) * 3
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in toks]


class Trainer:
    """The trainer's own step and optimizer over the real Transformer, on any mesh. One jitted
    step is shared by all tests, so each mesh compiles once for the whole module."""

    def __init__(self, model: ModelConfig = MODEL):
        from scaling.models.transformer import Transformer
        from scaling.train import optim, step

        self.make = lambda: Transformer(model, rngs=nnx.Rngs(0))
        ocfg = OptimConfig(lr=1e-2, warmup_steps=2)
        self.tx = optim.make_optimizer(ocfg)
        self.split = step.split_model
        self.graphdef = self.split(nnx.eval_shape(self.make))[0]
        self.step = step.make_train_step(self.graphdef, self.tx, z_loss_weight=1e-4, lr_fn=optim.make_lr_fn(ocfg))
        self.batches = _batches()
        self._compiled = {}

    def init(self, mesh):
        model = S.create_sharded_model(self.make, mesh)
        _, params, rest = self.split(model)
        opt_state = S.shard_init(lambda: self.tx.init(params), mesh)
        return {"params": params, "rest": rest, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
                "total_steps": jnp.asarray(STEPS, jnp.int32)}

    def abstract(self, mesh):
        """Restore target on ``mesh``: shapes, dtypes and shardings, nothing allocated."""
        params = S.abstract_sharded(lambda: self.split(self.make())[1], mesh)
        rest = S.abstract_sharded(lambda: self.split(self.make())[2], mesh)
        opt_state = S.abstract_sharded(lambda: self.tx.init(self.split(self.make())[1]), mesh)
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.NamedSharding(mesh, jax.P()))
        return {"params": params, "rest": rest, "opt_state": opt_state, "step": step, "total_steps": step}

    def train(self, state, mesh, steps: range):
        losses = []
        with S.mesh_context(mesh):
            for i in steps:
                batch = S.shard_batch(self.batches[i], mesh)
                key = (mesh.shape_tuple, tuple(d.id for d in mesh.devices.flat))
                if key not in self._compiled:
                    # Same HLO and SPMD partitioning as the trainer's jit; LLVM -O0 only halves
                    # the CPU compile time, which dominates this test.
                    self._compiled[key] = self.step.lower(state, batch).compile({"xla_backend_optimization_level": 0})
                state, metrics = self._compiled[key](state, batch)
                losses.append(float(metrics["loss"]))
        return state, np.array(losses)


@pytest.fixture(scope="module")
def trainer():
    return Trainer()


@pytest.fixture(scope="module")
def reference(trainer):
    """Losses and per-device bytes on one device."""
    mesh = _mesh((1, 1, 1, 1), jax.devices()[:1])
    state, losses = trainer.train(trainer.init(mesh), mesh, range(STEPS))
    assert losses[-1] < losses[0] - 0.5  # it learns, so the comparison below means something
    return {"losses": losses, "params": S.per_device_bytes(state["params"]),
            "opt_state": S.per_device_bytes(state["opt_state"])}


# --------------------------------------------------------------------------------------------
# Acceptance: same losses on every mesh; memory shrinks with fsdp * tensor
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_every_mesh_trains_like_one_device(trainer, reference, shape):
    mesh = _mesh(shape)
    S.validate(MODEL, DATA, mesh)
    state, losses = trainer.train(trainer.init(mesh), mesh, range(STEPS))
    np.testing.assert_allclose(losses, reference["losses"], rtol=1e-5)

    # Measured from the addressable shards *after* training: the step keeps the sharding.
    shrink = shape[1] * shape[2]  # fsdp * tensor
    for part in ("params", "opt_state"):
        ratio = S.per_device_bytes(state[part]) * shrink / reference[part]
        assert abs(ratio - 1) < 0.10, (part, ratio)
    leaf = state["params"]["blocks"][0]["mlp"]["w_in"]
    assert leaf.sharding.is_equivalent_to(jax.NamedSharding(mesh, S.logical_to_spec(("embed", "mlp"))), 2)


@pytest.mark.slow
def test_checkpoint_saved_on_one_mesh_resumes_on_another(trainer, reference, tmp_path):
    from scaling.train.checkpoint import Checkpointer

    mesh_a, mesh_b = _mesh((2, 4, 1, 1)), _mesh((1, 1, 8, 1))
    state, first = trainer.train(trainer.init(mesh_a), mesh_a, range(5))
    Checkpointer(tmp_path / "ckpt").save(5, state, {"pos": 5}, {"step": 5})
    del state

    target = trainer.abstract(mesh_b)
    restored, data_state, _ = Checkpointer(tmp_path / "ckpt").restore(5, target)
    w = restored["params"]["embed"]["embedding"]
    assert w.sharding.is_equivalent_to(jax.NamedSharding(mesh_b, S.logical_to_spec(("vocab", "embed"))), 2)
    assert data_state == {"pos": 5}
    _, second = trainer.train(restored, mesh_b, range(5, STEPS))
    np.testing.assert_allclose(np.concatenate([first, second]), reference["losses"], rtol=1e-5)


@pytest.mark.slow
def test_moe_model_on_all_four_axes_trains_like_one_device():
    """Experts over ``expert``, expert hidden over ``tensor``, d_model over ``fsdp`` at once."""
    from scaling.models.transformer import Transformer
    from scaling.train import optim, step

    cfg = TrainConfig().with_overrides({
        "model.d_model": 64, "model.n_layers": 1, "model.n_heads": 8, "model.d_ff": 128, "model.moe": "on",
        "model.moe.n_experts": 4, "model.moe.top_k": 2, "data.seq_len": 16, "data.batch_size": 16})
    tx = optim.make_optimizer(cfg.optim)
    batches = _batches()[:3]

    def run(mesh):
        S.validate(cfg.model, cfg.data, mesh)
        with S.mesh_context(mesh):
            model = S.create_sharded_model(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)), mesh)
            graphdef, params, rest = step.split_model(model)
            state = {"params": params, "rest": rest, "opt_state": S.shard_init(lambda: tx.init(params), mesh),
                     "step": jnp.zeros((), jnp.int32), "total_steps": jnp.asarray(10, jnp.int32)}
            train = step.make_train_step(graphdef, tx, z_loss_weight=1e-4, lr_fn=optim.make_lr_fn(cfg.optim))
            losses, compiled = [], None
            for b in batches:
                batch = S.shard_batch(b, mesh)
                compiled = compiled or train.lower(state, batch).compile({"xla_backend_optimization_level": 0})
                state, metrics = compiled(state, batch)
                losses.append(float(metrics["loss"]))
        w = state["params"]["blocks"][0]["mlp"]["w_in"]  # [experts, d_model, expert hidden]
        return np.array(losses), w

    ref, _ = run(_mesh((1, 1, 1, 1), jax.devices()[:1]))
    losses, w_in = run(_mesh((1, 2, 2, 2)))
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    assert w_in.addressable_shards[0].data.size == w_in.size // 8  # split over expert x fsdp x tensor


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, before any compilation
# --------------------------------------------------------------------------------------------


@pytest.fixture
def compiles():
    """Counts XLA backend compilations while the test body runs."""
    events = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("text, field", [
    ("data=3", "mesh.data"),                   # does not divide 8 devices
    ("data=-1,fsdp=3", "mesh.fsdp"),
    ("data=2,fsdp=2", "mesh.data"),            # product 4 != 8, no -1 to absorb the rest
    ("data=2,tensor=8", "mesh.tensor"),        # 16 > 8
    ("foo=2", "mesh.foo"),                     # unknown axis
    ("data=2,data=4", "mesh.data"),
    ("fsdp=two", "mesh.fsdp"),
    ("data", "mesh"),
])
def test_bad_mesh_input_names_the_axis(text, field, compiles):
    with pytest.raises(ConfigError) as err:
        S.make_mesh(S.parse_mesh(text))
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)
    assert compiles == []


def test_mesh_sizes_resolve_the_rest():
    assert S.parse_mesh("data=2,fsdp=4") == MeshConfig(data=2, fsdp=4, tensor=1, expert=1)
    assert S.parse_mesh("tensor=-1,fsdp=2") == MeshConfig(data=1, fsdp=2, tensor=-1, expert=1)
    assert dict(S.make_mesh(S.parse_mesh("tensor=2")).shape) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}
    assert dict(S.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=2)).shape)["fsdp"] == 4
    mesh = S.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
    assert mesh.axis_names == S.AXES and mesh.size == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)  # GSPMD, not explicit


@pytest.mark.parametrize("model, data, mesh, field", [
    (dict(d_model=52, n_heads=2), {}, dict(fsdp=8), "model.d_model"),
    (dict(d_ff=90), {}, dict(tensor=4), "model.d_ff"),
    (dict(n_heads=4, d_model=64), {}, dict(tensor=8), "model.n_heads"),
    (dict(n_kv_heads=2), {}, dict(tensor=4), "model.n_kv_heads"),
    (dict(vocab_size=260), {}, dict(tensor=8), "model.vocab_size"),
    ({}, dict(batch_size=12), dict(data=8), "data.batch_size"),
    ({}, dict(batch_size=12), dict(data=2, fsdp=4), "data.batch_size"),
    ({}, {}, dict(data=4, expert=2), "mesh.expert"),  # dense model: nothing to put on experts
    (dict(moe=MoEConfig(n_experts=3, top_k=1)), {}, dict(data=4, expert=2), "model.moe.n_experts"),
])
def test_indivisible_dimension_is_rejected_before_compilation(model, data, mesh, field, compiles):
    sizes = {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1} | mesh
    with pytest.raises(ConfigError) as err:
        S.validate(ModelConfig(**{**dict(vocab_size=256, d_model=64, n_heads=8, d_ff=256), **model}),
                   DataConfig(**{"batch_size": 16, **data}), S.make_mesh(MeshConfig(**sizes)))
    msg = str(err.value)
    assert msg.startswith(field + ":")
    assert field.startswith("mesh.") or any(f"mesh.{a}" in msg for a in mesh), msg
    assert compiles == []


def test_parameter_that_does_not_divide_its_axis_fails_at_placement_not_in_xla(compiles):
    """A model whose shapes slip past ``validate`` (here: no validate call) still fails with a
    ConfigError naming the parameter, from the abstract shapes, before any compilation."""
    from scaling.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=8, d_ff=90)
    with pytest.raises(ConfigError, match=r"^model.d_ff: parameter .*w_in.* tensor=4"):
        S.create_sharded_model(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), S.make_mesh(MeshConfig(data=2, tensor=4)))
    assert compiles == []


# --------------------------------------------------------------------------------------------
# Pieces: rules, batches, per-host data, memory report, multi-host start-up
# --------------------------------------------------------------------------------------------


def test_logical_rules_map_params_and_activations():
    assert S.logical_to_spec(("vocab", "embed")) == jax.P("tensor", "fsdp")
    assert S.logical_to_spec(("embed", "heads", "kv")) == jax.P("fsdp", "tensor", None)
    assert S.logical_to_spec(("expert", "embed", "mlp")) == jax.P("expert", "fsdp", "tensor")
    # In activations the batch already holds fsdp, so embed stays whole (a mesh axis once per array).
    assert S.logical_to_spec(("batch", "length", "embed")) == jax.P(("data", "fsdp", "expert"), None, None)
    # batch rows go over the expert axis too, so expert devices do not repeat attention
    assert S.batch_sharding(S.make_mesh(MeshConfig(data=2, expert=4))).spec == jax.P(("data", "fsdp", "expert"), None)
    assert S.logical_to_spec(("batch", "length", "heads", "kv")) == jax.P(("data", "fsdp", "expert"), None, "tensor", None)


def test_batches_are_split_over_data_and_fsdp():
    mesh = _mesh((2, 2, 2, 1))
    tokens = np.arange(16 * 4, dtype=np.int32).reshape(16, 4)
    batch = S.shard_batch({"inputs": tokens}, mesh)["inputs"]
    assert batch.sharding == S.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(batch), tokens)
    rows = {d: s.data.shape[0] for s in batch.addressable_shards for d in [s.device]}
    assert set(rows.values()) == {16 // 4}  # data*fsdp = 4 row blocks, replicated over tensor
    assert S.host_data_shard(mesh, 16) == (0, 1)  # one process loads the whole global batch


def test_constrain_is_a_no_op_without_a_mesh_and_shards_with_one():
    x = jnp.ones((16, 4, 64))
    assert S.constrain(x, ("batch", "length", "embed")) is x
    mesh = _mesh((2, 4, 1, 1))
    with S.mesh_context(mesh):
        y = jax.jit(lambda v: S.constrain(v * 2, ("batch", "length", "embed")))(x)
        z = jax.jit(lambda v: S.constrain(v, ("batch", "length", "embed")))(jnp.ones((3, 4, 64)))  # 3 rows
    assert y.sharding.is_equivalent_to(jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None, None)), 3)
    assert z.shape == (3, 4, 64)  # indivisible dim left unconstrained rather than an XLA error


def test_nnx_optimizer_state_inherits_parameter_sharding():
    import optax
    from scaling.models.transformer import Transformer

    mesh = _mesh((1, 4, 2, 1))
    model = S.create_sharded_model(lambda: Transformer(MODEL, rngs=nnx.Rngs(0)), mesh)
    opt = S.create_sharded_model(lambda: nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param), mesh)
    mu = opt.opt_state[0].mu["blocks"][0]["attn"]["wo"]
    assert mu.sharding == model.blocks[0].attn.wo.sharding
    assert mu.sharding.spec == S.logical_to_spec(("heads", "kv", "embed"))
    # Adam keeps two moments per parameter; both are divided over fsdp*tensor like the params.
    report = S.memory_report(model, opt, TrainConfig(model=MODEL, data=DATA), mesh)
    assert report["params"] == pytest.approx(report["params_unsharded"] / 8, rel=0.1)
    assert report["opt_state"] == pytest.approx(2 * report["params"], rel=0.01)


def test_activation_estimate_scales_with_batch_and_mesh():
    cfg = ModelConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=4)
    data = DataConfig(batch_size=16, seq_len=256)
    one = S.activation_bytes_estimate(cfg, data, {"data": 1})
    # Hand count, per token and layer: 5*256 (residual/norms) + 4*4*64 (q,k,v,o) + 2*4*256
    # (scores, probs) + 2*1024 (GELU hidden in/out), float32; logits+grad 2*256 float32.
    per_token = 4 * (5 * 256 + 4 * 4 * 64 + 2 * 4 * 256 + 2 * 1024) * 4 + 2 * 256 * 4
    assert one == 16 * 256 * per_token
    assert S.activation_bytes_estimate(cfg, data, {"data": 8}) == pytest.approx(one / 8, rel=1e-6)
    # tensor divides only the head/mlp/vocab parts, never the residual stream
    t2 = S.activation_bytes_estimate(cfg, data, {"tensor": 2})
    assert one / 2 < t2 < one


@pytest.mark.parametrize("env, plan", [
    ({}, None),
    ({"SCALING_COORDINATOR": "n0:1234", "SCALING_NUM_PROCESSES": "4", "SCALING_PROCESS_ID": "2"},
     {"coordinator_address": "n0:1234", "num_processes": 4, "process_id": 2}),
    ({"SCALING_NUM_PROCESSES": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[0-1]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0"}, {"cluster_detection_method": "slurm"}),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n0", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, None),  # one task: a single-process trial inside SLURM
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[0-1]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0", "SCALING_DISTRIBUTED": "off"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[0-1]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"},
     {"cluster_detection_method": "slurm", "local_device_ids": list(range(8))}),  # one task per node
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[0-1]", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
      "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"},
     {"cluster_detection_method": "slurm"}),  # one task per GPU: JAX picks GPU SLURM_LOCALID
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
    ({"SCALING_DISTRIBUTED": "auto"}, {}),
])
def test_distributed_plan_from_environment(env, plan):
    assert distributed_plan(env) == plan


@pytest.mark.parametrize("env, field", [
    ({"SCALING_NUM_PROCESSES": "2", "SCALING_PROCESS_ID": "0"}, "SCALING_COORDINATOR"),
    ({"SCALING_NUM_PROCESSES": "2", "SCALING_COORDINATOR": "n0:1", "SCALING_PROCESS_ID": "2"}, "SCALING_PROCESS_ID"),
    ({"SCALING_NUM_PROCESSES": "x"}, "SCALING_NUM_PROCESSES"),
    ({"SCALING_DISTRIBUTED": "maybe"}, "SCALING_DISTRIBUTED"),
])
def test_distributed_plan_errors_name_the_variable(env, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        distributed_plan(env)


@pytest.mark.parametrize("executor, extra, plan", [
    ("local", {"SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
               "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
               "JAX_COORDINATOR_PORT": "23456"},
     {"coordinator_address": "localhost:23456", "num_processes": 2, "process_id": 1}),
    ("slurm", {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
               "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[3-4]",
               "SLURM_GPUS_ON_NODE": "8", "JAX_COORDINATOR_PORT": "1234"},
     {"coordinator_address": "gpu3:1234", "num_processes": 16, "process_id": 9, "local_device_ids": [1]}),
    ("slurm", {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
               "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[3-4]",
               "SLURM_GPUS_ON_NODE": "8", "JAX_COORDINATOR_PORT": "1234"},
     {"coordinator_address": "gpu3:1234", "num_processes": 2, "process_id": 1, "local_device_ids": list(range(8))}),
    ("local", {"SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_GLOBALID": "0",
               "SUBMITIT_LOCAL_LOCALID": "0"}, None),
])
def test_distributed_plan_from_a_submitit_task(monkeypatch, executor, extra, plan):
    """A submitit task (SLURM or the local executor) reads its layout through
    ``submitit.JobEnvironment``; tasks of one job agree on the coordinator."""
    import os

    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    assert distributed_plan(os.environ) == plan
    if plan is not None:  # without a port every task derives the same one from the job id
        monkeypatch.delenv("JAX_COORDINATOR_PORT")
        a = distributed_plan(os.environ)["coordinator_address"]
        monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID" if executor == "local" else "SLURM_PROCID", "0")
        assert distributed_plan(os.environ)["coordinator_address"] == a


def test_single_process_initialisation_is_a_no_op():
    assert initialize_distributed({}) == (0, 1)
    assert not jax.distributed.is_initialized()
    assert math.prod(S.mesh_shape(MeshConfig(), jax.device_count()).values()) == jax.device_count()


@pytest.mark.slow
def test_gradient_accumulation_trains_like_one_pass_on_one_device_and_on_eight(trainer, reference):
    """``data.microbatch``: 4 passes of 4 sequences on one device, and 2 passes of 1 sequence on
    each of 8 devices, give the one-device one-pass losses over the module's steps (float32,
    within 1e-5 relative); the per-device batch that a microbatch does not divide is refused."""
    import dataclasses

    from scaling.train import optim, step

    ocfg = OptimConfig(lr=1e-2, warmup_steps=2)

    def losses_of(mesh, accum, shards, n_steps=2 * STEPS):  # 20 steps: the module's batches twice
        st = step.make_train_step(trainer.graphdef, trainer.tx, z_loss_weight=1e-4, lr_fn=optim.make_lr_fn(ocfg),
                                  accum=accum, shards=shards)
        state, out = trainer.init(mesh), []
        with S.mesh_context(mesh):
            compiled = None
            for i in range(n_steps):
                batch = S.shard_batch(trainer.batches[i % STEPS], mesh)
                compiled = compiled or st.lower(state, batch).compile({"xla_backend_optimization_level": 0})
                state, m = compiled(state, batch)
                out.append(float(m["loss"]))
        return np.array(out)

    one = _mesh((1, 1, 1, 1), jax.devices()[:1])
    plain = losses_of(one, 1, 1)
    np.testing.assert_allclose(plain[:STEPS], reference["losses"], rtol=1e-6)  # the module's reference
    for shape, micro, devices in (((1, 1, 1, 1), 4, jax.devices()[:1]), ((8, 1, 1, 1), 1, None)):
        mesh = _mesh(shape, devices)
        accum, shards = S.accumulation(dataclasses.replace(DATA, microbatch=micro), mesh)
        assert accum == {4: 4, 1: 2}[micro] and shards == shape[0]
        np.testing.assert_allclose(losses_of(mesh, accum, shards), plain, rtol=1e-5)
    with pytest.raises(ConfigError, match="data.microbatch: 4 sequences does not divide the per-device batch of 2"):
        S.validate(MODEL, DataConfig(source="synthetic", batch_size=16, seq_len=16, microbatch=4), _mesh((8, 1, 1, 1)))


@pytest.mark.slow
def test_scanned_layers_on_a_mesh_train_like_the_loop_on_one_device():
    """``model.scan_layers`` on a (data 2, fsdp 2, tensor 2) mesh: the stacked parameters keep
    their logical sharding behind a replicated layer axis, and the losses are the loop model's
    on one device (float32, 1e-5 relative)."""
    import dataclasses

    m = dataclasses.replace(MODEL, n_layers=2)
    loop_t, scan_t = Trainer(m), Trainer(dataclasses.replace(m, scan_layers=True))
    one, mesh = _mesh((1, 1, 1, 1), jax.devices()[:1]), _mesh((2, 2, 2, 1))
    _, ref = loop_t.train(loop_t.init(one), one, range(STEPS))
    state, got = scan_t.train(scan_t.init(mesh), mesh, range(STEPS))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    w = state["params"]["stack"][0]["mlp"]["w_in"]
    assert w.shape == (2, 64, 256)
    assert w.sharding.is_equivalent_to(jax.NamedSharding(mesh, S.logical_to_spec(("layers", "embed", "mlp"))), 3)


def test_activations_are_constrained_by_the_parameter_rules():
    """MaxText-style activation sharding from ``LOGICAL_RULES``: per block the lowered forward
    constrains q, k, v and the attention output (heads over ``tensor``), the MLP hidden (``mlp``
    over ``tensor``) and the residual stream twice (rows over the batch axes, embed whole)."""
    from scaling.models.transformer import Transformer

    m = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, d_ff=256)
    mesh = _mesh((2, 2, 2, 1))
    model = S.create_sharded_model(lambda: Transformer(m, rngs=nnx.Rngs(0)), mesh)
    with S.mesh_context(mesh):
        toks = S.shard_batch({"inputs": jnp.zeros((16, 16), jnp.int32)}, mesh)["inputs"]
        text = jax.jit(lambda mm, t: mm(t)[0]).lower(model, toks).as_text()
    lines = [line for line in text.splitlines() if "sharding_constraint" in line]
    assert len(lines) == 7 * m.n_layers + 2  # + the embedding table (whole along d) and its output
    rows = '{"data", "fsdp", "expert"}'
    assert sum(f'[{rows}, {{}}, {{"tensor"}}, {{}}]' in line for line in lines) == 4 * m.n_layers  # q, k, v, o
    assert sum(f'[{rows}, {{}}, {{"tensor"}}]' in line for line in lines) == m.n_layers  # MLP hidden
    assert sum(f'[{rows}, {{}}, {{}}]' in line for line in lines) == 2 * m.n_layers + 1  # residual stream
    assert sum('[{"tensor"}, {}]' in line for line in lines) == 1  # the embedding table, vocab over tensor
