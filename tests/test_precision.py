"""Low-precision training (issue 26): fake quantization bitwise equal to ml_dtypes casts, the
generic eXmY equal to the named formats, ``none`` the identity, a straight-through gradient,
causality kept, and bad formats refused in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_refused
from flax import nnx

from scaling import formats
from scaling.config import PrecisionConfig, TrainConfig
from scaling.models.quant import qeinsum, quantize
from scaling.models.transformer import Transformer

NAMED = ["bf16", "e4m3", "e5m2", "e3m2", "e2m3", "e2m1"]


def _inputs():
    """Magnitudes over 22 binades (subnormals of every small format included), signed zeros,
    an all-zero block."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * np.exp(rng.uniform(-12, 4, (64, 256)))).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 1e-30, 3e-8]
    x[1, :32] = 0.0
    return x


def _reference(x, fmt, block):
    """ml_dtypes' cast of ``x`` scaled by the least power of two that fits the block's largest
    magnitude into the format (no scaling for bf16, whose range is float32's)."""
    cast = getattr(ml_dtypes, fmt.dtype)
    if fmt.E >= 8:
        return x.astype(cast).astype(np.float32)
    y = x.reshape(x.shape[0], -1, block) if block else x
    amax = np.abs(y).max(axis=-1, keepdims=True) if block else np.abs(y).max()
    k = np.where(amax > 0, np.ceil(np.log2(np.where(amax > 0, amax, 1.0) / fmt.max)), 0).astype(np.int32)
    return np.ldexp(np.ldexp(y, -k).astype(cast).astype(np.float32), k).reshape(x.shape)


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("block", [None, 32])
def test_quantization_is_bitwise_the_ml_dtypes_cast(name, block):
    x = _inputs()
    fmt = formats.parse(name)
    assert fmt.max == float(ml_dtypes.finfo(getattr(ml_dtypes, fmt.dtype)).max)
    got = np.asarray(quantize(jnp.asarray(x), fmt, block))
    ref = _reference(x, fmt, block)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert len(np.unique(got)) > 10  # not a degenerate comparison
    # a generic eXmY of the same widths (no ml_dtypes type behind it) names the same format
    generic = formats.Format(f"e{fmt.E}m{fmt.M}-generic", fmt.E, fmt.M, None)
    np.testing.assert_array_equal(np.asarray(quantize(jnp.asarray(x), generic, block)).view(np.uint32),
                                  ref.view(np.uint32))


def test_bf16_every_code_and_midpoint_and_float32_subnormals_round_as_the_cast():
    """All 65,536 bf16 codes and the midpoints between neighbours (ties to even), float32
    subnormals included (XLA:CPU's arithmetic would flush them), overflow to inf, NaN kept."""
    codes = np.arange(65536, dtype=np.uint32) << 16
    mids = (codes.astype(np.uint64) + (1 << 15)).astype(np.uint32)
    x = np.concatenate([codes.view(np.float32), mids.view(np.float32), np.array([1e-40, 3e-39, -1e-45], np.float32)])
    got = np.asarray(quantize(jnp.asarray(x), formats.parse("bf16")))
    with np.errstate(invalid="ignore"):
        ref = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    same = (got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))
    assert same.all(), int((~same).sum())


def test_a_generic_format_against_an_independent_reference_and_non_finite_values():
    """e5m10 is IEEE half precision: numpy's float16 is a reference the named path never uses.
    inf and NaN pass through and leave the other values' scale alone."""
    y = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 3e4
    f = formats.parse("e5m10")
    assert (f.dtype, f.max) == (None, float(np.finfo(np.float16).max))
    k = int(np.ceil(np.log2(np.abs(y).max() / f.max)))
    ref = np.ldexp(np.ldexp(y, -k).astype(np.float16).astype(np.float32), k)
    np.testing.assert_array_equal(np.asarray(quantize(jnp.asarray(y), f)), ref)
    out = np.asarray(quantize(jnp.asarray(np.array([1, 3, np.inf, np.nan, -2], np.float32)), formats.parse("e4m3")))
    np.testing.assert_array_equal(out[[0, 1, 2, 4]], [1, 3, np.inf, -2])
    assert np.isnan(out[3])


def test_formats_parse_and_none_is_the_identity():
    assert formats.parse("none") is None and formats.parse("e5m2").dtype == "float8_e5m2"
    assert formats.parse("e8m7").name == "bf16" and formats.parse("E4M3").name == "e4m3"
    e3m4 = formats.parse("e3m4")
    assert (e3m4.dtype, e3m4.bits, e3m4.max) == (None, 8, 30.0)  # 8-bit, E <= 4: one NaN code, like e4m3: 1.875 x 2^4
    x = jnp.asarray(_inputs())
    assert quantize(x, None) is x
    # a model whose every format is none computes what a model without model.precision does
    base = TrainConfig().with_overrides(["model.d_model=32", "model.n_layers=1", "model.n_heads=2"]).model
    quiet = dataclasses.replace(base, precision=PrecisionConfig())
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    a, _ = Transformer(base, rngs=nnx.Rngs(1))(tokens)
    b, _ = Transformer(quiet, rngs=nnx.Rngs(1))(tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_straight_through_gradient_uses_the_quantized_operands_and_gradient():
    p = PrecisionConfig(weights="e4m3", acts="e4m3", grads="e5m2", block=16)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 5, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 5, 48)), jnp.float32)
    y, vjp = jax.vjp(lambda a, b: qeinsum("bld,df->blf", a, b, p), x, w)
    xq = quantize(x, formats.parse("e4m3"), 16, (-1,))
    wq = quantize(w, formats.parse("e4m3"), 16, (0,))
    gq = quantize(g, formats.parse("e5m2"), 16, (-1,))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.einsum("bld,df->blf", xq, wq)))
    dx, dw = vjp(g)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(jnp.einsum("blf,df->bld", gq, wq)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(jnp.einsum("bld,blf->df", xq, gq)), rtol=1e-6, atol=1e-5)
    assert float(jnp.max(jnp.abs(dx - jnp.einsum("blf,df->bld", g, w)))) > 1e-3  # quantization did something


