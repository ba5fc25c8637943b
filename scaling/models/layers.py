"""Dense transformer layers (flax nnx): embedding, RMSNorm, RoPE causal attention, MLP, block.

Conventions (nanodo style): shape-suffixed names, ``B`` batch, ``L`` length, ``D`` d_model,
``H`` query heads, ``K`` key/value heads, ``A`` head_dim, ``F`` MLP hidden size, ``V`` vocabulary
(the legend of every letter is at the top of ``docs/interfaces.md``).

Parameters are float32 and carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv``,
``vocab``) through ``nnx.with_partitioning``; ``scaling.sharding`` maps them to mesh axes and
places them (no eager sharding at construction). Activations are computed in ``cfg.dtype``
(float32 or bfloat16); norms, softmax and RoPE angles run in float32.

Every matmul here is counted by ``scaling.flops``; if you add or change one, change it there.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.config import ModelConfig
from scaling.flops import SPLASH_BLOCK, splash_tile
from scaling.models import mup
from scaling.models.quant import qeinsum

def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """Activation sharding by logical axis names, from the rules that place the parameters
    (``scaling.sharding.LOGICAL_RULES``; MaxText style): rows over the batch axes, heads and the
    MLP hidden over ``tensor``. A no-op outside a mesh."""
    from scaling.sharding import constrain as by_rules

    return by_rules(x, names)


RESIDUAL = ("batch", "length", "embed")  # embed stays whole: the batch holds fsdp already
HEADS = ("batch", "length", "heads", "kv")
HIDDEN = ("batch", "length", "mlp")


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def activation_fn(cfg: ModelConfig):
    """The MLP nonlinearity: GELU (tanh approximation) for ``gelu``; SiLU, the gate of SwiGLU,
    for ``swiglu``. Shared with ``scaling.models.moe`` so one expert equals the dense MLP."""
    return jax.nn.silu if cfg.activation == "swiglu" else jax.nn.gelu


# Parameters created inside ``one_draw_init`` are filled from a single normal draw when the
# context closes. XLA compiles each threefry call site separately (~0.45 s of CPU each on a
# 2-core machine), so drawing every matrix on its own made initialisation of a 2-layer model
# cost ~9 s of compilation; one draw costs one call site whatever the depth. The pending list
# is a context variable, not a shared buffer: each thread (and each nested context) builds
# its own model's list, so two models built at once do not mix draws. As with nnx's own
# ``Rngs`` counter, a parameter's value depends on the order parameters are declared in.
_PENDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("scaling_one_draw_pending", default=None)
_ONE_DRAW_MAX_ELEMENTS = 1 << 28  # above ~1 GiB of float32 draw per parameter (no huge temp)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple, std: float | None) -> nnx.Param:
    """A float32 parameter with logical axis names, ``normal(0, std)`` or ones (``std=None``)."""
    shape = tuple(int(d) for d in shape)
    pending = _PENDING.get()
    if pending is not None:
        # placeholder of the right shape (a zero-copy numpy view); the value comes at context exit
        var = nnx.Param(nnx.with_partitioning(lambda *_: np.broadcast_to(np.float32(0), shape), axes)(None), eager_sharding=False)
        pending.append((var, shape, std))
        return var
    init = nnx.initializers.ones_init() if std is None else nnx.initializers.normal(std)
    init = nnx.with_partitioning(init, axes)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), eager_sharding=False)


@partial(jax.jit, static_argnums=1)
def _one_draw(key: jax.Array, specs: tuple) -> list[jax.Array]:
    sizes = [math.prod(shape) for shape, std in specs if std is not None]
    z = jax.random.normal(key, (sum(sizes),), jnp.float32) if sizes else None
    out, offset = [], 0
    for shape, std in specs:
        if std is None:
            out.append(jnp.ones(shape, jnp.float32))
            continue
        n = math.prod(shape)
        out.append(z[offset : offset + n].reshape(shape) * std)
        offset += n
    return out


@contextlib.contextmanager
def one_draw_init(rngs: nnx.Rngs):
    """Fill every parameter that ``param`` creates inside this context (in this thread) from
    one normal draw (one ``rngs.params()`` key) at exit; models above ~1 GiB draw per
    parameter instead."""
    pending: list = []
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
    specs = tuple((shape, std) for _, shape, std in pending)
    if sum(math.prod(shape) for shape, _ in specs) <= _ONE_DRAW_MAX_ELEMENTS:
        values = _one_draw(rngs.params(), specs)
    else:
        values = [
            jnp.ones(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape, jnp.float32)
            for shape, std in specs
        ]
    for (var, _, _), value in zip(pending, values):
        var.set_value(value)


def _std(cfg: ModelConfig, name: str) -> float:
    """Initial std of matrix ``name`` under the model's parametrization (``scaling.models.mup``:
    SP's GPT-2 rule, residual output projections scaled by 1/sqrt(2 n_layers), or μP)."""
    return mup.init_std(cfg, name)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), (axis_name,), None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding ``[V, D]``; ``attend`` gives the tied output head ``x @ embedding.T``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = compute_dtype(cfg)
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), _std(cfg, "embedding"))

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        # gather from the table whole along d_model, so the rows come out already split like the
        # residual stream (gathering from an fsdp-split table made XLA replicate the result)
        table_VxD = constrain(self.embedding[...], ("vocab", None))
        return constrain(jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype), RESIDUAL)

    def attend(self, x_BxLxD: jax.Array) -> jax.Array:
        """float32 logits ``[B, L, V]`` against the embedding matrix (tied head)."""
        w_VxD = self.embedding[...].astype(self.dtype)
        return jnp.einsum("bld,vd->blv", x_BxLxD, w_VxD, preferred_element_type=jnp.float32)


