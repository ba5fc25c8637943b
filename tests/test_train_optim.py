"""Schedules end exactly at the last step, weight decay hits matrices only, and the two-half
train step is the full-batch gradient step with correct noise-scale statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.config import ModelConfig, OptimConfig
from scaling.models.transformer import Transformer
from scaling.train import optim
from scaling.train import step as step_lib


def lrs(cfg: OptimConfig, total: int) -> np.ndarray:
    sched = optim.make_schedule(cfg, total)
    return np.array([float(sched(s)) for s in range(total)])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
@pytest.mark.parametrize("total", [1, 2, 37, 500])
def test_schedule_ends_exactly_at_last_step(schedule, total):
    cfg = OptimConfig(lr=2e-3, schedule=schedule, warmup_fraction=0.1, final_lr_fraction=0.05)
    lr = lrs(cfg, total)
    w = optim.warmup_steps(cfg, total)
    end = 2e-3 if schedule == "constant" else 2e-3 * 0.05
    if total > 1:
        assert lr[-1] == pytest.approx(end, rel=1e-6)
        assert lr.max() == pytest.approx(2e-3, rel=1e-6)
    assert np.all(lr > 0)
    # warmup rises linearly to the peak, then the LR never increases
    if w:
        np.testing.assert_allclose(lr[:w], 2e-3 * np.arange(1, w + 1) / w, rtol=1e-6)
    assert np.all(np.diff(lr[w:]) <= 1e-12)


def test_warmup_steps_override_fraction_and_wsd_prefix_is_budget_independent():
    cfg = OptimConfig(lr=1e-3, schedule="wsd", warmup_fraction=0.5, warmup_steps=10, wsd_decay_fraction=0.2)
    short, long = lrs(cfg, 100), lrs(cfg, 300)
    assert optim.warmup_steps(cfg, 100) == 10 and short[9] == pytest.approx(1e-3)
    start = optim.wsd_decay_start(cfg, 100)
    assert start == 80
    # identical up to the short run's cooldown: a branch of the long run equals the short run
    np.testing.assert_array_equal(short[:start], long[:start])
    assert short[start] < 1e-3 and short[-1] == pytest.approx(1e-4, rel=1e-6)
    sqrt = lrs(OptimConfig(lr=1e-3, schedule="wsd", warmup_steps=10, wsd_cooldown="1-sqrt"), 100)
    assert sqrt[-1] == pytest.approx(1e-4, rel=1e-6) and sqrt[85] < short[85]  # 1-sqrt drops faster early


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params, rest) of a tiny real Transformer with an untied head (built once)."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, tie_embeddings=False)
    return step_lib.split_model(Transformer(cfg, rngs=nnx.Rngs(0)))


def test_weight_decay_only_on_matrices_not_embeddings_or_norms(tiny):
    graphdef, params, rest = tiny
    cfg = OptimConfig(lr=1e-2, weight_decay=0.5, grad_clip=0.0, warmup_fraction=0.0, schedule="constant")
    tx = optim.make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(lambda z, p: tx.update(z, tx.init(p), p))(zeros, params)
    flat_u = dict(jax.tree_util.tree_flatten_with_path(updates)[0])
    flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    decayed = {jax.tree_util.keystr(k) for k, u in flat_u.items() if float(jnp.abs(u).max()) > 0}
    assert decayed, "some parameters must be decayed"
    for k, p in flat_p.items():
        name = jax.tree_util.keystr(k)
        if "embed" in name or p.ndim < 2:
            assert name not in decayed, name
        else:
            assert name in decayed, name
            # decoupled decay (before the step's -lr scaling): update = wd * p
            np.testing.assert_allclose(flat_u[k], 0.5 * p, rtol=1e-5, atol=1e-9)
    assert any("head" in n for n in decayed)  # an untied output head is an ordinary matrix


def _batch_and_grad(graphdef, params, rest, z: float, seed: int):
    """A random 8 x 16 batch and a jitted ``grad(x, y) -> (cross-entropy, gradient)`` at ``params``."""
    tok = np.random.default_rng(seed).integers(0, 64, size=(8, 17)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
    loss_fn = step_lib.make_loss_fn(graphdef, z)

    @jax.jit
    def grad(x, y):
        (_, (ce, _)), g = jax.value_and_grad(lambda p: loss_fn(p, rest, x, y), has_aux=True)(params)
        return ce, g

    return batch, grad


def sq(t) -> float:
    """Squared norm of a gradient tree, in float64."""
    return float(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in jax.tree.leaves(t)))


def test_split_step_is_full_batch_step_and_noise_stats_are_exact(tiny):
    import optax

    graphdef, params, rest = tiny
    z = 1e-3
    tx = optax.sgd(1.0)  # plain SGD exposes the gradient the step applies
    batch, grad = _batch_and_grad(graphdef, params, rest, z, seed=0)
    ce_full, g_full = grad(batch["inputs"], batch["targets"])
    _, g_even = grad(batch["inputs"][0::2], batch["targets"][0::2])
    _, g_odd = grad(batch["inputs"][1::2], batch["targets"][1::2])

    state = step_lib.init_state(params, rest, tx)
    train_step = step_lib.make_train_step(graphdef, tx, z_loss_weight=z, donate=False)
    new_state, m = train_step(state, batch)
    assert float(m["gns_b_small"]) == 4 and float(m["gns_b_big"]) == 8
    assert float(m["gns_g_big_sq"]) == pytest.approx(sq(g_full), rel=1e-4)
    assert float(m["gns_g_small_sq"]) == pytest.approx(0.5 * (sq(g_even) + sq(g_odd)), rel=1e-4)
    assert float(m["gns_g_small_sq"]) > float(m["gns_g_big_sq"])  # noise shrinks with batch size
    assert float(m["grad_norm"]) == pytest.approx(np.sqrt(sq(g_full)), rel=1e-4)
    assert float(m["loss"]) == pytest.approx(float(ce_full), rel=1e-5)
    # the applied gradient is the full-batch gradient (float rounding only)
    for new, old, g in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(params), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(old) - np.asarray(new), g, rtol=1e-4, atol=1e-7)


def test_optimizer_times_lr_is_optax_adamw(tiny):
    """make_optimizer + the step's -lr scaling reproduces optax.adamw (with clipping and mask)."""
    import optax

    _, params, _ = tiny
    cfg = OptimConfig(lr=3e-3, weight_decay=0.1, grad_clip=0.5, schedule="cosine", warmup_steps=2)
    grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), params)
    reference = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(
        optim.make_schedule(cfg, 20), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.1, mask=optim.decay_mask))
    ours = optim.make_optimizer(cfg)

    @jax.jit
    def two_updates(p, g):
        s_ref, s_ours = reference.init(p), ours.init(p)
        out = []
        for i in range(2):  # step 0 and 1: different LRs during warmup
            u_ref, s_ref = reference.update(g, s_ref, p)
            u, s_ours = ours.update(g, s_ours, p)
            lr = optim.learning_rate(cfg, i, 20)
            out.append((u_ref, jax.tree.map(lambda x: -lr * x, u)))
        return out

    for u_ref, u in two_updates(params, grads):
        for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-10)


