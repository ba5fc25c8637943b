"""Mixture-of-depths: equivalence with the dense block, gathered attention equal to a masked
dense computation in original positions, router losses and metrics, bad configs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.config import ConfigError, MoDConfig, ModelConfig, MoEConfig
from scaling.models.layers import Block, rope
from scaling.models.mod import MoDBlock, n_selected
from scaling.models.moe import MoELayer
from scaling.models.transformer import Transformer


def _cfg(**mod):
    return ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, init_std=0.2, mod=MoDConfig(**mod))


def _fwd(m, x, **kw):
    """One jitted call (a whole compiled program is several times faster than op-by-op here)."""
    return nnx.jit(lambda m, x: m(x, **kw))(m, x)


def _x(B=2, L=16, D=32, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, L, D))


def _positions(B, L):
    return jnp.broadcast_to(jnp.arange(L), (B, L))


def test_capacity_one_without_router_scaling_equals_dense_block():
    cfg = _cfg(capacity=1.0, router_scale=False)
    block = Block(cfg, rngs=nnx.Rngs(0))
    routed = MoDBlock(cfg, block, rngs=nnx.Rngs(1))
    x = _x()
    y_dense, _ = _fwd(block, x, positions=_positions(2, 16))
    y_mod, aux = _fwd(routed, x, positions=_positions(2, 16))
    np.testing.assert_allclose(np.asarray(y_mod), np.asarray(y_dense), atol=1e-5, rtol=1e-5)
    assert float(aux["mod/selected_fraction"]) == 1.0


@pytest.mark.slow
def test_capacity_one_transformer_equals_dense_transformer():
    dense = Transformer(ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_layers=2), rngs=nnx.Rngs(0))
    routed = Transformer(_cfg(capacity=1.0, router_scale=False, every=1), rngs=nnx.Rngs(0))
    nnx.update(routed.embed, nnx.state(dense.embed))
    nnx.update(routed.final_norm, nnx.state(dense.final_norm))
    for rb, db in zip(routed.blocks, dense.blocks):
        nnx.update(rb.block, nnx.state(db))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    np.testing.assert_allclose(np.asarray(_fwd(routed, tokens)[0]), np.asarray(_fwd(dense, tokens)[0]), atol=1e-5, rtol=1e-5)


def _masked_dense_reference(routed: MoDBlock, x, selected_BxL):
    """The routed block written as a dense computation: every token's q/k/v at its true
    position, attention masked to selected keys (causal), the MLP on all tokens, and only the
    selected tokens' updates (scaled by sigmoid of the router logit) added back."""
    blk, cfg = routed.block, routed.cfg
    B, L, D = x.shape
    H, E = cfg.n_heads, cfg.resolved_head_dim
    pos = _positions(B, L)
    h = blk.attn_norm(x)
    q = rope(jnp.einsum("bld,dhe->blhe", h, blk.attn.wq[...]), pos, cfg.rope_theta)
    k = rope(jnp.einsum("bld,dhe->blhe", h, blk.attn.wk[...]), pos, cfg.rope_theta)
    v = jnp.einsum("bld,dhe->blhe", h, blk.attn.wv[...])
    s = jnp.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(E)
    allowed = jnp.tril(jnp.ones((L, L), bool))[None, None] & selected_BxL[:, None, None, :]
    p = jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1)
    a = jnp.einsum("bhqk,bkhe->bqhe", p, v)
    x1 = x + jnp.einsum("blhe,hed->bld", a, blk.attn.wo[...])
    y = x1 + blk.mlp(blk.mlp_norm(x1))[0]
    w = jax.nn.sigmoid(routed.router_logits(x))
    return jnp.where(selected_BxL[..., None], x + w[..., None] * (y - x), x)


