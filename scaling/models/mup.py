"""Parametrizations: standard (SP) and maximal-update (μP, Yang et al. 2022, "Tensor Programs V").

The one place that decides, for every parameter tensor, its initial standard deviation and its
Adam learning-rate multiplier, and for the forward pass the output-logit (readout) multiplier
and the attention-logit scale. ``scaling.models.layers`` / ``moe`` ask here when they create a
parameter or compute logits; ``scaling.train.optim`` asks here for the per-tensor LR multipliers.

Width multiplier ``m = d_model / model.mup_base_width``. Every hidden matrix's fan-in (``D`` for
``wq wk wv w_in w_gate``, ``H·A`` for ``wo``, ``d_ff`` for ``w_out``) is assumed proportional to
``d_model`` (true for ``ffn_ratio``-sized MLPs and ``H·A = D``), so one ``m`` serves them all.

Roles and rules (the paper's Table 8, the "equivalent formulation for easier implementation",
written relative to the base model so that **μP at m = 1 is exactly SP**):

====================  ===========================  ====================  ===============  ================
role                  tensors                      init std              Adam LR × ...    forward
====================  ===========================  ====================  ===============  ================
input                 ``embedding [V, D]``          SP's (constant)       1                -
hidden                ``wq wk wv wo w_in w_gate     SP's / sqrt(m)        1 / m            -
                      w_out``, MoE experts          (var ∝ 1/fan_in)
readout (output)      untied ``head [D, V]``, MoE   SP's (constant)       1                logits × 1/m
                      ``router [D, n]``
vector                norm scales (ones)           ones                  1                -
====================  ===========================  ====================  ===============  ================

Table 8 lists output weights with "init var 1, multiplier 1/fan_in, Adam LR 1" and hidden
weights with "init var 1/fan_in, Adam LR 1/fan_in"; input weights and biases (our norm gains)
"init var 1/fan_in (fan_in = V, finite), Adam LR 1". A tied embedding is input and output at
once: it keeps the input rules and the readout multiplier ``1/m`` applies to its logits, as the
``mup`` package's ``MuSharedReadout`` does.

Attention: logits ``q·k × sqrt(A₀) / A`` instead of ``q·k / sqrt(A)``: the 1/d scaling of μP,
equal to SP at the base head dimension ``A₀`` (``base_head_dim``: ``model.mup_base_head_dim``,
else ``model.head_dim`` when set, so widths grow by heads, else ``mup_base_width / n_heads``, so
widths grow by head dimension; a sweep sized by the size rule, whose heads and head dimension
both grow, records the rule's head dimension at the base width).

SP (``model.parametrization = sp``) is the GPT-2 initialisation this framework always used:
every matrix ``normal(0, init_std)``, residual output projections ``init_std / sqrt(2 L)``,
attention ``1 / sqrt(A)``, no multipliers. Depth transfer (depth-μP) is not covered.
"""

from __future__ import annotations

import math

from scaling.config import ModelConfig

# names of the parameters whose role is not given by their shape alone
INPUT_NAMES = ("embedding",)
READOUT_NAMES = ("head", "router")
# residual-branch output projections: SP draws them init_std / sqrt(2 n_layers) (GPT-2)
RESIDUAL_OUT_NAMES = ("wo", "w_out", "s_out")
ROLES = ("input", "hidden", "readout", "vector")


def is_mup(cfg: ModelConfig) -> bool:
    return cfg.parametrization == "mup"


def width_multiplier(cfg: ModelConfig) -> float:
    """``m = d_model / mup_base_width`` (1 under SP)."""
    return cfg.d_model / cfg.mup_base_width if is_mup(cfg) else 1.0


def base_head_dim(cfg: ModelConfig) -> float:
    """``A₀``, the base model's head dimension: ``model.mup_base_head_dim`` when set (sweeps
    sized by a size rule set it to the rule's head dimension at the base width), else
    ``model.head_dim`` when set (widths grow by heads), else ``mup_base_width / n_heads``
    (a fixed head count: widths grow by head dimension)."""
    if cfg.mup_base_head_dim is not None:
        return float(cfg.mup_base_head_dim)
    if cfg.head_dim is not None:
        return float(cfg.head_dim)
    return cfg.mup_base_width / cfg.n_heads


