"""Dense -> MoE upcycling (``init.upcycle=moe``; Komatsuzaki et al. 2023, Liew et al. 2025).

``check(dense_cfg, moe_cfg)`` (no jax) says whether a dense run's checkpoint can become the MoE
``moe_cfg``: the same model but for ``model.moe`` (and the settings that change no maths), a
dense source, experts the size of the dense MLP (``expert_size=1``). ``upcycle_params(dense,
moe, cfg, noise, key)`` builds the MoE's parameters from the dense ones:

* every routed expert ``j`` is slice ``j mod G`` of the dense MLP (``G`` = granularity: hidden
  units ``g f .. (g+1) f - 1`` of ``w_in``/``w_gate``, the same rows of ``w_out``); with
  ``G = 1`` each expert is the whole MLP;
* shared experts (``n_shared_experts * f`` hidden units) hold the dense MLP's hidden units
  cyclically;
* the router keeps the MoE model's fresh initialisation (seeded by ``seed``);
* everything else (attention, norms, embeddings, dense MLPs of non-MoE layers) is copied;
* ``noise > 0`` adds ``noise * std(w)`` Gaussian noise to each expert's copy of ``w``,
  independently per expert (breaks the experts' symmetry; 0 keeps exact copies).

Why the step-0 model equals the dense one with ``G = 1``, ``top_k >= 2`` (gates renormalised
to sum to 1), dropless routing and no shared experts: the layer returns
``sum_i g_i MLP_i(x) = (sum_i g_i) MLP(x) = MLP(x)`` whatever the router picks (tested). Top-1
gates are the raw router probability (Switch), capacity drops tokens, shared experts add a
second copy, and fine-grained slices are weighted by the router: then the start is close to,
not equal to, the dense model.
"""

from __future__ import annotations

import dataclasses

from scaling.config import ConfigError, ModelConfig

# model fields that change no maths (kernels, memory) and may differ between the two runs
_FREE = {"moe", "remat", "attention"}
_EXPERT = {"w_in", "w_gate", "w_out"}
_SHARED = {"s_in": "w_in", "s_gate": "w_gate", "s_out": "w_out"}


def check(dense: ModelConfig, moe_model: ModelConfig) -> None:
    """ConfigError naming the field when a checkpoint of ``dense`` cannot be upcycled into
    ``moe_model`` (one line, with the fix)."""
    from scaling import blocks

    if dense.moe is not None or blocks.ffn(dense) != "mlp":
        raise ConfigError(f"init_from: the checkpoint's model is not dense (model.ffn={blocks.ffn(dense)}); "
                          "upcycling starts from a dense run")
    if moe_model.moe is None:
        raise ConfigError("init.upcycle: moe upcycles into an MoE model, but model.moe is not set; set model.ffn=moe")
    if moe_model.moe.expert_size != 1.0:
        raise ConfigError(f"model.moe.expert_size: upcycling copies the dense MLP into each expert, so experts must "
                          f"be its size; set model.moe.expert_size=1 (got {moe_model.moe.expert_size:g})")
    if moe_model.scan_layers and moe_model.layer_period() > 1:
        raise ConfigError(f"model.scan_layers: upcycling into a scanned model whose MoE layers alternate (model.moe."
                          f"every={moe_model.moe.every}) is not supported; use model.scan_layers=false")
    for f in dataclasses.fields(ModelConfig):
        if f.name in _FREE:
            continue
        a, b = getattr(dense, f.name), getattr(moe_model, f.name)
        if f.name == "d_ff":
            a, b = dense.resolved_d_ff, moe_model.resolved_d_ff
        if a != b:
            raise ConfigError(f"model.{f.name}: the dense checkpoint has {f.name}={a!r}, this MoE config {b!r}; "
                              f"upcycling keeps the dense shape (set model.{f.name}={a!r})")


# data fields that decide the training stream (the held-out set, microbatching and loader
# workers may differ)
_STREAM_FREE = {"eval_tokens", "eval_batches", "microbatch", "worker_count"}


def source_config(init_from: str):
    """The ``TrainConfig`` the run named by ``init_from`` (``RUN_DIR@STEP``) trained with."""
    from scaling import schema, storage
    from scaling.config import TrainConfig
    from scaling.files import read_json

    run = init_from.rsplit("@", 1)[0]
    recorded = read_json(storage.path(run) / "config.json")
    if not recorded:
        raise ConfigError(f"init_from: no config.json in {run}; upcycling starts from a run directory of scaling train")
    return TrainConfig.from_dict(schema.config_fields(recorded))