@pytest.mark.parametrize("capacity", [0.25, 0.5])
def test_gathered_block_equals_masked_dense_computation(capacity):
    cfg = _cfg(capacity=capacity)
    routed = MoDBlock(cfg, Block(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    x = _x()
    y, aux = _fwd(routed, x, positions=_positions(2, 16))
    k = n_selected(capacity, 16)
    logits = routed.router_logits(x)
    kth = jnp.sort(logits, axis=-1)[:, -k][:, None]
    selected = logits >= kth
    assert int(selected.sum()) == 2 * k
    np.testing.assert_allclose(np.asarray(y), np.asarray(nnx.jit(_masked_dense_reference)(routed, x, selected)), atol=2e-5, rtol=1e-5)
    assert np.array_equal(np.asarray(y)[~np.asarray(selected)], np.asarray(x)[~np.asarray(selected)])  # skipped: untouched
    assert float(aux["mod/selected_fraction"]) == pytest.approx(k / 16)


def test_router_learns_through_the_output_scale_and_aux_loss_is_bce():
    cfg = _cfg(capacity=0.25, aux_loss_weight=0.1)
    routed = MoDBlock(cfg, Block(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    x = _x()

    def out_loss(m):
        return jnp.mean(m(x, positions=_positions(2, 16))[0] ** 2)

    assert float(jnp.abs(nnx.jit(lambda m: nnx.grad(out_loss)(m))(routed).router[...]).sum()) > 0
    _, aux = _fwd(routed, x, positions=_positions(2, 16))
    logits = np.asarray(routed.router_logits(x), np.float64)
    member = logits >= np.sort(logits, axis=-1)[:, -4][:, None]
    bce = np.mean(np.logaddexp(0, logits) - logits * member)
    assert float(aux["mod/causal_bce"]) == pytest.approx(bce, rel=1e-5)
    assert float(aux["aux_loss"]) == pytest.approx(0.1 * bce, rel=1e-5)
    acc = np.mean((logits > 0) == member)
    assert float(aux["mod/causal_accuracy"]) == pytest.approx(acc)
    w = 1 / (1 + np.exp(-logits[member]))
    assert float(aux["mod/router_weight_mean"]) == pytest.approx(w.mean(), rel=1e-5)
    assert float(aux["mod/router_weight_std"]) == pytest.approx(w.std(), rel=1e-4)


@pytest.mark.slow
def test_predictor_learns_top_k_membership_without_touching_the_model():
    cfg = _cfg(capacity=0.25, causal_aux="predictor", aux_loss_weight=1.0)
    routed = MoDBlock(cfg, Block(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    x = _x(B=8)
    pos = _positions(8, 16)

    def aux_loss(m):
        return m(x, positions=pos)[1]["aux_loss"]

    grads = nnx.jit(lambda m: nnx.grad(aux_loss)(m))(routed)
    assert float(jnp.abs(grads.router[...]).sum()) == 0.0  # stop-gradient: routing untouched
    assert float(jnp.abs(grads.pred_in[...]).sum()) > 0
    acc0 = float(_fwd(routed, x, positions=pos)[1]["mod/causal_accuracy"])

    @nnx.jit
    def sgd(m):
        g = nnx.grad(aux_loss)(m)
        m.pred_in[...] -= 0.5 * g.pred_in[...]
        m.pred_out[...] -= 0.5 * g.pred_out[...]

    for _ in range(150):
        sgd(routed)
    acc = float(_fwd(routed, x, positions=pos)[1]["mod/causal_accuracy"])
    assert acc > max(acc0, 0.9)


def test_mod_over_moe_block_passes_moe_losses_and_metrics():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_layers=2,
                      moe=MoEConfig(n_experts=4, top_k=1, aux_loss_weight=0.5),
                      mod=MoDConfig(capacity=0.5, aux_loss_weight=0.0))
    routed = MoDBlock(cfg, Block(cfg, mlp=MoELayer, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    _, aux = _fwd(routed, _x(), positions=_positions(2, 16))
    assert float(aux["aux_loss"]) == pytest.approx(0.5 * float(aux["moe/lb_loss"]) + 1e-3 * float(aux["moe/z_loss"]), rel=1e-5)
    assert "mod/selected_fraction" in aux and "moe/drop_fraction" in aux


@pytest.mark.parametrize("capacity", [0.0, -0.5, 1.5])
def test_capacity_outside_unit_interval_is_rejected(capacity):
    with pytest.raises(ConfigError, match=r"^model\.mod\.capacity: must be in \(0, 1\]"):
        MoDConfig(capacity=capacity)


def test_selected_count_rounds_up():
    assert n_selected(0.125, 128) == 16
    assert n_selected(0.125, 100) == 13
    assert n_selected(0.01, 16) == 1
    assert n_selected(1.0, 16) == 16


def test_mod_train_flops_match_xla_and_show_the_expected_reduction():
    """12.5% capacity on every other block: XLA's count of the compiled step agrees with the
    analytic count, and the saving relative to the dense model is the analytic saving."""
    import dataclasses

    from scaling import flops
    from test_moe import xla_train_step_flops

    dense = ModelConfig(d_model=128, n_layers=4, n_heads=4)
    mod = dataclasses.replace(dense, mod=MoDConfig(capacity=0.125, every=2))  # blocks 1 and 3 routed
    batch, L = 4, 128
    a_dense, a_mod = (flops.train_flops_per_token(c, L) * batch * L for c in (dense, mod))
    h_dense, h_mod = (flops.hardware_train_flops_per_token(c, L, "xla") * batch * L for c in (dense, mod))
    x_dense, x_mod = (xla_train_step_flops(c, batch, L) for c in (dense, mod))
    assert 1.0 <= x_mod / h_mod < 1.05, (x_mod, h_mod)  # element-wise work on top (measured 2.9%)
    # two of four blocks run on 16 of 128 tokens (attention over 16 x 16): the step costs ~58% of dense
    block = flops._block_flops_per_token(dense, 0, L)
    expected = (2 * block + 2 * (0.125 * flops._block_flops_per_token(dense, 0, 16) + 2 * 128) + 2 * 128 * 256) / (
        4 * block + 2 * 128 * 256)
    assert a_mod / a_dense == pytest.approx(expected, rel=1e-9)
    assert expected < 0.6
    assert x_mod / x_dense == pytest.approx(h_mod / h_dense, rel=0.05)


def test_mod_experiment_defaults():
    import experiments
    from scaling import flops

    cfg = experiments.get("mod")
    assert cfg.experiment == "mod" and cfg.model.mod.capacity == 0.125 and cfg.model.mod.every == 2
    assert [cfg.model.is_mod_layer(i) for i in range(4)] == [False, True, False, True]
    m = experiments.load("mod").model_for_params(1e5)
    assert m.mod == cfg.model.mod and abs(flops.param_counts(m).non_embedding / 1e5 - 1) < 0.15


def test_causal_routing_equals_top_k_when_the_decisions_agree():
    """Per-token causal decisions that pick exactly the top-k tokens give the gathered block's
    output: the masked path (selected tokens attend to selected tokens) is the same computation."""
    cfg = _cfg(capacity=0.25)
    routed = MoDBlock(cfg, Block(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    B, L, D = 2, 16, 32
    r = routed.router[...] / jnp.linalg.norm(routed.router[...])
    noise = _x(B, L, D)
    noise = noise - jnp.einsum("bld,d->bl", noise, r)[..., None] * r  # orthogonal to the router
    k = n_selected(0.25, L)
    chosen = np.zeros((B, L), bool)
    chosen[0, [1, 5, 9, 14]] = chosen[1, [0, 3, 4, 15]] = True
    assert chosen.sum(axis=1).tolist() == [k, k]
    scale = jnp.where(jnp.asarray(chosen), 2.0, -1.0) * (1.0 + jnp.arange(L) / L)
    x = noise + scale[..., None] * r
    y_topk, _ = _fwd(routed, x, positions=_positions(B, L))
    y_causal, aux = _fwd(routed, x, positions=_positions(B, L), mod_routing="causal")
    np.testing.assert_allclose(np.asarray(y_causal), np.asarray(y_topk), atol=2e-5, rtol=1e-5)
    assert float(aux["mod/selected_fraction"]) == pytest.approx(k / L)
    assert float(aux["mod/causal_accuracy"]) == 1.0


def _mod_lm(causal_aux="aux_loss"):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, init_std=0.2,
                      mod=MoDConfig(capacity=0.25, every=1, causal_aux=causal_aux))
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("causal_aux", ["aux_loss", "predictor"])
def test_causal_routing_makes_logits_independent_of_future_tokens(causal_aux):
    """Top-k routing over the sequence leaks the future into earlier positions' logits; causal
    routing does not (what sampling needs)."""
    model = _mod_lm(causal_aux)
    B, L, t = 4, 16, 8
    a = jax.random.randint(jax.random.key(0), (B, L), 0, 64)
    b = a.at[:, t:].set(jax.random.randint(jax.random.key(1), (B, L - t), 0, 64))
    for routing, leaks in (("topk", True), ("causal", False)):
        la, _ = _fwd(model, a, mod_routing=routing)
        lb, _ = _fwd(model, b, mod_routing=routing)
        diff = float(jnp.max(jnp.abs(la[:, :t] - lb[:, :t])))
        assert (diff > 1e-4) if leaks else (diff == 0.0), (routing, diff)


def test_greedy_generation_is_consistent_with_a_causal_forward_pass():
    from scaling.models.sample import generate

    model = _mod_lm()
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, 64)
    out = generate(model, prompt, 7, key=jax.random.key(3), temperature=0.0)
    assert out.shape == (2, 12) and np.array_equal(np.asarray(out[:, :5]), np.asarray(prompt))
    logits, _ = _fwd(model, out, mod_routing="causal")
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 4:11], axis=-1)), np.asarray(out[:, 5:]))
    sampled = generate(model, prompt, 7, key=jax.random.key(3), temperature=1.0)
    assert sampled.shape == (2, 12) and int(sampled.min()) >= 0 and int(sampled.max()) < 64
    with pytest.raises(ValueError, match="mod_routing"):
        _fwd(model, out, mod_routing="sideways")
