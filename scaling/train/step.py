"""Jitted train and eval steps over a pure train state (``nnx.split`` once, ``nnx.merge`` inside
the traced function: no nnx graph traversal at run time, which measures faster than ``nnx.jit``
for the small models a CPU runs).

Loss (nats per token): mean cross-entropy + ``z_loss * mean(logsumexp(logits)^2)`` + the
model's ``aux["aux_loss"]`` (already weighted by the model).

Gradient accumulation. A step over a global batch of ``B`` sequences runs ``accum`` = K
forward/backward passes of ``B / K`` sequences (``data.microbatch`` per device, so one pass
holds one microbatch of activations) in a ``lax.scan`` and updates with the mean of their
gradients. Microbatch ``k`` takes rows ``k m .. (k+1) m - 1`` of every device's block of ``m K``
rows, so each device keeps its own rows under data sharding. For a per-token mean loss the mean
of the K gradients *is* the full-batch gradient (up to float rounding).

Gradient noise scale (McCandlish et al. 2018, appendix A), from gradients the step has anyway:
``gns_b_big = B`` with ``gns_g_big_sq = |g|^2`` (the update's gradient), and ``gns_b_small``
the sequences of one pass with ``gns_g_small_sq`` the mean of the passes' ``|g_k|^2`` (taken on
every pass when statistics are on at all, and reported on statistics steps only). Without
accumulation (K = 1) a statistics step splits the batch in two interleaved halves (even / odd
rows) instead of one pass, ``gns_b_small = B / 2``. From these
``|G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)`` and
``tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)``, ``B_noise = tr(Sigma) / |G|^2``
(``scaling.fit.batch`` does that part, averaging over steps first as the paper advises).
Statistics are reported on steps ``s`` (1-based) with ``s % gns_every == 0`` and on the last
step, decided inside the program from the state's step, so a resumed run takes the same path as
an uninterrupted one. Without accumulation the other steps make one full-batch pass (no
half-batch passes, no extra norms); with it they pay only the passes' norms.
Model aux losses that are not means over tokens (MoE load balance) are averaged over the
passes, which is the loss the update follows.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def split_model(model: nnx.Module):
    """``(graphdef, params, rest)``: trainable ``nnx.Param`` state and everything else."""
    return nnx.split(model, nnx.Param, ...)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token mean cross-entropy (nats) and mean squared log-partition (for the z-loss)."""
    logits = logits_BxLxV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.mean(log_z - target_logit), jnp.mean(jnp.square(log_z))


def _sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))


# model aux metrics (suffixes of the per-layer names) -> the hparam that weights them in the loss
AUX_TERMS = {"/moe/lb_loss": "moe_aux_loss_weight", "/moe/z_loss": "moe_z_loss_weight",
             "/mod/causal_bce": "mod_aux_loss_weight"}


def weighted_aux_loss(aux: dict, weights: dict) -> jax.Array:
    """The model's auxiliary loss rebuilt from its unweighted per-layer terms with ``weights``
    (traced values): ``sum_i w_lb lb_i + w_z z_i + w_mod bce_i``, what the layers compute with
    their configured weights."""
    total = jnp.zeros((), jnp.float32)
    for name, value in aux.items():
        for suffix, key in AUX_TERMS.items():
            if name.endswith(suffix):
                total = total + weights[key] * jnp.asarray(value, jnp.float32)
    return total


def make_loss_fn(graphdef, z_loss_weight: float, aux_weights: dict | None = None) -> Callable:
    """``loss_fn(params, rest, inputs_BxL, targets_BxL) -> (loss, (ce, aux))``. With
    ``aux_weights`` (traced) the MoE/MoD auxiliary losses are weighted by them instead of the
    weights compiled into the layers."""

    def loss_fn(params, rest, inputs, targets):
        model = nnx.merge(graphdef, params, rest)
        logits, aux = model(inputs, train=True)
        ce, z_sq = cross_entropy(logits, targets)
        if aux_weights is None:
            aux_loss = jnp.asarray(aux.get("aux_loss", 0.0), jnp.float32)
        else:
            aux_loss = weighted_aux_loss(aux, aux_weights)
        loss = ce + z_loss_weight * z_sq + aux_loss
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if k != "aux_loss"}
        metrics.update(aux_loss=aux_loss, z_sq=z_sq)
        return loss, (ce, metrics)

    return loss_fn


