"""Rematerialisation (``model.remat``): which activations a block keeps for the backward pass.

``full`` keeps only each block's input and recomputes the rest in the backward pass;
``dots_saveable`` / ``dots_with_no_batch_dims_saveable`` keep matmul outputs (jax's
``checkpoint_policies``) and recompute the cheap elementwise work. The saving is measured by
``saved_residual_bytes``: what the backward pass holds from the forward, read from the traced
program, so it is the same number on every backend. XLA's compiled ``memory_analysis()``
temp bytes show the saving where the blocks are scanned (``model.scan_layers``; d256, 12
layers, seq 1024, batch 2 on the CPU: 1,707 MiB with ``none``, 196 MiB with ``full``); with a
Python loop of blocks the CPU compiler schedules every recomputation early and reports
1,700 MiB for every policy (measured; ``scaling bench train`` prints both).
"""

from __future__ import annotations

import math

import jax


def remat_policy(name: str):
    """``model.remat`` -> a ``jax.checkpoint`` policy: None saves nothing but the block's input
    (``full``); False means no rematerialisation (``none``)."""
    return {"none": False, "full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
            "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


def saved_residual_bytes(fn, *args) -> int:
    """Bytes of the residuals ``jax.vjp(fn, *args)`` keeps for the backward pass (activations
    and the arguments it reuses), from the traced program; nothing is compiled or run."""
    from jax._src.ad_checkpoint import saved_residuals  # jax's own print_saved_residuals reads this

    return int(sum(math.prod(a.shape) * a.dtype.itemsize for a, _ in saved_residuals(fn, *args)))
