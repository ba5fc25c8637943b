"""grain pipeline: corpus -> shuffled packed windows -> batches -> this host's rows.

Packing is done once, up front: the corpus is one flat token stream (documents joined by the
separator token, no padding) cut into fixed windows of ``seq_len + 1`` tokens (see
``corpus.window_starts``). A training step ``s`` reads global window slots
``s * B .. s * B + B - 1`` of an endless sequence of epochs, each epoch a fresh permutation of
all windows drawn from ``(seed, data.shuffle_seed, epoch)``. Every element is therefore a pure
function of the step index, which makes the grain iterator state a single integer
(``{"next_index": step}``): resuming is exact and costs nothing, and epochs are exact (each
window is seen once per epoch).

Per-host sharding: host ``p`` of ``P`` takes the contiguous block of rows
``[p * B / P, (p + 1) * B / P)`` of the global batch, so hosts see disjoint rows whose union is
the single-host batch, in the order ``sharding.shard_batch`` (``make_array_from_process_local_data``
with rows sharded over ``data x fsdp``) reassembles: a multi-host step sees exactly the
single-host global batch.

Sources on disk (``data.source=shards``) are read window by window (``shards.TokenStream``);
mixtures (``scaling.data.mixture``) assign each global window slot to a component by a fixed
pattern, so their batches are pure functions of the step too. ``data.worker_count > 0`` moves
batch assembly into grain worker processes without changing the iterator state.

Why a vectorised batch function instead of ``MapDataset.shuffle().batch()``: grain shuffles
per element through a Python call chain, measured at ~0.8 ms for a 32 x 129 batch on this
machine; one vectorised numpy gather per batch costs ~0.1-0.16 ms in all. grain still provides the
dataset, the iterator and its checkpointable state.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import grain
import numpy as np

from scaling.config import ConfigError, DataConfig
from scaling.data import corpus as corpus_lib


class PackedBatches:
    """``step -> {"inputs", "targets"}``: int32[B_local, L] each, targets = inputs shifted by one.

    Picklable (grain may ship it to worker processes); permutations are cached per epoch.
    """

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int, global_batch: int,
                 key: tuple[int, ...], process_index: int = 0, process_count: int = 1, schedule=None):
        self.tokens, self.starts, self.seq_len = tokens, starts, seq_len
        self.global_batch, self.key = global_batch, key
        self.process_index, self.process_count = process_index, process_count
        self.schedule = schedule  # a BatchSchedule when the batch changes, else None
        b_local = global_batch // process_count
        self.rows = process_index * b_local + np.arange(b_local, dtype=np.int64)
        self._perms: dict[int, np.ndarray] = {}

    def sequences_before(self, step: int) -> int:
        """First global window slot of ``step`` (sequences read by the steps before it)."""
        return step * self.global_batch if self.schedule is None else self.schedule.sequences_before(step)

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of ``epoch`` (int64[n_windows]); the two most recent are kept."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([*self.key, epoch]).permutation(len(self.starts))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def windows(self, step: int) -> np.ndarray:
        """Indices (into ``starts``) of this host's windows at ``step``: int64[B_local]."""
        if self.schedule is None:
            slots = step * self.global_batch + self.rows
        else:
            b_local = self.schedule.batch_at(step) // self.process_count
            rows = self.process_index * b_local + np.arange(b_local, dtype=np.int64)
            slots = self.schedule.sequences_before(step) + rows
        epoch, pos = np.divmod(slots, len(self.starts))
        out = np.empty_like(slots)
        for e in np.unique(epoch):  # a batch spans at most two epochs
            m = epoch == e
            out[m] = self.permutation(int(e))[pos[m]]
        return out

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        w = corpus_lib.read_windows(self.tokens, self.starts[self.windows(int(step))], self.seq_len + 1).astype(np.int32)
        return {"inputs": w[:, :-1], "targets": w[:, 1:]}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_perms"}

    def __setstate__(self, state):
        self.__dict__.update(state, _perms={})


