"""The one persistent JAX compilation cache, and the user cache directory it lives in.

Sweeps, resumes and tests compile the same shapes over and over, and on a small CPU compilation
is most of a short run's wall time, so every process that trains (``scaling train``, sweep
workers, submitit tasks) calls ``enable_compilation_cache()`` first. Every executable is kept,
however fast it compiled (tiny models compile in well under JAX's default 1 s threshold). A
loaded executable is the same binary, so results are unchanged and resumes stay bitwise exact.

Where: ``$SCALING_JAX_CACHE`` if set, else ``$SCALING_CACHE_DIR/jax``, else
``~/.cache/scaling/jax``. ``SCALING_NO_COMPILATION_CACHE=1`` turns it off; a cache directory the
user configured in jax already is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SCALING_CACHE_DIR`` or ``~/.cache/scaling`` (compiled executables, the measured CPU peak)."""
    return Path(os.environ.get("SCALING_CACHE_DIR") or Path.home() / ".cache" / "scaling")


def compilation_cache_dir() -> Path:
    """``$SCALING_JAX_CACHE`` or ``cache_root() / "jax"``: shared by all runs, workers and sweeps."""
    return Path(os.environ.get("SCALING_JAX_CACHE") or cache_root() / "jax")


def enable_compilation_cache() -> Path | None:
    """Point jax's persistent compilation cache at ``compilation_cache_dir()`` (keeping every
    entry); returns the directory in use, or ``None`` when disabled."""
    import jax

    if os.environ.get("SCALING_NO_COMPILATION_CACHE"):
        return None
    configured = jax.config.jax_compilation_cache_dir
    if configured and Path(configured) != compilation_cache_dir():
        return Path(configured)  # the user's own choice wins
    path = compilation_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without a cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
