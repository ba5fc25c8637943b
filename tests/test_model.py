"""The dense transformer: causality, equivalences (GQA, tied head, RoPE), partitioning
metadata, bf16 compute, sparse-block hooks; and the family size rule."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling import flops
from scaling.config import ConfigError, MoDConfig, MoEConfig, ModelConfig
from scaling.models import family, layers
from scaling.models.transformer import Transformer

SMALL = ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=64)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def _tokens(B=2, L=16, V=64, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, L), 0, V, dtype=jnp.int32)


@pytest.mark.parametrize(
    "cfg",
    [SMALL, dataclasses.replace(SMALL, n_kv_heads=2, activation="swiglu", qk_norm=True, tie_embeddings=False)],
    ids=["gelu-tied", "swiglu-gqa-qknorm-untied"],
)
def test_logits_are_causal(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens()
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    a, aux = forward(model, tokens)
    b, _ = forward(model, changed)
    assert a.shape == (2, 16, cfg.vocab_size) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
    assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > 1e-4  # and the future does see it
    assert float(aux["aux_loss"]) == 0.0


def _copy(dst: nnx.Module, src: nnx.Module, transform=lambda path, x: x):
    src_state = nnx.to_flat_state(nnx.state(src, nnx.Param))
    dst_state = nnx.state(dst, nnx.Param)
    flat = nnx.to_flat_state(dst_state)
    for (path, var), (spath, svar) in zip(flat, src_state):
        assert path == spath
        var.set_value(transform(path, svar.get_value()))
    nnx.update(dst, nnx.from_flat_state(flat))


def test_grouped_query_attention_equals_mha_with_shared_kv_heads():
    gqa_cfg = dataclasses.replace(SMALL, n_kv_heads=2)
    gqa = Transformer(gqa_cfg, rngs=nnx.Rngs(1))
    mha = Transformer(SMALL, rngs=nnx.Rngs(2))
    # query heads 2j and 2j+1 share kv head j: repeat each kv head twice
    repeat = lambda path, x: jnp.repeat(x, 2, axis=1) if path[-1] in ("wk", "wv") else x
    _copy(mha, gqa, repeat)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(forward(gqa, tokens)[0]), np.asarray(forward(mha, tokens)[0]), atol=2e-5, rtol=1e-5)


def test_tied_head_equals_untied_head_set_to_embedding_transpose():
    tied = Transformer(SMALL, rngs=nnx.Rngs(0))
    untied = Transformer(dataclasses.replace(SMALL, tie_embeddings=False), rngs=nnx.Rngs(0))
    for name in ("embed", "blocks", "final_norm"):
        nnx.update(getattr(untied, name), nnx.state(getattr(tied, name), nnx.Param))
    untied.head.set_value(tied.embed.embedding.get_value().T)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(forward(tied, tokens)[0]), np.asarray(forward(untied, tokens)[0]), atol=1e-6)
    assert flops.param_counts(untied.cfg).total - flops.param_counts(SMALL).total == 64 * 32


def test_rope_attention_depends_only_on_relative_positions():
    cfg = dataclasses.replace(SMALL, qk_norm=True)
    rngs = nnx.Rngs(3)
    with layers.one_draw_init(rngs):
        attn = layers.Attention(cfg, rngs=rngs)
    x = jax.random.normal(jax.random.key(4), (2, 12, 32))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    run = nnx.jit(lambda a, p: a(x, p))
    y0 = run(attn, pos)
    np.testing.assert_allclose(np.asarray(run(attn, pos + 37)), np.asarray(y0), atol=2e-5)
    # ...while an uneven change of positions changes the output (RoPE is really applied)
    assert float(jnp.max(jnp.abs(run(attn, pos * 2) - y0))) > 1e-3


ALLOWED_AXES = {"embed", "mlp", "heads", "kv", "vocab", "expert", "layers", None}


@pytest.mark.parametrize(
    "cfg",
    [dataclasses.replace(SMALL, activation="swiglu", qk_norm=True, tie_embeddings=False, n_kv_heads=2),
     dataclasses.replace(SMALL, moe=MoEConfig(n_experts=4, top_k=1, every=2), mod=MoDConfig(capacity=0.5, every=2))],
    ids=["dense", "moe+mod"],
)
def test_every_parameter_has_logical_axes(cfg):
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(flat) > 10
    for path, var in flat:
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.get_value().ndim, path
        assert set(axes) <= ALLOWED_AXES, (path, axes)
    by_name = {path[-1]: var.get_metadata()["out_sharding"] for path, var in flat}
    assert by_name["embedding"] == ("vocab", "embed")
    assert by_name["wq"] == ("embed", "heads", "kv") and by_name["wo"] == ("heads", "kv", "embed")
    if cfg.moe is None:
        assert by_name["w_in"] == ("embed", "mlp") and by_name["head"] == ("embed", "vocab")


def test_bfloat16_compute_keeps_float32_params_and_logits():
    f32 = Transformer(SMALL, rngs=nnx.Rngs(0))
    bf16 = Transformer(dataclasses.replace(SMALL, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    tokens = _tokens()
    a, b = forward(f32, tokens)[0], forward(bf16, tokens)[0]
    assert b.dtype == jnp.float32
    diff = float(jnp.max(jnp.abs(a - b)))
    assert 0 < diff < 0.05 * float(jnp.max(jnp.abs(a)))  # rounded (bf16 really used), not broken


def test_sparse_block_hooks_and_aux_metrics():
    from scaling.models.mod import MoDBlock
    from scaling.models.moe import MoELayer

    cfg = dataclasses.replace(SMALL, n_layers=2, moe=MoEConfig(n_experts=4, top_k=2, every=2, aux_loss_weight=0.5, z_loss_weight=0.25))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert isinstance(model.blocks[0].mlp, layers.MLP) and isinstance(model.blocks[1].mlp, MoELayer)
    _, aux = forward(model, _tokens())
    assert "l1/moe/drop_fraction" in aux and not any(k.startswith("l0/") for k in aux)
    expected = 0.5 * aux["l1/moe/lb_loss"] + 0.25 * aux["l1/moe/z_loss"]
    np.testing.assert_allclose(float(aux["aux_loss"]), float(expected), rtol=1e-6)

    # MoD at capacity 1 without router scaling selects every token in order: equals the dense model
    dense = Transformer(SMALL, rngs=nnx.Rngs(5))
    mod_cfg = dataclasses.replace(SMALL, mod=MoDConfig(capacity=1.0, every=2, router_scale=False))
    routed = Transformer(mod_cfg, rngs=nnx.Rngs(6))
    assert isinstance(routed.blocks[1], MoDBlock) and isinstance(routed.blocks[0], layers.Block)
    for name in ("embed", "final_norm"):
        nnx.update(getattr(routed, name), nnx.state(getattr(dense, name), nnx.Param))
    nnx.update(routed.blocks[0], nnx.state(dense.blocks[0], nnx.Param))
    nnx.update(routed.blocks[1].block, nnx.state(dense.blocks[1], nnx.Param))
    tokens = _tokens()
    logits, aux = forward(routed, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(dense, tokens)[0]), atol=1e-5)
    assert float(aux["l1/mod/selected_fraction"]) == 1.0


# ---- family size rule ----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_family_hits_targets_from_5k_to_1b(activation):
    base = ModelConfig(vocab_size=256, activation=activation, n_heads=8, n_kv_heads=4)
    targets = [5e3 * 2**k for k in range(0, 9)] + [1e7, 1e8, 1e9]  # 5K..1.3M on a 2x grid, then up
    sizes = []
    for n in targets:
        cfg = family.model_for_params(n, base)
        got = flops.param_counts(cfg).non_embedding
        sizes.append(got)
        assert abs(got / n - 1) < (0.25 if n < 2e4 else 0.12), (n, got, cfg.d_model, cfg.n_layers)
        assert cfg.d_model % cfg.resolved_head_dim == 0 and cfg.n_heads * cfg.resolved_head_dim == cfg.d_model
        assert cfg.activation == activation and cfg.vocab_size == 256
        if cfg.n_kv_heads is not None:
            assert cfg.n_heads // cfg.n_kv_heads == 2  # base's grouping kept
        if n >= 1e5:  # a sensible aspect ratio once there is room for one
            assert 8 <= cfg.d_model / cfg.n_layers <= 128, (n, cfg.d_model, cfg.n_layers)
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)  # a 2x grid stays a grid
    big = family.model_for_params(1e9, base)
    assert big.d_model >= 1024 and 12 <= big.n_layers <= 40 and big.resolved_head_dim >= 64


def test_dense_experiment_default_and_size_rule():
    import experiments

    cfg = experiments.get("dense")
    n = flops.param_counts(cfg.model).non_embedding
    assert 8e4 <= n <= 1.2e5 and cfg.budget.flops == 1e12  # the issue's ~100K model at 1e12
    sized = experiments.load("dense").model_for_params(3e5)
    assert math.isclose(flops.param_counts(sized).non_embedding, 3e5, rel_tol=0.12)
    assert sized.tie_embeddings == cfg.model.tie_embeddings and sized.activation == cfg.model.activation


def test_remat_keeps_the_loss_and_cuts_the_saved_activations():
    """``model.remat``: the same loss and gradients (recomputation, not new maths); the residuals
    the backward pass keeps for the issue's 12-layer d256 seq-1024 model fall >= 2x with
    ``full`` (read from the traced program; XLA's compiled temp bytes are checked in
    ``test_train_bench`` with scanned blocks, where the CPU compiler shows them)."""
    import experiments
    from scaling.models.remat import saved_residual_bytes
    from scaling.train import step as step_lib

    def loss_and_grad(extra, toks):
        cfg = experiments.get("dense").with_overrides(extra)
        g, params, rest = step_lib.split_model(Transformer(cfg.model, rngs=nnx.Rngs(0)))

        def loss(p):
            logits, _ = nnx.merge(g, p, rest)(toks)
            return jnp.mean(logits ** 2)

        return loss, params

    small = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=16"]
    toks = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 256
    ref_loss, ref_params = loss_and_grad(small, toks)
    v0, g0 = jax.value_and_grad(ref_loss)(ref_params)
    for policy in ("full", "dots_saveable"):
        fn, params = loss_and_grad([*small, f"model.remat={policy}"], toks)
        v, g = jax.value_and_grad(fn)(params)
        assert float(v) == pytest.approx(float(v0), rel=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, g0)
    big = ["model.d_model=256", "model.n_layers=12", "model.n_heads=4", "data.seq_len=1024"]
    toks = jnp.zeros((2, 1024), jnp.int32)
    none = saved_residual_bytes(*loss_and_grad(big, toks))
    full = saved_residual_bytes(*loss_and_grad([*big, "model.remat=full"], toks))
    assert none >= 2 * full, (none, full)
    with pytest.raises(ConfigError, match="model.remat: must be one of none, full"):
        experiments.get("dense").with_overrides(["model.remat=sometimes"])


def test_attention_kernel_by_backend():
    """``model.attention``: auto is cuDNN flash attention on a GPU in bfloat16, splash on a TPU
    where its tiles fit, XLA otherwise; cudnn named where it cannot run is one ConfigError naming the field."""
    from scaling.config import ModelConfig
    from scaling.models.layers import attention_implementation

    bf16, f32 = ModelConfig(dtype="bfloat16"), ModelConfig()
    assert attention_implementation(bf16, "gpu") == "cudnn" and attention_implementation(f32, "gpu") == "xla"
    assert attention_implementation(bf16, "cpu") == "xla"
    # splash on a TPU where its 128-wide tiles fit the head dim and the sequence
    e128 = ModelConfig(d_model=512, n_heads=4)
    assert attention_implementation(e128, "tpu", seq_len=2048) == "splash"
    assert attention_implementation(e128, "tpu", seq_len=1000) == attention_implementation(bf16, "tpu") == "xla"
    with pytest.raises(ConfigError, match="model.head_dim: splash attention needs a multiple of 128, got 32"):
        attention_implementation(ModelConfig(attention="splash"), "tpu")
    with pytest.raises(ConfigError, match="data.seq_len: splash attention needs a multiple of 128, got 1000"):
        attention_implementation(dataclasses.replace(e128, attention="splash"), "tpu", seq_len=1000)
    with pytest.raises(ConfigError, match="model.attention: cudnn needs a GPU backend, this one is cpu"):
        attention_implementation(ModelConfig(attention="cudnn", dtype="bfloat16"), "cpu")
    with pytest.raises(ConfigError, match="model.attention: cudnn flash attention takes 16-bit inputs"):
        attention_implementation(ModelConfig(attention="cudnn"), "gpu")
    # head dimensions cuDNN's kernel rejects (12 = d_model 24 / 2 heads) fall back under auto
    odd = ModelConfig(d_model=24, n_heads=2, dtype="bfloat16")
    assert attention_implementation(odd, "gpu") == "xla"
    with pytest.raises(ConfigError, match="model.head_dim: cudnn flash attention needs .* got 12"):
        attention_implementation(dataclasses.replace(odd, attention="cudnn"), "gpu")


def test_splash_attention_matches_xla_on_one_device_and_a_mesh():
    """``model.attention=splash`` (Pallas splash attention, run in Pallas' interpreter on the
    CPU): outputs and gradients of q, k, v equal XLA's causal attention, grouped-query, with a
    μP-style scale, on one device and per shard on a data=2 x tensor=4 mesh (heads split;
    the 2 kv heads do not split 4 ways and are repeated)."""
    from scaling import sharding
    from scaling.config import MeshConfig
    from scaling.models.layers import causal_attention

    B, L, H, K, E = 4, 256, 4, 2, 32
    kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (B, L, n, E)) for key, n in ((kq, H), (kk, K), (kv, K)))
    w = jax.random.normal(kw, (B, L, H, E))

    def loss(impl):
        return lambda q, k, v: jnp.sum(causal_attention(q, k, v, scale=1 / E, implementation=impl,
                                                        interpret=True) * w)

    ref = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    one = jax.value_and_grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    mesh = sharding.make_mesh(MeshConfig(data=2, tensor=4))
    with sharding.mesh_context(mesh):
        sharded = jax.jit(jax.value_and_grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
    for got in (one, sharded):
        assert float(got[0]) == pytest.approx(float(ref[0]), rel=1e-5)
        for g, r in zip(got[1], ref[1]):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="model.attention: splash needs a TPU backend, this one is cpu"):
        from scaling.models.layers import attention_implementation

        attention_implementation(ModelConfig(attention="splash"), "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    {},
    {"moe": MoEConfig(n_experts=4, top_k=1, every=2), "remat": "full"},
    {"mod": MoDConfig(capacity=0.5, every=2)},
])
def test_scanned_blocks_equal_the_loop(extra):
    """``model.scan_layers``: the stacked model starts from the loop model's parameters (the
    same draws, stacked) and gives the same loss, aux metrics per layer and gradients; MoE or
    MoD every second layer scans over the repeating pair (the MoE case rematerialised too)."""
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=2, **extra)
    toks = (jnp.arange(64, dtype=jnp.int32).reshape(2, 32) * 7) % 256

    def run(c):
        from scaling.train import step as step_lib

        g, params, rest = step_lib.split_model(Transformer(c, rngs=nnx.Rngs(0)))

        def loss(p):
            logits, aux = nnx.merge(g, p, rest)(toks)
            return jnp.mean(logits ** 2) + aux["aux_loss"], aux

        (v, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return float(v), aux, grads

    v0, aux0, g0 = run(cfg)
    v1, aux1, g1 = run(dataclasses.replace(cfg, scan_layers=True))
    assert v1 == pytest.approx(v0, rel=1e-6)
    assert set(aux1) == set(aux0)
    for k in aux0:
        np.testing.assert_allclose(aux1[k], aux0[k], rtol=1e-5, atol=1e-7)
    # layer i of the loop is slice i // period, block i % period of the stack
    period = cfg.layer_period()
    wq = lambda b: (b["attn"] if "attn" in b else b["block"]["attn"])["wq"][...]  # noqa: E731 (MoD wraps a block)
    for i in range(cfg.n_layers):
        np.testing.assert_allclose(wq(g1["stack"][i % period])[i // period], wq(g0["blocks"][i]), rtol=1e-5, atol=1e-8)


def test_layout_conversion_round_trips_parameters_and_adam_moments():
    """``scaling.models.layout.convert``: the loop model's state converted to the scanned layout
    is the scanned model's (same structure, same values, the stacked axis named ``layers``), and
    back; Adam's moments inside the optax state convert with the parameters."""
    from scaling.config import OptimConfig
    from scaling.models import layout
    from scaling.train import optim
    from scaling.train import step as step_lib

    cfg = ModelConfig(d_model=16, n_layers=4, n_heads=2, moe=MoEConfig(n_experts=4, top_k=1, every=2))
    _, p_loop, rest = step_lib.split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    _, p_scan, _ = step_lib.split_model(Transformer(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0)))
    same = lambda a, b: jax.tree.structure(a) == jax.tree.structure(b) and all(  # noqa: E731
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert same(layout.convert(p_loop, cfg, to_scan=True), p_scan)
    assert same(layout.convert(p_scan, cfg, to_scan=False), p_loop)
    assert layout.convert(p_loop, cfg, to_scan=True)["stack"][1]["mlp"]["router"].get_metadata()["out_sharding"][0] == "layers"
    tx = optim.make_optimizer(OptimConfig())
    st = step_lib.init_state(p_loop, rest, tx)
    assert same(layout.convert(st, cfg, to_scan=True)["opt_state"], step_lib.init_state(p_scan, rest, tx)["opt_state"])


def test_models_built_in_two_threads_at_once_draw_their_own_parameters(monkeypatch):
    """The one-draw initialiser keeps its pending parameters per thread: models built
    concurrently (different seeds, different shapes) equal the same models built one by one.
    A short sleep per parameter makes the threads interleave (a shared buffer fails here)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    make = layers.param
    monkeypatch.setattr(layers, "param", lambda *a, **k: (time.sleep(0.002), make(*a, **k))[1])

    cfgs = [ModelConfig(d_model=32, n_layers=2, n_heads=2), ModelConfig(d_model=48, n_layers=3, n_heads=4)]

    def build(i):
        model = Transformer(cfgs[i % 2], rngs=nnx.Rngs(i))
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

    alone = [build(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(build, range(4)))
    for a, b in zip(alone, together):
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
