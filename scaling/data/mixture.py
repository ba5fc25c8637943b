"""Data mixtures: ``data.source=mixture`` with ``data.mixture = ("NAME=WEIGHT", ...)``.

A component is a shard directory (``scaling data prepare``; named by its directory name), a
built-in text source without fields (``stdlib``, ``packages``, tokenized with
``data.tokenizer``), or a synthetic task suite ``tasks:SUITE`` (``scaling.tasks``; named by the
suite, ``data.task_examples`` training examples). All components must share one tokenizer (the same sha256), since one model
reads them.

Deterministic interleaving: global training window slot ``i`` (``step * batch + row``) belongs to
the component ``pattern[i % PERIOD]``, a fixed pattern in which component ``s`` holds
``round(w_s * PERIOD)`` slots spread evenly (smooth weighted round robin). How many slots of
``s`` precede ``i`` is therefore ``(i // PERIOD) * n_s + prefix_s[i % PERIOD]``, O(1), and that
count walks ``s``'s own endless sequence of epochs (a fresh permutation of its windows each
epoch, from ``(seed, shuffle_seed, component index, epoch)``). Every batch is a pure function of
the step, as for one source, so the iterator state stays ``{"next_index": step}``.

Held-out: each component contributes its own chunks (``data.eval_tokens x weight`` tokens,
at least one sequence), logged as ``eval_loss/NAME`` and ``eval_bpb/NAME``; ``eval_loss`` is
the token mean over all of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaling.config import ConfigError, DataConfig

PERIOD = 1000  # slots per interleaving period: weights are kept to 1/PERIOD
BUILTIN = ("stdlib", "packages")


@dataclass(frozen=True)
class Component:
    name: str
    weight: float  # as given, normalised to sum 1
    slots: int  # of each PERIOD
    cfg: DataConfig  # how to load it alone


def parse(cfg: DataConfig) -> list[Component]:
    """The components of ``cfg.mixture``; ConfigError naming ``data.mixture`` for a bad entry."""
    entries = []
    for item in cfg.mixture:
        name, sep, w = str(item).rpartition("=")
        if not sep or not name:
            raise ConfigError(f"data.mixture: {item!r} is not SOURCE=WEIGHT (a shard directory, "
                              f"{'/'.join(BUILTIN)} or tasks:SUITE, e.g. shards/code=0.7)")
        try:
            weight = float(w)
        except ValueError:
            raise ConfigError(f"data.mixture: weight {w!r} of {name!r} is not a number") from None
        if not (weight > 0 and np.isfinite(weight)):
            raise ConfigError(f"data.mixture: weight of {name!r} must be > 0, got {w}")
        entries.append((name, weight))
    if len(entries) < 2:
        raise ConfigError("data.mixture: a mixture needs at least two SOURCE=WEIGHT entries")
    total = sum(w for _, w in entries)
    slots = _slots([w / total for _, w in entries])
    out, names = [], set()
    for (src, w), n in zip(entries, slots):
        common = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size, shuffle_seed=cfg.shuffle_seed)
        if src in BUILTIN:
            one, name = DataConfig(source=src, tokenizer=cfg.tokenizer, **common), src
        elif src.startswith("tasks:"):
            from scaling.tasks import BUILTIN as SUITES

            name = src.removeprefix("tasks:")
            if name not in SUITES:
                raise ConfigError(f"data.mixture: {src!r} names no task suite; use tasks:SUITE with one of "
                                  f"{', '.join(SUITES)}")
            one = DataConfig(source="tasks", tasks=(name,), task_examples=cfg.task_examples, tokenizer=cfg.tokenizer,
                             **common)
        else:
            one, name = DataConfig(source="shards", path=src, **common), Path(src).name
        if name in names:
            raise ConfigError(f"data.mixture: two components are named {name!r}; give their directories different names")
        if n == 0:
            raise ConfigError(f"data.mixture: weight of {src!r} is below 1/{PERIOD}; raise it or drop the component")
        names.add(name)
        out.append(Component(name, w / total, n, one))
    return out


def _slots(weights: list[float]) -> list[int]:
    """Integer slots per PERIOD summing to PERIOD, largest remainders first."""
    raw = [w * PERIOD for w in weights]
    n = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: n[i] - raw[i])[: PERIOD - sum(n)]:
        n[i] += 1
    return n


def pattern(slots: list[int]) -> np.ndarray:
    """int64[PERIOD]: the component of each slot (smooth weighted round robin: each component's
    slots spread as evenly as integers allow)."""
    current = np.zeros(len(slots))
    out = np.empty(PERIOD, np.int64)
    for i in range(PERIOD):
        current += slots
        j = int(np.argmax(current))
        out[i] = j
        current[j] -= PERIOD
    return out


class MixedBatches:
    """``step -> {"inputs", "targets"}`` over a mixture, rows of this host only (see module)."""

    def __init__(self, streams: list, starts: list[np.ndarray], slots: list[int], seq_len: int, global_batch: int,
                 key: tuple[int, ...], process_index: int = 0, process_count: int = 1):
        from scaling.data.loader import PackedBatches

        self.pattern = pattern(slots)
        self.slots = np.asarray(slots, np.int64)
        onehot = self.pattern[:, None] == np.arange(len(slots))[None, :]
        self.prefix = np.cumsum(onehot, axis=0) - onehot  # slots of each component before position p
        # one single-source batcher per component, used for its permutations and windows
        self.parts = [PackedBatches(t, s, seq_len, global_batch, (*key, i)) for i, (t, s) in enumerate(zip(streams, starts))]
        self.seq_len, self.global_batch = seq_len, global_batch
        b_local = global_batch // process_count
        self.rows = process_index * b_local + np.arange(b_local, dtype=np.int64)

    def assignment(self, slots_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(component, its use count) of each global slot."""
        period, pos = np.divmod(slots_i, PERIOD)
        comp = self.pattern[pos]
        return comp, period * self.slots[comp] + self.prefix[pos, comp]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        from scaling.data.corpus import read_windows

        slots_i = int(step) * self.global_batch + self.rows
        comp, k = self.assignment(slots_i)
        w = np.empty((len(slots_i), self.seq_len + 1), np.int32)
        for c in np.unique(comp):
            m = comp == c
            part = self.parts[int(c)]
            epoch, pos = np.divmod(k[m], len(part.starts))
            idx = np.empty_like(pos)
            for e in np.unique(epoch):
                me = epoch == e
                idx[me] = part.permutation(int(e))[pos[me]]
            w[m] = read_windows(part.tokens, part.starts[idx], self.seq_len + 1)
        return {"inputs": w[:, :-1], "targets": w[:, 1:]}