def _check(cfg: DataConfig, c: corpus_lib.Corpus, n_train_windows: int, n_eval_windows: int) -> None:
    if n_train_windows == 0 or n_eval_windows == 0:
        raise ConfigError(
            f"data.seq_len: {cfg.seq_len} is too long for corpus {c.name} "
            f"({c.train.size} train / {c.eval.size} eval tokens); use a shorter sequence"
        )
    if n_train_windows < cfg.batch_size:
        raise ConfigError(
            f"data.batch_size: {cfg.batch_size} exceeds the {n_train_windows} training sequences of "
            f"corpus {c.name} at seq_len {cfg.seq_len}; use a smaller batch or a larger corpus"
        )
    if cfg.eval_tokens is not None and cfg.eval_tokens // cfg.seq_len > n_eval_windows:
        raise ConfigError(
            f"data.eval_tokens: {cfg.eval_tokens} tokens is more than the held-out split of corpus {c.name} "
            f"({n_eval_windows} sequences = {n_eval_windows * cfg.seq_len} tokens at seq_len {cfg.seq_len}); "
            f"lower it or leave it unset (the whole split, at most {DEFAULT_EVAL_TOKENS})"
        )


def _windows(cfg: DataConfig) -> tuple[corpus_lib.Corpus, np.ndarray, np.ndarray]:
    c = corpus_lib.load(cfg)
    train = corpus_lib.training_windows(cfg, c)
    eval_ = corpus_lib.window_starts(c.eval.size, cfg.seq_len, c.chain_len)
    _check(cfg, c, len(train), len(eval_))
    return c, train, eval_


def make_train_iterator(cfg: DataConfig, *, seed: int, process_index: int = 0, process_count: int = 1):
    """Endless training batches for this host as a grain ``DatasetIterator``.

    Yields ``{"inputs": int32[B_local, L], "targets": int32[B_local, L]}`` with
    ``B_local = data.batch_size / process_count`` and ``L = data.seq_len`` tokens. The order is a
    function of ``(seed, data.shuffle_seed)`` only; ``get_state()`` / ``set_state()`` restore it
    exactly. Raises ``ConfigError`` for a batch that does not split over hosts or a corpus too
    small for the shapes asked.
    """
    if int(seed) < 0:
        raise ConfigError(f"seed: must be >= 0 (it seeds the data order), got {seed}")
    if cfg.shuffle_seed < 0:
        raise ConfigError(f"data.shuffle_seed: must be >= 0, got {cfg.shuffle_seed}")
    if not (0 <= process_index < process_count):
        raise ConfigError(f"process_index: {process_index} is not in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise ConfigError(
            f"data.batch_size: {cfg.batch_size} does not split over {process_count} hosts; use a multiple of {process_count}"
        )
    key = (int(seed), int(cfg.shuffle_seed))
    if cfg.source == "mixture":
        from scaling.data import mixture

        comps = mixture.parse(cfg)
        loaded = [_windows(c.cfg) for c in comps]
        fn = mixture.MixedBatches([c.train for c, _, _ in loaded], [s for _, s, _ in loaded], [c.slots for c in comps],
                                  cfg.seq_len, cfg.batch_size, key, process_index, process_count)
        return TrainIterator(fn, cfg.worker_count)
    c, starts, _ = _windows(cfg)
    schedule = None
    if cfg.batch_schedule:
        from scaling.data.batch_schedule import BatchSchedule

        schedule = BatchSchedule.of(cfg)
        for b in schedule.batches:
            if b % process_count:
                raise ConfigError(f"data.batch_schedule: batch {b} does not split over {process_count} hosts; "
                                  f"use multiples of {process_count}")
            if b > len(starts):
                raise ConfigError(f"data.batch_schedule: batch {b} exceeds the {len(starts)} training sequences of "
                                  f"corpus {c.name} at seq_len {cfg.seq_len}; use a smaller batch or a larger corpus")
    fn = PackedBatches(c.train, starts, cfg.seq_len, cfg.batch_size, key, process_index, process_count, schedule)
    return TrainIterator(fn, cfg.worker_count)