def rope(x_BxLxMxA: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, rotate-half layout (pairs ``(i, i + A/2)``), float32 angles."""
    A = x_BxLxMxA.shape[-1]
    freq_R = theta ** (-jnp.arange(0, A // 2, dtype=jnp.float32) * 2.0 / A)
    angle_BxLxR = positions_BxL.astype(jnp.float32)[..., None] * freq_R
    cos = jnp.cos(angle_BxLxR)[:, :, None, :]
    sin = jnp.sin(angle_BxLxR)[:, :, None, :]
    x32 = x_BxLxMxA.astype(jnp.float32)
    x1, x2 = x32[..., : A // 2], x32[..., A // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxMxA.dtype)


def attention_implementation(cfg: ModelConfig, backend: str | None = None, seq_len: int | None = None) -> str:
    """The kernel ``model.attention`` resolves to on ``backend`` (default: jax's) for sequences
    of ``seq_len`` tokens (None: not yet known, the sequence checks are skipped):

    * ``auto``: cuDNN flash attention on a GPU in bfloat16 with a head dimension cuDNN takes (a
      multiple of 8, at most 128); Pallas splash attention on a TPU when the sequence and the
      head dimension are multiples of 128 (its tile); XLA otherwise.
    * ``cudnn`` / ``splash`` named where they cannot run: ``ConfigError`` naming the field."""
    from scaling.config import ConfigError

    backend = backend or jax.default_backend()
    if cfg.attention == "xla":
        return "xla"
    A = cfg.resolved_head_dim
    head_ok = A % 8 == 0 and A <= 128  # cuDNN's fused kernel (256 on Hopper; 128 holds everywhere)
    splash_ok = A % SPLASH_BLOCK == 0 and (seq_len is None or seq_len % SPLASH_BLOCK == 0)
    if cfg.attention == "cudnn":
        if backend != "gpu":
            raise ConfigError(f"model.attention: cudnn needs a GPU backend, this one is {backend}; use auto or xla")
        if cfg.dtype != "bfloat16":
            raise ConfigError("model.attention: cudnn flash attention takes 16-bit inputs; set model.dtype=bfloat16 "
                              "or use auto / xla")
        if not head_ok:
            raise ConfigError(f"model.head_dim: cudnn flash attention needs a head dimension that is a multiple of 8 "
                              f"and at most 128, got {A}; change it or use model.attention=auto / xla")
        return "cudnn"
    if cfg.attention == "splash":
        if backend != "tpu":
            raise ConfigError(f"model.attention: splash needs a TPU backend, this one is {backend}; use auto or xla")
        if A % SPLASH_BLOCK:
            raise ConfigError(f"model.head_dim: splash attention needs a multiple of {SPLASH_BLOCK}, got {A}; "
                              "change it or use model.attention=auto / xla")
        if not splash_ok:
            raise ConfigError(f"data.seq_len: splash attention needs a multiple of {SPLASH_BLOCK}, got {seq_len}; "
                              "change it or use model.attention=auto / xla")
        return "splash"
    if backend == "gpu" and cfg.dtype == "bfloat16" and head_ok:
        return "cudnn"
    return "splash" if backend == "tpu" and splash_ok else "xla"


def causal_attention(q_BxLxHxA: jax.Array, k_BxLxKxA: jax.Array, v_BxLxKxA: jax.Array,
                     key_mask_BxL: jax.Array | None = None, scale: float | None = None,
                     implementation: str = "xla", *, interpret: bool = False) -> jax.Array:
    """Causal softmax attention, grouped-query (query head ``h`` reads kv head ``h // (H/K)``).

    ``implementation``: ``xla`` (``jax.nn.dot_product_attention``: the full ``L x L`` score
    matrix, masked, softmax in float32; measured on the 2-core CPU ~5-10% faster than a
    hand-written einsum softmax), ``cudnn`` (fused flash attention on a GPU; no ``L x L`` scores
    in memory) or ``splash`` (Pallas splash attention, ``splash_attention``). Tokens must be in
    increasing position order (mixture-of-depths keeps gathered tokens in order).
    ``key_mask_BxL`` (bool) restricts every query to the keys marked True, plus itself so that no
    row is empty (mixture-of-depths' causal routing: selected tokens see selected tokens only;
    xla only). ``scale`` multiplies the scores (default ``1/sqrt(A)``; μP passes
    ``mup.attention_scale``). Returns ``[B, L, H, A]`` in the input dtype."""
    if implementation == "splash":
        if key_mask_BxL is not None:
            raise ValueError("splash attention takes no key mask; mixture-of-depths blocks use xla")
        return splash_attention(q_BxLxHxA, k_BxLxKxA, v_BxLxKxA, scale, interpret=interpret)
    mask = None
    if key_mask_BxL is not None:
        L = key_mask_BxL.shape[1]
        mask = (key_mask_BxL[:, None, None, :] | jnp.eye(L, dtype=bool)[None, None])
    return jax.nn.dot_product_attention(q_BxLxHxA, k_BxLxKxA, v_BxLxKxA, mask=mask, is_causal=True,
                                        scale=scale, implementation=implementation)


def splash_attention(q_BxLxHxA: jax.Array, k_BxLxKxA: jax.Array, v_BxLxKxA: jax.Array,
                     scale: float | None = None, *, interpret: bool = False) -> jax.Array:
    """Causal attention through the Pallas TPU splash-attention kernel (fully masked tiles
    skipped, no ``L x L`` scores in memory), grouped-query natively. Under a mesh the kernel runs
    per shard (``shard_map``): rows over the batch axes, heads over ``tensor`` as the
    activation rules place them; kv heads that do not split with the query heads are repeated
    to ``H`` first. ``interpret`` runs the kernel in Pallas' interpreter (any backend, slow: the
    tests check it against XLA on the CPU). Returns ``[B, L, H, A]`` in the input dtype."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    from scaling import sharding

    B, L, H, A = q_BxLxHxA.shape
    scale = 1.0 / math.sqrt(A) if scale is None else scale
    q_BxLxHxA = q_BxLxHxA * jnp.asarray(scale, q_BxLxHxA.dtype)  # the kernel does not scale

    def local(q_bxLxhxA, k_bxLxkxA, v_bxLxkxA):
        h, block = q_bxLxhxA.shape[2], splash_tile(L)  # scaling.flops counts its diagonal tiles
        sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        mask = sm.MultiHeadMask([sm.CausalMask((L, L)) for _ in range(h)])
        kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
        heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [b, L, h, A] -> [b, h, L, A]
        o = jax.vmap(kernel)(heads_first(q_bxLxhxA), heads_first(k_bxLxkxA), heads_first(v_bxLxkxA))
        return heads_first(o)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BxLxHxA, k_BxLxKxA, v_BxLxKxA)
    q_spec = sharding.activation_spec(HEADS, q_BxLxHxA.shape)
    kv_spec = sharding.activation_spec(HEADS, k_BxLxKxA.shape)
    if kv_spec[2] != q_spec[2]:  # the kv heads do not split like the query heads: give each its own
        k_BxLxKxA = jnp.repeat(k_BxLxKxA, H // k_BxLxKxA.shape[2], axis=2)
        v_BxLxKxA = jnp.repeat(v_BxLxKxA, H // v_BxLxKxA.shape[2], axis=2)
        kv_spec = q_spec
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q_BxLxHxA, k_BxLxKxA, v_BxLxKxA)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE and optional qk-norm.

    Parameters: ``wq [D, H, A]``, ``wk, wv [D, K, A]``, ``wo [H, A, D]``; qk-norm scales ``[A]``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, K, A = cfg.d_model, cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim
        self.wq = param(rngs, (D, H, A), ("embed", "heads", "kv"), _std(cfg, "wq"))
        self.wk = param(rngs, (D, K, A), ("embed", "heads", "kv"), _std(cfg, "wk"))
        self.wv = param(rngs, (D, K, A), ("embed", "heads", "kv"), _std(cfg, "wv"))
        self.wo = param(rngs, (H, A, D), ("heads", "kv", "embed"), _std(cfg, "wo"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(A, eps=cfg.norm_eps, axis_name="kv", rngs=rngs)
            self.k_norm = RMSNorm(A, eps=cfg.norm_eps, axis_name="kv", rngs=rngs)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array | None = None,
                 key_mask_BxL: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        B, L, _ = x_BxLxD.shape
        dt = x_BxLxD.dtype
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        pr = cfg.precision
        q_BxLxHxA = constrain(qeinsum("bld,dhe->blhe", x_BxLxD, self.wq[...].astype(dt), pr), HEADS)
        k_BxLxKxA = constrain(qeinsum("bld,dke->blke", x_BxLxD, self.wk[...].astype(dt), pr), HEADS)
        v_BxLxKxA = constrain(qeinsum("bld,dke->blke", x_BxLxD, self.wv[...].astype(dt), pr), HEADS)
        if self.q_norm is not None:
            q_BxLxHxA = self.q_norm(q_BxLxHxA)
            k_BxLxKxA = self.k_norm(k_BxLxKxA)
        q_BxLxHxA = rope(q_BxLxHxA, positions_BxL, cfg.rope_theta)
        k_BxLxKxA = rope(k_BxLxKxA, positions_BxL, cfg.rope_theta)
        scale = mup.attention_scale(cfg) if mup.is_mup(cfg) else None  # None: jax's own 1/sqrt(A) (SP)
        impl = attention_implementation(cfg, seq_len=None if cfg.attention == "splash" else L)
        if impl == "splash" and L % SPLASH_BLOCK:  # a MoD block's k routed tokens: the run's
            impl = "xla"  # data.seq_len was checked up front; scaling.flops counts the same fallback
        o_BxLxHxA = causal_attention(q_BxLxHxA, k_BxLxKxA, v_BxLxKxA, key_mask_BxL, scale,
                                     implementation=impl if key_mask_BxL is None else "xla")
        o_BxLxHxA = constrain(o_BxLxHxA, HEADS)
        return qeinsum("blhe,hed->bld", o_BxLxHxA, self.wo[...].astype(dt), pr)


class MLP(nnx.Module):
    """Dense MLP: GELU ``w_out(gelu(x w_in))`` or SwiGLU ``w_out(silu(x w_gate) * x w_in)``.

    ``mlp(x_BxLxD) -> (y_BxLxD, aux)`` (aux empty), the same call as ``moe.MoELayer``.
    Parameters: ``w_in [D, F]``, ``w_gate [D, F]`` (swiglu only), ``w_out [F, D]``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, d_ff: int | None = None):
        self.cfg = cfg
        D, F = cfg.d_model, d_ff if d_ff is not None else cfg.resolved_d_ff
        self.w_in = param(rngs, (D, F), ("embed", "mlp"), _std(cfg, "w_in"))
        self.w_gate = param(rngs, (D, F), ("embed", "mlp"), _std(cfg, "w_gate")) if cfg.activation == "swiglu" else None
        self.w_out = param(rngs, (F, D), ("mlp", "embed"), _std(cfg, "w_out"))

    def __call__(self, x_BxLxD: jax.Array, **_unused) -> tuple[jax.Array, dict]:
        dt, pr = x_BxLxD.dtype, self.cfg.precision
        if pr is None:
            def mm(x, w):
                return x @ w
        else:  # fake-quantized operands and gradient (scaling.models.quant)
            def mm(x, w):
                return qeinsum("...i,io->...o", x, w, pr)
        h_BxLxF = mm(x_BxLxD, self.w_in[...].astype(dt))
        act = activation_fn(self.cfg)
        if self.w_gate is not None:
            h_BxLxF = act(mm(x_BxLxD, self.w_gate[...].astype(dt))) * h_BxLxF
        else:
            h_BxLxF = act(h_BxLxF)
        h_BxLxF = constrain(h_BxLxF, HIDDEN)
        return mm(h_BxLxF, self.w_out[...].astype(dt)), {}


class Block(nnx.Module):
    """Pre-LN residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    ``block(x_BxLxD, positions=None) -> (x_BxLxD, aux)``; ``aux`` is the MLP's (MoE metrics and
    its weighted ``aux_loss``; empty for a dense MLP). ``mlp`` is the MLP's class (called
    ``mlp(cfg, rngs=rngs)``, e.g. ``scaling.models.moe.MoELayer``; default the dense ``MLP``). It
    is built after the attention, so parameters are drawn in the same order for every MLP kind.
    """

    def __init__(self, cfg: ModelConfig, *, mlp=None, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, axis_name="embed", rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, axis_name="embed", rngs=rngs)
        self.mlp = (mlp or MLP)(cfg, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array, positions: jax.Array | None = None, key_mask: jax.Array | None = None,
                 train: bool = True, **_unused) -> tuple[jax.Array, dict]:
        x_BxLxD = constrain(x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions, key_mask), RESIDUAL)
        y_BxLxD, aux = self.mlp(self.mlp_norm(x_BxLxD), train=train)
        return constrain(x_BxLxD + y_BxLxD, RESIDUAL), aux