def check_data(src, cfg) -> None:
    """With ``init.data=continue`` the upcycled run ``cfg`` reads on in the dense run ``src``'s
    training stream: every field that decides it must match, and one batch size (no schedule).
    ConfigError naming the field otherwise."""
    if cfg.init.data != "continue":
        return
    for f in dataclasses.fields(type(cfg.data)):
        a, b = getattr(src.data, f.name), getattr(cfg.data, f.name)
        if f.name not in _STREAM_FREE and a != b:
            raise ConfigError(f"data.{f.name}: init.data=continue reads on from the dense run's data, which has "
                              f"{f.name}={a!r} (this run {b!r}); set data.{f.name}={a!r} or init.data=restart")
    if cfg.data.batch_schedule:
        raise ConfigError("data.batch_schedule: an upcycled run that reads on from the dense run's data position "
                          "keeps one batch size; drop the schedule or set init.data=restart")


def plan(cfg) -> dict:
    """Checks an upcycling run (``cfg.init.upcycle == "moe"``) against its dense source before
    any device work; the facts recorded in ``config.json`` under ``resolved["upcycled_from"]``:
    ``run``, ``step``, ``tokens`` (D1, the dense run's training tokens to ``step``), ``flops``
    (the dense stage's training FLOPs, exact count) and ``data_seed`` (the seed of the data
    order this run reads on with). ConfigError naming the field otherwise."""
    from scaling import flops
    from scaling.data.batch_schedule import BatchSchedule

    src = source_config(cfg.init_from)
    step = int(cfg.init_from.rsplit("@", 1)[1])
    check(src.model, cfg.model)
    check_data(src, cfg)
    tokens = BatchSchedule.of(src.data).tokens_before(step)
    return {"run": cfg.init_from.rsplit("@", 1)[0], "step": step, "tokens": tokens,
            "flops": tokens * float(flops.train_flops_per_token(src.model, src.data.seq_len)),
            "params": int(flops.param_counts(src.model).non_embedding),
            "data_seed": src.seed if cfg.init.data == "continue" else cfg.seed}


def upcycle_params(dense_params, moe_params, cfg: ModelConfig, noise: float = 0.0, seed: int = 0):
    """The MoE parameters (an ``nnx.State`` shaped and sharded like ``moe_params``) built from
    the dense model's ``dense_params`` (module docstring). ``moe_params`` supplies the routers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    dense_d, moe_d = nnx.to_pure_dict(dense_params), nnx.to_pure_dict(moe_params)
    G = cfg.moe.granularity
    key = jax.random.key(seed)
    counter = [0]

    def noisy(w_XxExAxB, base):
        if noise <= 0:
            return w_XxExAxB
        counter[0] += 1
        eps = jax.random.normal(jax.random.fold_in(key, counter[0]), w_XxExAxB.shape, jnp.float32)
        return w_XxExAxB + (noise * jnp.std(base.astype(jnp.float32)) * eps).astype(w_XxExAxB.dtype)

    def experts(name: str, dense_w, like):
        # dense [..., D, F] (w_in, w_gate) or [..., F, D] (w_out) -> [..., E, D, f] / [..., E, f, D]
        n_routed = like.shape[-3]
        f = like.shape[-1] if name != "w_out" else like.shape[-2]
        hidden_axis = -1 if name != "w_out" else -2
        slices = [jax.lax.slice_in_dim(dense_w, (j % G) * f, (j % G + 1) * f, axis=hidden_axis % dense_w.ndim)
                  for j in range(n_routed)]
        return noisy(jnp.stack(slices, axis=dense_w.ndim - 2), dense_w)

    def shared(name: str, dense_w, like):
        hidden_axis = (-1 if name != "w_out" else -2) % dense_w.ndim
        width, full = like.shape[hidden_axis], dense_w.shape[hidden_axis]
        return noisy(jnp.take(dense_w, jnp.arange(width) % full, axis=hidden_axis), dense_w)

    def walk(m, d, path):
        out = {}
        for k, v in m.items():
            here = (*path, k)
            if isinstance(v, dict):
                out[k] = walk(v, d.get(k, {}) if isinstance(d, dict) else {}, here)
                continue
            src = d.get(k) if isinstance(d, dict) else None
            if k == "router" and path and path[-1] == "mlp":
                out[k] = v  # a fresh router
            elif k in _EXPERT and src is not None and src.ndim == v.ndim - 1:
                out[k] = experts(k, src, v)
            elif k in _SHARED and isinstance(d, dict) and d.get(_SHARED[k]) is not None:
                out[k] = shared(_SHARED[k], d[_SHARED[k]], v)
            elif src is not None and src.shape == v.shape:
                out[k] = src
            else:
                where = "/".join(map(str, here))
                raise ConfigError(f"init_from: the dense checkpoint has no tensor for {where} "
                                  f"(shape {tuple(v.shape)}); upcycle a dense run of this model's shape")
            out[k] = jax.device_put(jnp.asarray(out[k], v.dtype), v.sharding)
        return out

    new = walk(moe_d, dense_d, ())
    state = jax.tree.map(lambda x: x, moe_params)  # a copy of the structure (Params)
    nnx.replace_by_pure_dict(state, new)
    return state