class TrainIterator:
    """Batches ``fn(step)`` for step = 0, 1, ... through grain, in this process
    (``worker_count=0``) or prefetched by ``worker_count`` worker processes
    (``mp_prefetch``). Its state is the next step, ``{"next_index": step}``, whatever the worker
    count, so a run resumes exactly with any worker count (and from checkpoints written before
    workers existed)."""

    def __init__(self, fn: PackedBatches, worker_count: int = 0, start: int = 0):
        self.fn, self.worker_count = fn, int(worker_count)
        self._it = None
        self._start(start)

    def _start(self, step: int) -> None:
        self.close()
        self.step = int(step)
        ds = grain.MapDataset.range(self.step, sys.maxsize).map(self.fn)
        # a batch costs microseconds to well under a millisecond: no reader threads in-process
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.worker_count > 0:
            _absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count, per_worker_buffer_size=2))
        self._it = iter(it)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        """``{"next_index": step, "sequences": first window slot of that step}``; the second
        lets a restore check that the sequences read so far agree (a branch with another batch)."""
        state = {"next_index": self.step}
        if hasattr(self.fn, "sequences_before"):
            state["sequences"] = int(self.fn.sequences_before(self.step))
        return state

    def close(self) -> None:
        """Stop the worker processes (if any); a later ``set_state`` starts new ones."""
        it, self._it = getattr(self, "_it", None), None
        if it is not None and hasattr(it, "close"):
            it.close()

    def set_state(self, state: dict) -> None:
        step = state.get("next_index") if isinstance(state, dict) else None
        if not isinstance(step, int) or step < 0:
            raise ConfigError(f"data iterator state {state!r} is not {{'next_index': step}}; the checkpoint is not ours")
        seqs = state.get("sequences")
        if seqs is not None and hasattr(self.fn, "sequences_before") and int(seqs) != self.fn.sequences_before(step):
            raise ConfigError(f"data.batch_size: the checkpoint stopped after {int(seqs)} sequences at step {step}, but "
                              f"this run's batches put step {step} after {self.fn.sequences_before(step)}; to change the "
                              "batch from a checkpoint keep the run's data.batch_size and add "
                              "data.batch_schedule=TOKENS:NEW_BATCH")
        if step != self.step:
            self._start(step)


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; a library caller has not parsed any."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def host_slice(batch: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This host's rows of a global batch (e.g. an eval batch), by the training iterator's rule."""
    n = next(iter(batch.values())).shape[0] // process_count
    return {k: v[process_index * n : (process_index + 1) * n] for k, v in batch.items()}


DEFAULT_EVAL_TOKENS = 2**18  # held-out tokens when data.eval_tokens is unset (or the whole split)
EVAL_CHUNK = 32  # sequences per held-out chunk: fixed, so the chunks do not depend on batch or mesh


@dataclass(frozen=True)
class EvalSet:
    """The held-out set: ``chunks`` of ``EVAL_CHUNK`` sequences (the last may be shorter), each
    ``{"inputs", "targets"}`` int32[n, L]; ``sha256`` of the token ids scored (the windows of
    ``L + 1`` tokens, int32, in order); ``n_sequences``; ``n_tokens`` (= scored targets);
    ``n_bytes``, the UTF-8 text bytes those targets stand for (None for synthetic), so
    ``bits_per_byte = eval_loss * n_tokens / (n_bytes * ln 2)``."""

    chunks: list
    sha256: str
    n_sequences: int
    n_tokens: int
    n_bytes: int | None = None
    # mixtures: the component of each chunk, and per component its tokens and bytes
    groups: tuple | None = None
    group_tokens: dict | None = None
    group_bytes: dict | None = None
    bytes_exact: bool | None = None  # False: n_bytes from the split's mean bytes per token

    @property
    def bytes_per_token(self) -> float | None:
        return self.n_bytes / self.n_tokens if self.n_bytes else None

    def describe(self) -> dict:
        out = {"sha256": self.sha256, "n_sequences": self.n_sequences, "n_tokens": self.n_tokens,
               "n_bytes": self.n_bytes, "bytes_exact": self.bytes_exact, "chunk_sequences": EVAL_CHUNK,
               "n_chunks": len(self.chunks)}
        if self.groups is not None:
            out["components"] = {g: {"n_tokens": self.group_tokens[g], "n_bytes": self.group_bytes[g]}
                                 for g in self.group_tokens}
        return out