def test_accumulated_step_is_full_batch_step_with_microbatch_noise_stats(tiny):
    """accum=4 passes of 2 rows: the update is the full-batch gradient, ``gns_g_small_sq`` the
    mean of the four microbatches' |g_k|^2 with ``gns_b_small`` 2; with ``gns_every=3`` a step
    that is not a multiple of 3 (nor the last) computes no statistics (NaN), and
    ``gns_every=0`` none at all."""
    import optax

    graphdef, params, rest = tiny
    tx = optax.sgd(1.0)
    batch, grad = _batch_and_grad(graphdef, params, rest, 1e-3, seed=1)
    ce_full, g_full = grad(batch["inputs"], batch["targets"])
    small = np.mean([sq(grad(batch["inputs"][k:k + 2], batch["targets"][k:k + 2])[1]) for k in range(0, 8, 2)])
    state = step_lib.init_state(params, rest, tx, total_steps=10)
    acc = step_lib.make_train_step(graphdef, tx, z_loss_weight=1e-3, donate=False, accum=4, gns_every=1)
    new_state, m = acc(state, batch)
    assert float(m["gns_b_small"]) == 2 and float(m["gns_b_big"]) == 8
    assert float(m["gns_g_small_sq"]) == pytest.approx(small, rel=1e-4)
    assert float(m["gns_g_big_sq"]) == pytest.approx(sq(g_full), rel=1e-4)
    assert float(m["loss"]) == pytest.approx(float(ce_full), rel=1e-5)
    for new, old, g in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(params), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(old) - np.asarray(new), g, rtol=1e-4, atol=1e-7)
    every3 = step_lib.make_train_step(graphdef, tx, z_loss_weight=1e-3, donate=False, accum=1, gns_every=3)
    _, m1 = every3(state, batch)  # step 1 of 10: no statistics
    assert np.isnan(float(m1["gns_g_small_sq"])) and float(m1["loss"]) == pytest.approx(float(ce_full), rel=1e-5)
    _, m3 = every3({**state, "step": jnp.asarray(2, jnp.int32)}, batch)  # step 3: halves of 4 rows
    assert float(m3["gns_b_small"]) == 4 and np.isfinite(float(m3["gns_g_small_sq"]))
    _, m10 = every3({**state, "step": jnp.asarray(9, jnp.int32)}, batch)  # the last step always has them
    assert np.isfinite(float(m10["gns_g_small_sq"]))
    none = step_lib.make_train_step(graphdef, tx, z_loss_weight=1e-3, donate=False, gns_every=0)
    assert not any(k.startswith("gns_") for k in none(state, batch)[1])


def test_microbatches_keep_each_device_block_and_take_consecutive_rows():
    """Pass k takes rows k m .. (k+1) m - 1 of every device's contiguous block of m K rows:
    24 rows, 2 devices, 3 passes of 4 rows per device."""
    rows = jnp.arange(24)[:, None]
    mb = np.asarray(step_lib._microbatches(rows, 3, 2))[..., 0]
    assert mb.shape == (3, 8)
    np.testing.assert_array_equal(mb, [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 16, 17, 18, 19],
                                       [8, 9, 10, 11, 20, 21, 22, 23]])
