"""Fake-quantized matmuls for low-precision training (``model.precision``; Sun et al. 2025).

``quantize(x, fmt, block, axes)`` rounds ``x`` to the float format ``fmt`` (``scaling.formats``)
after scaling it by a power of two ``2^-k``, the least that brings its largest finite magnitude within
the format's largest finite value (OCP MX-style shared exponents, rounded up so nothing clips):
one scale per tensor (``block=None``) or per ``block`` consecutive elements along the flattened
``axes`` (the matmul's contracting axes). Values are rounded to nearest-even with subnormals and
scaled back, in float32. Power-of-two scales are exact, so the result is exactly the format's
value times ``2^k``; a real-valued ``amax / max`` scale would round twice (and XLA rewrites the
division into a multiplication by the reciprocal, which rounds differently from numpy).

Rounding is computed arithmetically (``frexp``, then round-half-even at the format's spacing by
exact power-of-two scaling), so every ``eXmY`` works under jit on every backend; for the named
formats it equals ``ml_dtypes``' cast of the same scaled values bit for bit (tested). A cast to
the ``ml_dtypes`` type inside the program is not used: XLA:CPU cannot convert to the FP6 types
(``Invalid XLA PrimitiveType: F6E3M2FN``, measured with jax 0.10.2). Formats with float32's 8
exponent bits (bf16, e8mY) are rounded on the integer bits instead, so float32 subnormals, which
XLA:CPU's arithmetic flushes to zero, round exactly as a cast does. Limits: a whole block (or
tensor) of float32 subnormals (below 1.2e-38) is flushed to zero for the smaller formats; inf and
NaN pass through unquantized and leave the other values' scale alone.

``qeinsum(spec, x, w, precision)`` is ``jnp.einsum(spec, x, w)`` on the quantized operands
(activations ``x`` to ``precision.acts``, weights ``w`` to ``precision.weights``, both along
the contracted axes) with a straight-through estimator: the backward pass quantizes the
incoming gradient to ``precision.grads`` (blocks along its last axis) and runs the two
transposed einsums on the quantized operands; each quantizer's own derivative is taken as 1.
Without ``precision.block`` weights get one scale per tensor, activations and gradients one per
token (row), so no token's rounding depends on another's (causality holds).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from scaling.formats import Format


def _round(x32: jax.Array, fmt: Format) -> jax.Array:
    """Round float32 ``x32`` (already within ``+-fmt.max``) to the nearest ``fmt`` value, ties
    to even, with subnormals."""
    _, e = jnp.frexp(x32)  # |x| in [2^(e-1), 2^e)
    # the spacing of fmt's values around x: 2^(e-1-M) for a normal value, 2^(emin-M) below 2^emin
    q = jnp.maximum(e - 1, fmt.min_normal_exponent) - fmt.M
    # scaling by powers of two is exact; jnp.round rounds half to even
    return jnp.ldexp(jnp.round(jnp.ldexp(x32, -q)), q).astype(jnp.float32)


def _round_bits(x32: jax.Array, fmt: Format) -> jax.Array:
    """Round float32 ``x32`` to a format with float32's exponent range (E = 8, e.g. bf16) by
    integer rounding of the low mantissa bits, ties to even: exact for normals, float32
    subnormals (which XLA:CPU's arithmetic flushes to zero) and overflow (to inf, as a cast
    does); NaN stays NaN."""
    drop = 23 - fmt.M
    if drop <= 0:
        return x32
    bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
    lsb = (bits >> drop) & 1
    rounded = (bits + ((1 << (drop - 1)) - 1) + lsb) & ~jnp.uint32((1 << drop) - 1)
    out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
    return jnp.where(jnp.isnan(x32), x32, out)


def _to_blocks(x: jax.Array, axes: tuple[int, ...], block: int | None):
    """``x`` with ``axes`` moved last and flattened, split into blocks: ``[..., n, block]``; and
    the function undoing it."""
    axes = tuple(a % x.ndim for a in axes)
    rest = [a for a in range(x.ndim) if a not in axes]
    perm = rest + list(axes)
    xt = jnp.transpose(x, perm)
    k = math.prod(x.shape[a] for a in axes)
    b = k if block is None else block
    y = xt.reshape(*xt.shape[: len(rest)], k // b, b)

    def back(y2):
        return jnp.transpose(y2.reshape(xt.shape), [perm.index(i) for i in range(x.ndim)])

    return y, back


def quantize(x: jax.Array, fmt: Format | None, block: int | None = None, axes: tuple[int, ...] = (-1,)) -> jax.Array:
    """``x`` fake-quantized to ``fmt`` (module docstring), same shape and dtype. ``block=None``:
    one scale for the whole tensor; else one per ``block`` elements along the flattened ``axes``
    (which ``block`` must divide). ``fmt=None`` is the identity; a format with float32's 8
    exponent bits (bf16) is not scaled (its range is float32's: a plain rounding)."""
    if fmt is None:
        return x
    x32 = x.astype(jnp.float32)
    if fmt.E >= 8:
        return _round_bits(x32, fmt).astype(x.dtype)
    if block is None:
        y, back = x32, (lambda v: v)
    else:
        y, back = _to_blocks(x32, axes, block)
    finite = jnp.isfinite(y)
    amax = jnp.max(jnp.where(finite, jnp.abs(y), 0.0), axis=None if block is None else -1,
                   keepdims=block is not None)
    k = pow2_scale_exponent(amax, fmt)
    q = jnp.ldexp(_round(jnp.ldexp(jnp.where(finite, y, 0.0), -k), fmt), k)
    # inf and NaN pass through (an overflow surfaces as a divergence, not as a clipped value)
    return back(jnp.where(finite, q, y)).astype(x.dtype)


def pow2_scale_exponent(amax: jax.Array, fmt: Format) -> jax.Array:
    """The least ``k`` with ``amax <= fmt.max * 2^k`` (0 where ``amax`` is 0): the scale ``2^k``
    maps the largest magnitude into the format's range without clipping, and scaling by it is
    exact."""
    m_a, e_a = jnp.frexp(amax)
    m_f, e_f = math.frexp(fmt.max)
    k = e_a - e_f + (m_a > m_f).astype(e_a.dtype)
    return jnp.where(amax > 0, k, 0)


def _contracted(spec: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The contracted axes of each operand of ``spec`` (negative when the operand starts with
    ``...``)."""
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    common = [c for c in a.replace("...", "") if c in b and c not in out]

    def where(operand, c):
        if operand.startswith("..."):
            rest = operand[3:]
            return rest.index(c) - len(rest)
        return operand.index(c)

    return tuple(where(a, c) for c in common), tuple(where(b, c) for c in common)


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _qeinsum(spec, x, w, precision):
    return _fwd(spec, x, w, precision)[0]


def _per_row(x, axes, block):
    """``block``, or without one the whole flattened ``axes`` (one scale per row: per token)."""
    return block if block is not None else math.prod(x.shape[a % x.ndim] for a in axes)


def _operands(spec, x, w, precision):
    from scaling import formats

    ax, aw = _contracted(spec)
    # activations are scaled per token (or per block of it), never across tokens: a scale over
    # the whole tensor would let a later token's magnitude change an earlier token's rounding,
    # a leak of the future into causal evaluation
    xq = quantize(x, formats.parse(precision.acts), _per_row(x, ax, precision.block), ax)
    wq = quantize(w, formats.parse(precision.weights), precision.block, aw)
    return xq, wq


def _fwd(spec, x, w, precision):
    xq, wq = _operands(spec, x, w, precision)
    return jnp.einsum(spec, xq, wq), (xq, wq)


def _bwd(spec, precision, res, g):
    from scaling import formats

    xq, wq = res
    gq = quantize(g, formats.parse(precision.grads), _per_row(g, (-1,), precision.block), (-1,))
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), xq, wq)
    return vjp(gq)


_qeinsum.defvjp(_fwd, _bwd)


def qeinsum(spec: str, x: jax.Array, w: jax.Array, precision) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` with fake-quantized operands and gradient (module docstring);
    the plain einsum when ``precision`` is None."""
    if precision is None:
        return jnp.einsum(spec, x, w)
    return _qeinsum(spec, x, w, precision)
