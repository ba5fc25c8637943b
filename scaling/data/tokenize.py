"""Tokenizers: text bytes -> integer token ids.

The default is byte-level (vocabulary 256, no training, no download): every byte of the
UTF-8 text is one token, so "tokens" and "bytes" are the same count throughout the project.
Documents are joined with ``SEPARATOR`` (byte 0, which never occurs in source code or normal
text) so a model can tell where one document ends.

Extension point: a dataset that brings its own tokenizer (sentencepiece, tiktoken) adds a
class with the same three members (``name``, ``vocab_size``, ``encode``) and an entry in
``TOKENIZERS``; the loader only ever calls ``get_tokenizer(name)`` and ``encode``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

SEPARATOR = 0  # token id that ends every document in a packed stream


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: bytes | str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D integer array (dtype ``token_dtype(vocab_size)``)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, one token per byte."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, str):
            text = text.encode("utf-8")
        return np.frombuffer(text, dtype=np.uint8)

    def decode(self, ids: np.ndarray) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {"bytes": ByteTokenizer}


def get_tokenizer(name: str = "bytes") -> Tokenizer:
    """The tokenizer registered under ``name`` (only ``bytes`` ships today)."""
    from scaling.errors import ConfigError

    if name not in TOKENIZERS:
        raise ConfigError(f"data.tokenizer: unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


def fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 (hex) that changes whenever the tokenizer's mapping could: of its
    ``fingerprint_bytes()`` (a trained tokenizer's model file) when it has one, else of its
    name and vocabulary size (the built-in, parameter-free tokenizers)."""
    import hashlib

    data = getattr(tokenizer, "fingerprint_bytes", None)
    blob = data() if callable(data) else f"{tokenizer.name}:{tokenizer.vocab_size}".encode()
    return hashlib.sha256(blob).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids < vocab_size (token streams are kept in memory)."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def encode_documents(docs, tokenizer: Tokenizer) -> np.ndarray:
    """Concatenate documents into one token stream, each followed by ``SEPARATOR``.

    docs: iterable of bytes/str. Returns a 1-D array of ``sum(len(doc) + 1)`` tokens (for bytes).
    """
    dtype = token_dtype(tokenizer.vocab_size)
    sep = np.array([SEPARATOR], dtype=dtype)
    parts = []
    for doc in docs:
        parts.append(tokenizer.encode(doc).astype(dtype, copy=False))
        parts.append(sep)
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts)