@pytest.mark.parametrize("block", [None, 8])
def test_a_quantized_model_stays_causal(block):
    """Activations are scaled per token (or block of it): changing later tokens leaves every
    earlier token's logits bit for bit as they were."""
    cfg = TrainConfig().with_overrides(["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                                        "model.precision.weights=e2m1", "model.precision.acts=e2m1",
                                        f"model.precision.block={block or 'none'}"]).model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: m(x)[0])  # one compiled program (eager quantization is slow)
    a = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
    b = a.at[:, 12:].set(jax.random.randint(jax.random.key(2), (2, 12), 0, 256))
    la = forward(model, a)
    lb = forward(model, b)
    np.testing.assert_array_equal(np.asarray(la[:, :12]), np.asarray(lb[:, :12]))
    assert float(jnp.max(jnp.abs(la[:, 12:] - lb[:, 12:]))) > 1e-3


@pytest.mark.parametrize("sets,message", [
    (["model.precision.weights=e4m4"], None),  # a valid generic format: no error
    (["model.precision.acts=fp7"], "model.precision.acts: unknown format 'fp7'; use none, bf16, e4m3, e5m2, e3m2, "
                                   "e2m3, e2m1 or eXmY (e.g. e3m4)"),
    (["model.precision.grads=e5m11"], "model.precision.grads: 'e5m11' is 17 bits (sign + 5 exponent + 11 mantissa); "
                                      "use at most 16"),
    (["model.d_model=64", "model.precision.weights=e4m3", "model.precision.block=48"],
     "model.precision.block: 48 does not divide model.d_model=64 (a contracted or gradient axis of a quantized "
     "matmul); use a divisor of 64, e.g. 16, or none for per-tensor scales"),
    (["model.dtype=bfloat16", "model.precision.grads=e5m10"],
     "model.precision.grads: e5m10 is finer than model.dtype=bfloat16, whose operands are bf16 already; use "
     "model.dtype=float32 or a format of at most 7 mantissa bits"),
    (["model.precision.weights=e4m3", "model.moe=on"],
     "model.precision: quantizes the dense attention and MLP matmuls; MoE, MoD and other block kinds are not "
     "quantized yet; drop model.precision or use a dense model"),
])
def test_bad_precision_settings_are_one_line_and_exit_2(sets, message, tmp_path, capsys):
    if message is None:
        assert TrainConfig().with_overrides(sets).model.precision.weights == "e4m4"
        return
    assert_refused(sets, message, tmp_path, capsys)


def test_the_fp_quant_law_recovers_its_exponent_and_mantissa_weights():
    """Losses drawn from Sun et al.'s form on 3 sizes x 3 budgets x 9 formats (0.2% noise): the fit
    returns delta and nu inside their intervals, and the best split at 8 bits that made them."""
    import pandas as pd

    from scaling import fit
    from scaling.fit import laws

    t = dict(n=60.0, alpha=0.3, d=80.0, beta=0.3, eps=1.5, gamma=2.0, delta=3.0, nu=2.5)
    rng = np.random.default_rng(0)
    rows = []
    for N in (5e3, 2e4, 8e4):
        for D in (3e5, 1e6, 3e6):
            for E, M, B in [(2, 1, 32), (3, 2, 32), (4, 3, 32), (2, 3, 32), (3, 1, 32), (5, 2, 32), (2, 1, 256),
                            (4, 3, 256), (8, 23, 1)]:
                q = 0.0 if B == 1 else (D ** t["beta"] / N ** t["alpha"] * np.log2(B)
                                        / (t["gamma"] * (E + 0.5) ** t["delta"] * (M + 0.5) ** t["nu"]))
                loss = t["n"] / N ** t["alpha"] + t["d"] / D ** t["beta"] + t["eps"] + q
                rows.append(dict(N=N, D=D, E=E, M=M, B=B, loss=loss * (1 + 0.002 * rng.standard_normal())))
    res = fit.fp_quant(pd.DataFrame(rows), bootstrap=30, seed=0)
    for k in ("delta", "nu", "alpha", "beta"):
        assert res.ci[k][0] <= t[k] <= res.ci[k][1], (k, res.params[k], res.ci[k])
    assert res.params["delta"] > res.params["nu"]
    assert laws.best_split(8, res.params["delta"], res.params["nu"]) == laws.best_split(8, t["delta"], t["nu"]) == (4, 3)
    assert laws.best_split(4, 3.0, 2.5) == (2, 1) and laws.best_split(8, 1.0, 6.0) == (1, 6)