def role(name: str, ndim: int) -> str:
    """The μP role of parameter ``name`` (its last path key) with ``ndim`` dimensions."""
    if name in INPUT_NAMES:
        return "input"
    if name in READOUT_NAMES:
        return "readout"
    return "hidden" if ndim >= 2 else "vector"


def init_std(cfg: ModelConfig, name: str, ndim: int = 2) -> float:
    """Initial standard deviation of parameter ``name`` (``wq``, ``w_out``, ``embedding``, ...)."""
    std = cfg.init_std
    if name in RESIDUAL_OUT_NAMES:
        std = std / math.sqrt(2 * cfg.n_layers)
    if role(name, ndim) == "hidden":
        std = std / math.sqrt(width_multiplier(cfg))
    return std


def lr_multiplier(cfg: ModelConfig, name: str, ndim: int) -> float:
    """Factor on the Adam update (and the decoupled weight decay) of parameter ``name``."""
    return 1.0 / width_multiplier(cfg) if role(name, ndim) == "hidden" else 1.0


def readout_multiplier(cfg: ModelConfig) -> float:
    """Factor on the output logits and MoE router logits (``1/m`` under μP, 1 under SP)."""
    return 1.0 / width_multiplier(cfg)


def attention_scale(cfg: ModelConfig) -> float:
    """Factor on the query-key dot products: ``1/sqrt(A)`` (SP) or ``sqrt(A₀)/A`` (μP)."""
    A = cfg.resolved_head_dim
    if is_mup(cfg):
        return math.sqrt(base_head_dim(cfg)) / A
    return 1.0 / math.sqrt(A)


def path_keys(path) -> list[str]:
    """The keys of a parameter's pytree path, without nnx.Variable's own ``value`` attribute."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return [k for k in keys if k not in ("value", "raw_value")]  # nnx.Variable's own attribute


def path_name(path) -> str:
    """The parameter's name in a pytree path (``blocks/0/attn/wq/value`` -> ``wq``)."""
    keys = path_keys(path)
    return keys[-1] if keys else ""


def path_text(path) -> str:
    return "/".join(path_keys(path))


def tensor_ndim(path, x) -> int:
    """Dimensions of the tensor a parameter holds per layer: a scanned model's blocks
    (``stack/...``, ``model.scan_layers``) carry a leading layer axis that is not one of the
    tensor's own (a norm scale stays a vector, a projection a matrix)."""
    keys = path_keys(path)
    return len(getattr(x, "shape", ())) - (1 if keys and keys[0] == "stack" else 0)


def lr_multipliers(cfg: ModelConfig, params):
    """Pytree like ``params`` of Python floats: each tensor's Adam LR multiplier."""
    import jax

    return jax.tree_util.tree_map_with_path(lambda p, x: lr_multiplier(cfg, path_name(p), tensor_ndim(p, x)), params)


def describe(cfg: ModelConfig, params=None) -> dict:
    """What ``config.json`` records under ``resolved.parametrization``: the rule set, ``m``, the
    forward multipliers and, given ``params``, every tensor's role, init std and LR multiplier."""
    out = {"parametrization": cfg.parametrization, "base_width": cfg.mup_base_width if is_mup(cfg) else None,
           "base_head_dim": base_head_dim(cfg) if is_mup(cfg) else None,
           "width_multiplier": width_multiplier(cfg), "readout_multiplier": readout_multiplier(cfg),
           "attention_scale": attention_scale(cfg)}
    if params is not None:
        import jax

        tensors = {}
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            name, ndim = path_name(path), tensor_ndim(path, x)
            r = role(name, ndim)
            tensors[path_text(path)] = {"role": r, "init_std": None if r == "vector" else init_std(cfg, name, ndim),
                                        "lr_multiplier": lr_multiplier(cfg, name, ndim)}
        out["tensors"] = tensors
    return out