def init_state(params, rest, tx: optax.GradientTransformation, total_steps: int = 1, mesh=None) -> dict:
    """Train state ``{"params", "rest", "opt_state", "step", "total_steps"}`` (step/total int32).

    With a ``mesh`` the optimizer state is created sharded like the parameters; a plain
    ``jax.jit(tx.init)`` would leave Adam's moments replicated on every device."""
    if mesh is not None:
        from scaling import sharding
        opt_state = sharding.shard_init(lambda: tx.init(params), mesh)
    else:
        opt_state = jax.jit(tx.init)(params)
    return {"params": params, "rest": rest, "opt_state": opt_state,
            "step": jnp.zeros((), jnp.int32), "total_steps": jnp.asarray(total_steps, jnp.int32)}


def _microbatches(x_BxL: jax.Array, accum: int, shards: int) -> jax.Array:
    """``[B, L] -> [K, B / K, L]``: microbatch ``k`` holds rows ``k m .. (k+1) m - 1`` of each of
    the ``shards`` row blocks (``m = B / (K shards)``), so no row leaves its device."""
    b, l = x_BxL.shape
    m = b // (accum * shards)
    return x_BxL.reshape(shards, accum, m, l).swapaxes(0, 1).reshape(accum, shards * m, l)


def _gradients(grad_fn, params, rest, inputs, targets, *, accum: int, shards: int, gns):
    """``(loss_total, ce, metrics, grads, g_small_sq, b_small)``: the mean over ``accum``
    passes (module docstring); ``g_small_sq`` is the mean of the passes' squared gradient
    norms where ``gns`` (a traced bool, or the constant False) holds, else 0."""
    b = inputs.shape[0]
    if accum == 1:
        def whole(_):
            (lt, (ce, m)), g = grad_fn(params, rest, inputs, targets)
            return lt, ce, m, g, jnp.zeros((), jnp.float32)

        def halves(_):
            # [B, L] -> [B/2, 2, L]: half h is rows h, h+2, h+4, ... (device-local under data sharding)
            x2, y2 = inputs.reshape(b // 2, 2, -1), targets.reshape(b // 2, 2, -1)
            (la, (ca, ma)), ga = grad_fn(params, rest, x2[:, 0], y2[:, 0])
            (lb, (cb, mb)), gb = grad_fn(params, rest, x2[:, 1], y2[:, 1])
            g = jax.tree.map(lambda u, v: 0.5 * (u + v), ga, gb)
            m = {k: 0.5 * (ma[k] + mb[k]) for k in ma}
            return 0.5 * (la + lb), 0.5 * (ca + cb), m, g, 0.5 * (_sq_norm(ga) + _sq_norm(gb))

        if gns is False:
            return (*whole(None), jnp.float32(b))
        lt, ce, m, g, small = jax.lax.cond(gns, halves, whole, None)
        return lt, ce, m, g, small, jnp.float32(b // 2)

    xs, ys = _microbatches(inputs, accum, shards), _microbatches(targets, accum, shards)

    def one(x, y):
        # with statistics possible, every pass takes its norm (a reduction, small beside a
        # forward/backward pass) rather than a data-dependent branch inside the scan
        (lt, (ce, m)), g = grad_fn(params, rest, x, y)
        sq = jnp.zeros((), jnp.float32) if gns is False else _sq_norm(g)
        return lt, ce, m, g, sq

    shapes = jax.eval_shape(one, xs[0], ys[0])
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    def body(acc, xy):
        return jax.tree.map(jnp.add, acc, one(*xy)), None

    total, _ = jax.lax.scan(body, zeros, (xs, ys))
    lt, ce, m, g, sq = jax.tree.map(lambda v: v / accum, total)
    return lt, ce, m, g, sq, jnp.float32(b // accum)


def _update(graphdef, state, batch, tx, z_loss_weight, lr, aux_weights=None, *, accum: int = 1, shards: int = 1,
            gns_every: int = 1, gns=None):
    """One update of ``state`` on ``batch`` (the body shared by both step builders): ``accum``
    passes over ``shards`` row blocks, noise-scale statistics every ``gns_every`` steps (0:
    never) and on the last (module docstring); ``gns`` (a traced bool) overrides that rule
    (stacked trials decide it outside ``vmap``, so the branch stays a branch)."""
    loss_fn = make_loss_fn(graphdef, z_loss_weight, aux_weights)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    params, rest = state["params"], state["rest"]
    inputs, targets = batch["inputs"], batch["targets"]
    b, _ = inputs.shape
    if b % (accum * shards):
        raise ValueError(f"global batch {b} does not split into {accum} passes over {shards} row blocks")
    if accum == 1 and gns_every and b % 2:
        raise ValueError(f"global batch must be even for the noise-scale halves, got {b}")
    if not gns_every:
        gns = False
    elif gns is None:
        s = state["step"] + 1  # the step this update completes (1-based, as the trainer logs it)
        gns = (s % gns_every == 0) | (s == state["total_steps"])
    loss_total, ce, metrics, grads, g_small_sq, b_small = _gradients(
        grad_fn, params, rest, inputs, targets, accum=accum, shards=shards, gns=gns)
    g_big_sq = _sq_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    if lr is not None:
        lr = jnp.asarray(lr, jnp.float32)
        updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    new_params = optax.apply_updates(params, updates)
    metrics = dict(metrics)
    metrics.update(loss=ce, loss_total=loss_total, grad_norm=jnp.sqrt(g_big_sq))
    if gns_every:
        nan = jnp.float32(jnp.nan)  # NaN on steps without statistics; the trainer logs none there
        metrics.update(gns_b_small=jnp.where(gns, b_small, nan), gns_b_big=jnp.where(gns, jnp.float32(b), nan),
                       gns_g_small_sq=jnp.where(gns, g_small_sq, nan), gns_g_big_sq=jnp.where(gns, g_big_sq, nan))
    if lr is not None:
        metrics["lr"] = lr
    new_state = {**state, "params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, *, z_loss_weight: float,
                    lr_fn: Callable | None = None, donate: bool = True, accum: int = 1, shards: int = 1,
                    gns_every: int = 1) -> Callable:
    """Jitted ``step(state, batch) -> (state, metrics)`` with its hyperparameters compiled in.

    ``state`` from ``init_state``; ``batch = {"inputs", "targets"}`` int32 ``[B, L]``, ``B`` a
    multiple of ``accum x shards`` (and even with statistics and no accumulation); ``accum``
    passes per step over ``shards`` row blocks (the mesh's batch split), noise-scale statistics
    every ``gns_every`` steps (0: never; module docstring). ``lr_fn(step, total_steps) -> lr`` scales the optimizer's output by ``-lr`` (with
    ``tx = optim.make_optimizer(...)`` this is AdamW); ``None`` applies ``tx``'s updates as they
    are. The LR is computed from the state's traced step and total, so changing the budget does
    not recompile. Metrics (device scalars): ``loss`` (cross-entropy, nats), ``loss_total`` (what
    is differentiated), ``grad_norm`` (before clipping), ``lr`` (the LR this update used), the
    four ``gns_*`` statistics (NaN on steps without them; absent with ``gns_every=0``) and the
    model's aux metrics. The trainer uses
    ``make_traced_train_step``, which takes the hyperparameters as values instead.
    """

    def step(state, batch):
        lr = lr_fn(state["step"], state["total_steps"]) if lr_fn is not None else None
        return _update(graphdef, state, batch, tx, z_loss_weight, lr, accum=accum, shards=shards, gns_every=gns_every)

    return jax.jit(step, donate_argnums=(0,) if donate else ())


class TrainStep:
    """``step(state, batch) -> (state, metrics)`` whose hyperparameters (``optim.HPARAMS``) are
    arguments of the compiled program, not constants in it: every learning rate, warmup, weight
    decay, Adam beta/eps, clip norm and z-loss weight at one shape shares one compilation (and
    one persistent-cache entry). ``with_hparams(cfg)`` gives the same compiled step with other
    values; ``lower(state, batch)`` is jax's, for ahead-of-time compilation."""

    def __init__(self, jitted, hp: dict, static: tuple | None = None):
        self._jitted = jitted
        self.hparams = hp
        self._static = static

    def __call__(self, state, batch):
        return self._jitted(state, batch, self.hparams)

    def lower(self, state, batch):
        return _Lowered(self._jitted.lower(state, batch, self.hparams), self.hparams)

    def with_hparams(self, optim_cfg, model_cfg=None) -> "TrainStep":
        """The same compiled step with ``optim_cfg``'s (and ``model_cfg``'s aux) values. Raises
        ``ValueError`` when a setting compiled into the program differs (schedule kind, WSD
        cooldown shape, clipping on/off, traced aux weights or not)."""
        from scaling.train import optim

        static = _static_settings(optim_cfg, model_cfg)
        if self._static is not None and static != self._static:
            raise ValueError(f"with_hparams: {static} differs from the compiled step's {self._static} "
                             f"(schedule, cooldown, clipping on/off, aux weights traced); build a new step")
        return TrainStep(self._jitted, optim.hparams(optim_cfg, model_cfg), self._static)


class _Lowered:
    def __init__(self, lowered, hp):
        self._lowered, self._hp = lowered, hp

    def as_text(self) -> str:
        """The lowered program (StableHLO text), e.g. to count its operations."""
        return self._lowered.as_text()

    def compile(self):
        compiled, hp = self._lowered.compile(), self._hp
        return lambda state, batch: compiled(state, batch, hp)


def make_traced_train_step(graphdef, optim_cfg, model_cfg=None, *, donate: bool = True, accum: int = 1,
                           shards: int = 1, gns_every: int = 1) -> TrainStep:
    """The trainer's step: AdamW (``optim.make_optimizer``) and the schedule
    (``optim.learning_rate``) of ``optim_cfg`` with every number in ``optim.HPARAMS`` (and, given
    ``model_cfg``, the MoE/MoD aux-loss weights) passed to the compiled program as a value (see
    ``TrainStep``); ``accum``, ``shards``, ``gns_every`` and metrics as ``make_train_step``
    (``train.loop`` passes ``accumulation(cfg, mesh)`` and ``gns_every(cfg)``)."""
    from scaling.train import optim

    step = traced_step_fn(graphdef, optim_cfg, model_cfg, accum=accum, shards=shards, gns_every=gns_every)
    return TrainStep(jax.jit(step, donate_argnums=(0,) if donate else ()), optim.hparams(optim_cfg, model_cfg),
                     _static_settings(optim_cfg, model_cfg))


def traced_step_fn(graphdef, optim_cfg, model_cfg=None, *, accum: int = 1, shards: int = 1,
                   gns_every: int = 1) -> Callable:
    """The un-jitted ``step(state, batch, hp, gns=None) -> (state, metrics)`` that
    ``make_traced_train_step`` compiles (``scaling.train.stack`` vmaps it over trials, passing
    ``gns``, whether this step takes noise-scale statistics, from outside)."""
    from scaling.train import optim

    traced_aux = model_cfg is not None

    def step(state, batch, hp, gns=None):
        tx = optim.make_optimizer(optim_cfg, hp, model_cfg)
        lr = optim.learning_rate(optim_cfg, state["step"], state["total_steps"], hp)
        return _update(graphdef, state, batch, tx, hp["z_loss"], lr, hp if traced_aux else None,
                       accum=accum, shards=shards, gns_every=gns_every, gns=gns)

    return step


def _static_settings(optim_cfg, model_cfg) -> tuple:
    """What a traced step compiles in: the schedule kind, the WSD cooldown shape, whether it
    clips, whether the aux weights are traced."""
    return (optim_cfg.schedule, getattr(optim_cfg, "wsd_cooldown", "linear"), optim_cfg.grad_clip > 0,
            model_cfg is not None)


def make_eval_step(graphdef, mod_routing: str = "topk") -> Callable:
    """Jitted ``eval_step(params, rest, batch) -> (sum of token cross-entropies (nats), n_tokens)``.

    ``batch`` may carry ``weights`` float32[B, L] (0 for padding rows, ``data.loader.pad_rows``);
    both sums are then weighted. ``mod_routing="causal"`` evaluates mixture-of-depths blocks with
    per-token causal decisions (the loss a sampler sees) instead of training's top-k."""

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        logits, _ = model(batch["inputs"], train=False, mod_routing=mod_routing)
        logits = logits.astype(jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
        w = batch.get("weights")
        if w is None:
            return jnp.sum(log_z - tgt), jnp.float32(tgt.size)
        return jnp.sum((log_z - tgt) * w), jnp.sum(w)

    return jax.jit(eval_step)


def evaluate_chunks(eval_step: Callable, params, rest, chunks: list[dict[str, Any]], put: Callable) -> tuple[float, float]:
    """``(mean, standard error)`` of the cross-entropy (nats/token) over held-out ``chunks``
    (``mean_and_se`` of ``chunk_sums``)."""
    return mean_and_se(*chunk_sums(eval_step, params, rest, chunks, put))


def chunk_sums(eval_step: Callable, params, rest, chunks: list[dict[str, Any]], put: Callable) -> tuple[list, list]:
    """Per chunk, the summed cross-entropy (nats) and the number of scored tokens."""
    sums, counts = [], []
    for chunk in chunks:
        s, n = eval_step(params, rest, put(chunk))
        sums.append(float(s))
        counts.append(float(n))
    return sums, counts


def mean_and_se(sums: list, counts: list) -> tuple[float, float]:
    """The mean over all tokens and the standard error of a token-weighted mean of the chunk
    means (``sqrt(k / (k - 1) * sum w_i^2 (m_i - m)^2) / sum w_i``, ``k`` chunks; NaN for one
    chunk), the sampling noise of the held-out estimate."""
    total, count = sum(sums), max(sum(counts), 1.0)
    mean = total / count
    k = len(sums)
    if k < 2:
        return mean, float("nan")
    dev = sum((c * (s / max(c, 1.0) - mean)) ** 2 for s, c in zip(sums, counts))
    return mean, (k / (k - 1) * dev) ** 0.5 / count