def eval_set(cfg: DataConfig) -> EvalSet:
    """The fixed held-out set: ``data.eval_tokens // seq_len`` windows (default: the whole
    held-out split, at most ``DEFAULT_EVAL_TOKENS`` tokens), spread evenly over the split, cut
    into chunks of ``EVAL_CHUNK`` sequences. It depends on the data settings and ``seq_len``
    only: every batch size, mesh and host count scores the same tokens (see ``sha256``)."""
    if cfg.source == "mixture":
        return _mixture_eval_set(cfg)
    c, _, starts = _windows(cfg)
    want = cfg.eval_tokens if cfg.eval_tokens is not None else DEFAULT_EVAL_TOKENS
    n = max(1, min(len(starts), want // cfg.seq_len))
    pick = (np.arange(n, dtype=np.int64) * len(starts)) // n
    w = corpus_lib.read_windows(c.eval, starts[pick], cfg.seq_len + 1).astype(np.int32)
    chunks = [{"inputs": w[i:i + EVAL_CHUNK, :-1].copy(), "targets": w[i:i + EVAL_CHUNK, 1:].copy()}
              for i in range(0, n, EVAL_CHUNK)]
    if c.token_bytes is not None:  # exact: the bytes of the very targets scored
        n_bytes, exact = int(c.token_bytes[w[:, 1:]].sum()), True
    elif c.n_eval_bytes:  # the split's mean bytes per token (exact when the set is the whole split)
        n_bytes, exact = int(round(n * cfg.seq_len * c.n_eval_bytes / c.eval.size)), False
    else:
        n_bytes, exact = None, None
    return EvalSet(chunks, hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest(), n, n * cfg.seq_len, n_bytes,
                   bytes_exact=exact)


def _mixture_eval_set(cfg: DataConfig) -> EvalSet:
    """Each component's own held-out chunks, ``eval_tokens x weight`` tokens of it (at least one
    sequence), in component order; ``groups`` names the component of each chunk."""
    import dataclasses

    from scaling.data import mixture

    want = cfg.eval_tokens if cfg.eval_tokens is not None else DEFAULT_EVAL_TOKENS
    chunks, groups, h = [], [], hashlib.sha256()
    tokens, nbytes, n_seq = {}, {}, 0
    exact = []
    for comp in mixture.parse(cfg):
        share = max(cfg.seq_len, (int(want * comp.slots / mixture.PERIOD) // cfg.seq_len) * cfg.seq_len)
        if cfg.eval_tokens is None:  # unset: at most what the component holds, as for one source
            share = min(share, len(_windows(comp.cfg)[2]) * cfg.seq_len)
        one = eval_set(dataclasses.replace(comp.cfg, eval_tokens=share))
        exact.append(one.bytes_exact)
        chunks += one.chunks
        groups += [comp.name] * len(one.chunks)
        h.update(f"{comp.name}:{one.sha256}\n".encode())
        tokens[comp.name], nbytes[comp.name] = one.n_tokens, one.n_bytes
        n_seq += one.n_sequences
    total_bytes = sum(nbytes.values()) if all(nbytes.values()) else None
    return EvalSet(chunks, h.hexdigest(), n_seq, sum(tokens.values()), total_bytes, tuple(groups), tokens, nbytes,
                   bytes_exact=all(exact) if total_bytes else None)


def eval_batches(cfg: DataConfig) -> list[dict[str, np.ndarray]]:
    """The held-out chunks of ``eval_set(cfg)`` (the same on every call and in every run with
    the same data settings)."""
    return eval_set(cfg).chunks


def pad_rows(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """``batch`` with zero rows appended up to a multiple of ``multiple`` rows and a
    ``weights`` float32[n, L] array (1 for real tokens, 0 for padding), so any mesh can score
    a chunk and padding never counts."""
    n = batch["inputs"].shape[0]
    extra = -n % multiple
    out = {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
    weights = np.ones(out["inputs"].shape, np.float32)
    weights[n:] = 0.0
    out["weights"] = weights
    return out
