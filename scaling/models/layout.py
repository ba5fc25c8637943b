"""Converting a train state between the two block layouts (``model.scan_layers``).

Loop layout: ``blocks/<i>/...``, one entry per layer. Scanned layout: ``stack/<j>/...``, one
entry per block of the repeating group (``cfg.layer_period()`` blocks), each variable with a
leading axis over the ``n_layers / period`` groups; layer ``i`` is group ``i // period``, block
``i % period`` (``transformer.stack_blocks``). ``convert`` rewrites every ``nnx.State`` in a
tree (parameters, Adam's moments inside the optax state), so a checkpoint written in one layout
restores into the other: a branch (``init_from``) may change ``model.scan_layers``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config import ModelConfig

STACKED_AXIS = "layers"


def _with(var: nnx.Variable, value, names):
    meta = dict(var.get_metadata())
    if names is not None:
        meta["out_sharding"] = names
    return type(var)(value, **meta)


def _to_scan(flat: list, period: int) -> list:
    out, grouped = [], {}
    for path, var in flat:
        if path and path[0] == "blocks":
            i, rest = int(path[1]), tuple(path[2:])
            grouped.setdefault((i % period, rest), []).append((i // period, var))
        else:
            out.append((path, var))
    for (j, rest), members in grouped.items():
        members.sort(key=lambda m: m[0])
        first = members[0][1]
        names = first.get_metadata().get("out_sharding")
        value = jnp.stack([v.get_value() for _, v in members])
        out.append((("stack", j, *rest), _with(first, value, (STACKED_AXIS, *names) if names else None)))
    return out


def _to_loop(flat: list, period: int) -> list:
    out = []
    for path, var in flat:
        if not (path and path[0] == "stack"):
            out.append((path, var))
            continue
        j, rest = int(path[1]), tuple(path[2:])
        names = var.get_metadata().get("out_sharding")
        value = var.get_value()
        for g in range(value.shape[0]):
            out.append((("blocks", g * period + j, *rest), _with(var, value[g], tuple(names[1:]) if names else None)))
    return out


def convert(tree, cfg: ModelConfig, *, to_scan: bool):
    """``tree`` (a train state: params, rest, optimizer state) with every ``nnx.State`` rewritten
    into the scanned (``to_scan``) or the loop layout of ``cfg``'s blocks; states already in
    that layout are unchanged. Values are stacked/sliced, not copied through the host."""
    period = cfg.layer_period()

    def one(x):
        if not isinstance(x, nnx.State):
            return x
        flat = list(nnx.to_flat_state(x))
        keys = {p[0] for p, _ in flat if p}
        if ("blocks" in keys and not to_scan) or ("stack" in keys and to_scan) or not ({"blocks", "stack"} & keys):
            return x
        flat = _to_scan(flat, period) if to_scan else _to_loop(flat, period)
        return nnx.from_flat_state(flat)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.State))
