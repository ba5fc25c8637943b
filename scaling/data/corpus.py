"""Corpora as flat token streams: load any ``DataConfig.source`` into memory once per process.

A ``Corpus`` holds the training and held-out token streams (documents tokenised and joined,
each followed by the separator token) plus what the trainer records about them. Sources:

- ``stdlib``     the interpreter's standard-library sources (tfds ``scaling_stdlib``, built once)
- ``local_text`` a directory of text files (tfds ``scaling_local_text``, built once per content)
- ``tfds``       any prepared tfds dataset in array_record format with a text feature
- ``synthetic``  a seeded Markov/Zipf chain with an exact entropy rate

Streams are held in memory (1 byte per token at byte level): a 12 MB corpus costs 12 MB.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Optional

import numpy as np

from scaling.config import ConfigError, DataConfig
from scaling.data import tokenize

SYNTHETIC_CHAIN_LEN = 4096  # tokens per independent chain (windows never cross chains)
SYNTHETIC_SEED = 0  # fixes the chain's transition rows: the synthetic "dataset" is the config


@dataclass(frozen=True, eq=False)
class Corpus:
    """Token streams of one dataset. ``chain_len`` is set when a stream is a concatenation of
    independent fixed-length segments that training windows must not cross (synthetic)."""

    name: str
    train: np.ndarray  # uint[n_train_tokens]
    eval: np.ndarray  # uint[n_eval_tokens]
    vocab_size: int
    n_documents: int
    chain_len: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @cached_property
    def sha256(self) -> str:
        """Content hash of the train and eval token streams (hex)."""
        h = hashlib.sha256()
        for part in (self.train, self.eval):
            h.update(f"{part.dtype.str}:{part.size}\n".encode())
            h.update(np.ascontiguousarray(part).data)
        return h.hexdigest()

    @cached_property
    def unigram_entropy_nats(self) -> float:
        return unigram_entropy_nats(self.train, self.vocab_size)


def unigram_entropy_nats(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best context-free model."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load(cfg: DataConfig) -> Corpus:
    """The corpus ``cfg`` names (built on first use, then cached on disk and in this process)."""
    from scaling.data import builders

    if cfg.source == "synthetic":
        chain_len = max(SYNTHETIC_CHAIN_LEN, cfg.seq_len + 1)
        return _synthetic(cfg.synthetic_vocab, cfg.synthetic_zipf, cfg.synthetic_tokens, chain_len)
    if cfg.source == "tfds":
        return _tfds(cfg.tfds_name, cfg.path, cfg.text_feature, str(builders.cache_dir()))
    return _local(cfg.source, cfg.path, str(builders.cache_dir()))


@lru_cache(maxsize=4)
def _local(source: str, path: Optional[str], cache_dir: str) -> Corpus:
    from scaling.data import builders

    if source == "stdlib":
        builder = builders.stdlib_builder()
        name = "stdlib-py{}.{}.{}".format(*sys.version_info[:3])
    else:
        builder = builders.local_text_builder(path)
        name = f"local_text:{path}"
    # Sort by path so the stream does not depend on the record order tfds chose when writing.
    splits = {}
    for split in ("train", "validation"):
        splits[split] = [t for _, t in sorted(builders.read_records(builder, split, ("path", "text")))]
    return _from_documents(name, splits["train"], splits["validation"])


@lru_cache(maxsize=4)
def _tfds(name: str, data_dir: Optional[str], feature: str, _cache_dir: str) -> Corpus:
    import tensorflow_datasets as tfds

    from scaling.data import builders

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several kinds (DatasetNotFoundError, registry errors)
        raise ConfigError(f"data.tfds_name: cannot find dataset {name!r} in data.path={data_dir!r} ({type(e).__name__})") from None
    if not builder.is_prepared():
        raise ConfigError(
            f"data.tfds_name: {name!r} is not prepared under data.path={data_dir!r}; prepare it there "
            "with file_format='array_record' (see docs/data.md)"
        )
    info = builder.info
    if feature not in info.features:
        raise ConfigError(f"data.text_feature: {name!r} has no feature {feature!r}; it has {', '.join(info.features)}")
    splits = list(info.splits)
    if "train" not in splits:
        raise ConfigError(f"data.tfds_name: {name!r} has no 'train' split (splits: {', '.join(splits)})")
    try:
        train = builders.read_split(builder, "train", feature)
        held = next((s for s in ("validation", "test") if s in splits), None)
        if held is not None:
            eval_ = builders.read_split(builder, held, feature)
        else:  # no held-out split shipped: apply our fixed hash-ranked rule to the training records
            parts = builders.split_documents([(str(i), t) for i, t in enumerate(train)])
            train, eval_ = [t for _, t in parts["train"]], [t for _, t in parts["validation"]]
    except ConfigError:
        raise
    except (NotImplementedError, ValueError):  # tfds: no random-access (array_record) files
        raise ConfigError(
            f"data.tfds_name: {name!r} must be prepared with file_format='array_record' for random access"
        ) from None
    return _from_documents(f"tfds:{name}", train, eval_)


def _from_documents(name: str, train_docs: list[bytes], eval_docs: list[bytes]) -> Corpus:
    tok = tokenize.get_tokenizer("bytes")
    train = tokenize.encode_documents(train_docs, tok)
    eval_ = tokenize.encode_documents(eval_docs, tok)
    return Corpus(name, train, eval_, tok.vocab_size, len(train_docs) + len(eval_docs))


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


def corpus_info(cfg: DataConfig) -> dict:
    """What a run records about its data.

    Keys: ``name``, ``source``, ``sha256`` (content hash of the train and eval token streams),
    ``n_train_tokens``, ``n_eval_tokens``, ``n_documents``, ``vocab_size``,
    ``unigram_entropy_nats`` (of the training tokens), ``windows_per_epoch`` (training sequences
    of ``seq_len + 1`` tokens), ``steps_per_epoch`` (windows / batch_size, a float), ``tokenizer``,
    ``tokenizer_sha256`` (``tokenize.fingerprint``);
    for synthetic also ``entropy_rate_nats`` (exact) and ``stationary_entropy_nats``.
    """
    c = load(cfg)
    n_windows = len(window_starts(c.train.size, cfg.seq_len, c.chain_len))
    info = {
        "name": c.name,
        "source": cfg.source,
        "sha256": c.sha256,
        "n_train_tokens": int(c.train.size),
        "n_eval_tokens": int(c.eval.size),
        "n_documents": c.n_documents,
        "vocab_size": c.vocab_size,
        "tokenizer": "bytes" if cfg.source != "synthetic" else "identity",
        "tokenizer_sha256": (tokenize.fingerprint(tokenize.get_tokenizer("bytes")) if cfg.source != "synthetic"
                             else hashlib.sha256(f"identity:{c.vocab_size}".encode()).hexdigest()),
        "unigram_entropy_nats": c.unigram_entropy_nats,
        "windows_per_epoch": n_windows,
        "steps_per_epoch": n_windows / cfg.batch_size,
    }
    info.update(c.extra)
    return info