def combined_info(cfg: DataConfig, comps: list[Component], infos: list[dict]) -> dict:
    """``corpus_info`` of a mixture: sums of the components' counts, hashes over theirs and the
    weights, the tokenizer they share, and per component its own info under ``components``."""
    toks = {i["tokenizer_sha256"] for i in infos}
    if len(toks) > 1:
        names = ", ".join(f"{c.name}: {i['tokenizer']}" for c, i in zip(comps, infos))
        raise ConfigError(f"data.mixture: components use different tokenizers ({names}); prepare them with one")
    h, t = hashlib.sha256(), hashlib.sha256()
    for c, i in zip(comps, infos):
        h.update(f"{c.name}={c.slots}:{i['sha256']}\n".encode())
        t.update(f"{c.name}={c.slots}:{i['text_sha256']}\n".encode())
    n_train = sum(i["n_train_tokens"] for i in infos)
    bpt = [i["train_bytes_per_token"] for i in infos]
    return {
        "name": "mixture:" + "+".join(f"{c.name}={c.slots / PERIOD:g}" for c in comps),
        "source": "mixture", "sha256": h.hexdigest(), "text_sha256": t.hexdigest(),
        "n_train_tokens": n_train, "unique_tokens": n_train, "n_eval_tokens": sum(i["n_eval_tokens"] for i in infos),
        "n_train_bytes": sum(i["n_train_bytes"] or 0 for i in infos), "n_eval_bytes": sum(i["n_eval_bytes"] or 0 for i in infos),
        # the mean bytes per token of what training reads: weighted by the mixture, not the sizes
        "train_bytes_per_token": (sum(c.slots / PERIOD * b for c, b in zip(comps, bpt)) if all(bpt) else None),
        "n_documents": sum(i["n_documents"] for i in infos), "vocab_size": infos[0]["vocab_size"],
        "tokenizer": infos[0]["tokenizer"], "tokenizer_sha256": infos[0]["tokenizer_sha256"],
        "unigram_entropy_nats": None, "windows_per_epoch": sum(i["windows_per_epoch"] for i in infos),
        "steps_per_epoch": sum(i["windows_per_epoch"] for i in infos) / cfg.batch_size,
        "components": {c.name: {**i, "weight": c.slots / PERIOD} for c, i in zip(comps, infos)},
    }
