"""Corpora as token streams: load any ``DataConfig.source`` once per process.

A ``Corpus`` holds the training and held-out token streams (documents tokenised with
``data.tokenizer`` and joined, each followed by the separator token) plus what the trainer
records about them. Text sources (``scaling.data.sources``: stdlib, packages, local_text, hf,
tfds) are tokenised into memory; ``shards`` (``scaling data prepare``) are read from disk on
demand (``shards.TokenStream``) and never held whole; ``synthetic`` is a seeded Markov/Zipf chain
with an exact entropy rate.

In memory a stream costs its token count times 1 (bytes), 2 (vocabulary <= 65536) or 4 bytes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np

from scaling.config import DataConfig
from scaling.data import tokenize

SYNTHETIC_CHAIN_LEN = 4096  # tokens per independent chain (windows never cross chains)
SYNTHETIC_SEED = 0  # fixes the chain's transition rows: the synthetic "dataset" is the config


@dataclass(frozen=True, eq=False)
class Corpus:
    """Token streams of one dataset. ``train`` / ``eval`` are arrays or ``shards.TokenStream``s
    (read them with ``read_windows``). ``chain_len`` is set when a stream is a concatenation of
    independent fixed-length segments that training windows must not cross (synthetic).
    ``n_*_bytes`` count the UTF-8 text bytes (each separator as one byte), ``token_bytes`` the
    bytes each id stands for (None where a tokenizer's ids do not map to whole bytes); both are
    None for synthetic, which has no text."""

    name: str
    train: Any  # uint[n_train_tokens] or TokenStream
    eval: Any  # uint[n_eval_tokens] or TokenStream
    vocab_size: int
    n_documents: int
    chain_len: Optional[int] = None
    extra: dict = field(default_factory=dict)
    tokenizer: str = "identity"
    tokenizer_sha256: Optional[str] = None
    n_train_bytes: Optional[int] = None
    n_eval_bytes: Optional[int] = None
    text_sha256: Optional[str] = None
    token_bytes: Optional[np.ndarray] = None
    known_sha256: Optional[str] = None  # shards: the manifest's content hash (not recomputed)
    token_counts: Optional[np.ndarray] = None  # shards: the training histogram from the manifest

    @cached_property
    def sha256(self) -> str:
        """Content hash of the train and eval token streams (hex; ``shards.content_sha256``)."""
        from scaling.data.shards import content_sha256

        return self.known_sha256 or content_sha256([self.train, self.eval])

    @cached_property
    def unigram_entropy_nats(self) -> float:
        if self.token_counts is not None:
            return _entropy(np.asarray(self.token_counts, np.float64))
        return unigram_entropy_nats(self.train, self.vocab_size)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_entropy_nats(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best context-free model."""
    counts = np.zeros(vocab_size, np.float64)
    for s in range(0, tokens.size, 1 << 22):  # bincount widens to int64: chunks keep that temporary small
        counts += np.bincount(tokens[s:s + (1 << 22)], minlength=vocab_size)[:vocab_size]
    return _entropy(counts)


def read_windows(stream, starts: np.ndarray, length: int) -> np.ndarray:
    """Windows ``stream[s : s + length]`` for each start: ``uint[len(starts), length]``."""
    if isinstance(stream, np.ndarray):
        return stream[np.asarray(starts, np.int64)[:, None] + np.arange(length, dtype=np.int64)]
    return stream.read(starts, length)


class TextCount:
    """Counts text bytes per split and hashes the documents themselves, so runs with different
    tokenizers can be checked for reading the same text (``text_sha256``)."""

    def __init__(self):
        self._h = hashlib.sha256()
        self.n_bytes: dict[str, int] = {}
        self.n_docs: dict[str, int] = {}

    def counted(self, split: str, docs, measure=len):
        """``docs`` passed through, hashed (raw bytes) and counted: ``measure(doc)`` text bytes
        each (the tokenizer's ``text_bytes``) plus one for its separator."""
        self._h.update(f"split:{split}\n".encode())
        self.n_bytes[split] = self.n_docs[split] = 0
        for d in docs:
            b = d if isinstance(d, bytes) else d.encode("utf-8")
            self._h.update(f"{len(b)}:".encode())
            self._h.update(b)
            self.n_bytes[split] += measure(b) + 1  # the separator stands for one byte, as at byte level
            self.n_docs[split] += 1
            yield d

    def hexdigest(self) -> str:
        return self._h.hexdigest()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load(cfg: DataConfig) -> Corpus:
    """The corpus ``cfg`` names (text sources built on first use, then cached on disk and in
    this process; shards opened, not read)."""
    from scaling.data import builders

    if cfg.source == "synthetic":
        chain_len = max(SYNTHETIC_CHAIN_LEN, cfg.seq_len + 1)
        return _synthetic(cfg.synthetic_vocab, cfg.synthetic_zipf, cfg.synthetic_tokens, chain_len)
    if cfg.source == "shards":
        m = Path(cfg.path).expanduser().resolve() / "manifest.json"
        return _shards(str(m.parent), m.stat().st_mtime_ns if m.exists() else 0)
    tok = tokenize.get_tokenizer(cfg.tokenizer)
    # only the fields that choose the text and its tokens key the cache (not shapes or seeds)
    only_source = DataConfig(source=cfg.source, path=cfg.path, tfds_name=cfg.tfds_name, text_feature=cfg.text_feature,
                             include=tuple(cfg.include), exclude=tuple(cfg.exclude), packages=tuple(cfg.packages),
                             tokenizer=cfg.tokenizer, tasks=tuple(cfg.tasks), task_examples=cfg.task_examples)
    return _text(only_source, tokenize.fingerprint(tok), str(builders.cache_dir()))


@lru_cache(maxsize=4)
def _text(cfg: DataConfig, _tok_sha: str, _cache_dir: str) -> Corpus:
    from scaling.data import sources

    docs = sources.documents(cfg)
    tok = tokenize.get_tokenizer(cfg.tokenizer)
    text = TextCount()
    train = tokenize.encode_documents(text.counted("train", docs.train(), tok.text_bytes), tok)
    eval_ = tokenize.encode_documents(text.counted("validation", docs.validation(), tok.text_bytes), tok)
    return Corpus(docs.name, train, eval_, tok.vocab_size, sum(text.n_docs.values()), extra=dict(docs.extra),
                  tokenizer=tok.name, tokenizer_sha256=tokenize.fingerprint(tok), n_train_bytes=text.n_bytes["train"],
                  n_eval_bytes=text.n_bytes["validation"], text_sha256=text.hexdigest(), token_bytes=tok.token_bytes())


@lru_cache(maxsize=4)
def _shards(path: str, _mtime: int) -> Corpus:
    from scaling.data import shards

    m = shards.read_manifest(path)
    s = shards.streams(path, m)
    tok = shards.tokenizer_of(path, m)
    sp = m["splits"]
    return Corpus(m["name"], s["train"], s["validation"], int(m["tokenizer"]["vocab_size"]),
                  sp["train"]["documents"] + sp["validation"]["documents"], extra={"shards": path, **m.get("extra", {})},
                  tokenizer=m["tokenizer"]["spec"], tokenizer_sha256=m["tokenizer"]["sha256"],
                  n_train_bytes=sp["train"]["bytes"], n_eval_bytes=sp["validation"]["bytes"],
                  text_sha256=m["text_sha256"], token_bytes=tok.token_bytes(), known_sha256=m["content_sha256"],
                  token_counts=np.asarray(sp["train"]["token_counts"], np.int64))


@lru_cache(maxsize=4)
def _synthetic(vocab: int, zipf: float, n_tokens: int, chain_len: int) -> Corpus:
    from scaling.data.synthetic import MarkovZipf

    chain = MarkovZipf(vocab, zipf, SYNTHETIC_SEED)
    n_train = max(1, n_tokens // chain_len)
    n_eval = max(1, math.ceil(n_train / 100))
    dtype = tokenize.token_dtype(vocab)
    # Train and eval chains come from separate generator streams: disjoint by construction.
    train = chain.sample(n_train, chain_len, np.random.default_rng([SYNTHETIC_SEED, 1]), dtype).ravel()
    eval_ = chain.sample(n_eval, chain_len, np.random.default_rng([SYNTHETIC_SEED, 2]), dtype).ravel()
    return Corpus(
        f"synthetic-markov-v{vocab}-zipf{zipf:g}",
        train,
        eval_,
        vocab,
        n_train + n_eval,
        chain_len=chain_len,
        extra={
            "entropy_rate_nats": chain.entropy_rate_nats,
            "stationary_entropy_nats": chain.unigram_entropy_nats,
        },
    )


# --------------------------------------------------------------------------------------------
# Windows and info
# --------------------------------------------------------------------------------------------


def window_starts(n_tokens: int, seq_len: int, chain_len: Optional[int] = None) -> np.ndarray:
    """Start offsets (int64) of the non-overlapping training windows of ``seq_len + 1`` tokens.

    Consecutive windows share one token (the last target of one is the first input of the
    next), so each token is a target exactly once per epoch. With ``chain_len`` the stream is
    cut into segments of that length and no window crosses a segment boundary.
    """
    if chain_len is None:
        return np.arange(max(0, (n_tokens - 1) // seq_len), dtype=np.int64) * seq_len
    per_chain = (chain_len - 1) // seq_len
    chains = n_tokens // chain_len
    return (np.arange(chains, dtype=np.int64)[:, None] * chain_len + np.arange(per_chain) * seq_len).ravel()


def training_windows(cfg: DataConfig, c: Corpus) -> np.ndarray:
    """Start offsets of the windows a run trains on: every window of the training split, or with
    ``data.unique_tokens`` the ``unique_tokens // seq_len`` of them spread evenly over the split
    (so a data-constrained run sees the split's mixture of documents, not its first files).
    Raises ``ConfigError`` when the cap exceeds the split."""
    from scaling.errors import ConfigError

    starts = window_starts(c.train.size, cfg.seq_len, c.chain_len)
    if cfg.unique_tokens is None:
        return starts
    n_keep = cfg.unique_tokens // cfg.seq_len
    if n_keep > len(starts):
        raise ConfigError(f"data.unique_tokens: {cfg.unique_tokens} is more than the {len(starts) * cfg.seq_len} "
                          f"training tokens of corpus {c.name} at seq_len {cfg.seq_len}; lower it or leave it unset")
    return starts[(np.arange(n_keep, dtype=np.int64) * len(starts)) // n_keep]


def tokenizer_for(cfg: DataConfig):
    """The tokenizer that reads and writes ``cfg``'s tokens (shards: their own copy)."""
    if cfg.source == "shards":
        from scaling.data import shards

        return shards.tokenizer_of(cfg.path, shards.read_manifest(cfg.path))
    if cfg.source == "synthetic":
        return None
    if cfg.source == "mixture":  # one tokenizer for all (checked by corpus_info)
        from scaling.data import mixture

        return tokenizer_for(mixture.parse(cfg)[0].cfg)
    return tokenize.get_tokenizer(cfg.tokenizer)


def corpus_info(cfg: DataConfig) -> dict:
    """What a run records about its data.

    Keys: ``name``, ``source``, ``sha256`` (content hash of the train and eval token streams),
    ``text_sha256`` (of the documents' text, tokenizer-independent), ``n_train_tokens`` (the
    training split), ``unique_tokens`` (one epoch: the split, or ``data.unique_tokens`` rounded
    down to whole windows), ``n_eval_tokens``, ``n_train_bytes`` / ``n_eval_bytes`` (UTF-8
    text bytes, separators as one), ``train_bytes_per_token``, ``n_documents``, ``vocab_size``,
    ``unigram_entropy_nats`` (of the training tokens), ``windows_per_epoch`` (training sequences
    of ``seq_len + 1`` tokens), ``steps_per_epoch`` (windows / batch_size, a float),
    ``tokenizer`` (the ``data.tokenizer`` spec), ``tokenizer_sha256`` (``tokenize.fingerprint``);
    for synthetic also ``entropy_rate_nats`` (exact) and ``stationary_entropy_nats``; for shards
    ``shards`` (the directory).
    """
    if cfg.source == "mixture":
        from scaling.data import mixture

        comps = mixture.parse(cfg)
        return mixture.combined_info(cfg, comps, [corpus_info(c.cfg) for c in comps])
    c = load(cfg)
    n_windows = len(training_windows(cfg, c))
    synthetic = cfg.source == "synthetic"
    info = {
        "name": c.name,
        "source": cfg.source,
        "sha256": c.sha256,
        "text_sha256": c.text_sha256,
        "n_train_tokens": int(c.train.size),
        "unique_tokens": int(c.train.size) if cfg.unique_tokens is None else n_windows * cfg.seq_len,
        "n_eval_tokens": int(c.eval.size),
        "n_train_bytes": c.n_train_bytes,
        "n_eval_bytes": c.n_eval_bytes,
        "train_bytes_per_token": (c.n_train_bytes / c.train.size) if c.n_train_bytes and c.train.size else None,
        "n_documents": c.n_documents,
        "vocab_size": c.vocab_size,
        "tokenizer": "identity" if synthetic else c.tokenizer,
        "tokenizer_sha256": (hashlib.sha256(f"identity:{c.vocab_size}".encode()).hexdigest() if synthetic
                             else c.tokenizer_sha256),
        "unigram_entropy_nats": c.unigram_entropy_nats,
        "windows_per_epoch": n_windows,
        "steps_per_epoch": n_windows / cfg.batch_size,
    }
    info.update({k: v for k, v in c.extra.items() if k != "distributions"})
    return info
