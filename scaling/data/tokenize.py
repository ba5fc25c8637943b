"""Tokenizers: text bytes -> integer token ids, and how many text bytes each id stands for.

``data.tokenizer`` names one:

- ``bytes`` (the default): every byte of the UTF-8 text is one token, vocabulary 256, nothing
  to train or download; "tokens" and "bytes" are the same count.
- ``bpe:PATH``: a byte-level BPE trained by ``scaling data tokenizer train`` (``PATH`` is its
  directory or its ``tokenizer.json``), loaded with Hugging Face ``tokenizers``.
- ``hf:PATH``: any Hugging Face ``tokenizer.json`` on disk (or a directory holding one).
- ``sentencepiece:PATH``: a sentencepiece ``.model`` file.

Nothing is ever downloaded. Documents are joined with the tokenizer's separator (byte 0 for
``bytes``, which never occurs in source code or normal text; ``<|sep|>`` for our BPE; the
end-of-text token of an imported one), so a model can tell where one document ends.

``token_bytes()`` gives, per id, the number of UTF-8 text bytes it stands for (the separator
counts as the one byte it is at byte level) where that is exact (bytes, byte-level BPE), so a
loss in nats per token converts to bits per byte, a number runs with different tokenizers share
(``bits_per_byte``); other tokenizers return None and the held-out set uses its split's mean.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from scaling.errors import ConfigError

SEPARATOR = 0  # the byte tokenizer's document separator (byte 0)
BPE_SEPARATOR = "<|sep|>"  # the special token our trained BPE reserves as id 0
# end-of-document tokens of common imported tokenizers, tried in this order
_EOS_NAMES = ("<|sep|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
KINDS = ("bytes", "bpe", "hf", "sentencepiece")
BPE_META = "scaling_tokenizer.json"  # written beside tokenizer.json by train_bpe


class Tokenizer(Protocol):
    name: str  # the data.tokenizer spec it was loaded from
    vocab_size: int
    separator: int  # id that ends every document in a packed stream

    def encode(self, text: bytes | str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D integer array."""

    def encode_batch(self, texts: list) -> list[np.ndarray]:
        """``encode`` of each text (a tokenizer may do this in parallel)."""

    def decode(self, ids) -> str:
        """The text of ``ids``."""

    def token_bytes(self) -> np.ndarray | None:
        """int64[vocab_size]: UTF-8 bytes each id stands for (separator = 1, other specials 0),
        or None when ids do not map to whole bytes exactly (then bits per byte use the split's
        mean bytes per token)."""

    def text_bytes(self, doc: bytes) -> int:
        """UTF-8 bytes of ``doc`` as this tokenizer reads it (a subword tokenizer reads invalid
        UTF-8 as U+FFFD, 3 bytes each)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, one token per byte."""

    name = "bytes"
    vocab_size = 256
    separator = SEPARATOR

    def encode(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, str):
            text = text.encode("utf-8")
        return np.frombuffer(text, dtype=np.uint8)

    def encode_batch(self, texts: list) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, np.int64)

    def text_bytes(self, doc: bytes | str) -> int:
        return len(doc) if isinstance(doc, bytes) else len(doc.encode("utf-8"))


def _text(t: bytes | str) -> str:
    # the subword tokenizers take str; a non-UTF-8 byte becomes U+FFFD (3 bytes) and is counted so
    return t if isinstance(t, str) else t.decode("utf-8", errors="replace")


def _text_bytes(t: bytes | str) -> int:
    return len(_text(t).encode("utf-8"))


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` model from a ``tokenizer.json`` (our BPE or an imported one)."""

    def __init__(self, spec: str, file: Path):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:  # pragma: no cover - a core dependency
            raise ConfigError("data.tokenizer: the 'tokenizers' package is not installed; pip install tokenizers") from None
        self.name, self.file = spec, file
        try:
            self._tok = _Tok.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ConfigError(f"data.tokenizer: {file} is not a readable tokenizer.json ({e})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        sep = next((vocab[n] for n in _EOS_NAMES if n in vocab), None)
        if sep is None:
            raise ConfigError(f"data.tokenizer: {file} has no end-of-document token (one of {', '.join(_EOS_NAMES)}); "
                              "add one as a special token")
        self.separator = int(sep)
        # text that spells a special token ("<|sep|>" in a tokenizer's own source) is text, not a
        # document boundary
        self._tok.encode_special_tokens = True
        self._byte_level = _is_byte_level(json.loads(file.read_text()))

    def fingerprint_bytes(self) -> bytes:
        return self.file.read_bytes()

    text_bytes = staticmethod(_text_bytes)

    def encode(self, text: bytes | str) -> np.ndarray:
        return np.asarray(self._tok.encode(_text(text), add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list) -> list[np.ndarray]:
        encs = self._tok.encode_batch([_text(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray | None:
        """Exact for byte-level tokenizers (each piece character is one byte of GPT-2's
        alphabet); None for others (Metaspace, byte fallback, WordPiece), whose pieces do not
        say how many text bytes they cover."""
        if not self._byte_level:
            return None
        inv = _bytes_to_unicode()
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        out = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or piece in specials:
                continue
            if not all(ch in inv for ch in piece):
                return None  # a piece outside the byte alphabet: not byte-level after all
            out[i] = len(piece)
        out[self.separator] = 1
        return out


def _is_byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json's ids map to whole text bytes: a ByteLevel decoder (or a
    Sequence holding one), no normalizer that rewrites the text, no added prefix space."""
    def parts(x, key):
        x = x or {}
        return x.get(key, []) if x.get("type") == "Sequence" else [x]

    decs, pres = parts(spec.get("decoder"), "decoders"), parts(spec.get("pre_tokenizer"), "pretokenizers")
    # add_prefix_space puts a byte ("Ġ") before each document that its text does not hold
    prefix = any(p.get("type") in ("ByteLevel", "Metaspace") and p.get("add_prefix_space") for p in pres)
    return any(d.get("type") == "ByteLevel" for d in decs) and not spec.get("normalizer") and not prefix


class SentencePieceTokenizer:
    """A sentencepiece model file (bits per byte use the split's mean bytes per token)."""

    def __init__(self, spec: str, file: Path):
        try:
            import sentencepiece as spm
        except ImportError:
            raise ConfigError("data.tokenizer: sentencepiece:PATH needs the 'sentencepiece' package; "
                              "pip install sentencepiece") from None
        self.name, self.file = spec, file
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(file))
        except Exception as e:
            raise ConfigError(f"data.tokenizer: {file} is not a sentencepiece model ({e})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        if self._sp.eos_id() < 0:
            raise ConfigError(f"data.tokenizer: {file} has no end-of-sentence id; train it with eos_id >= 0")
        self.separator = int(self._sp.eos_id())

    def fingerprint_bytes(self) -> bytes:
        return self.file.read_bytes()

    def encode(self, text: bytes | str) -> np.ndarray:
        return np.asarray(self._sp.encode(_text(text)), dtype=np.int64)

    def encode_batch(self, texts: list) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self._sp.encode([_text(t) for t in texts])]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    text_bytes = staticmethod(_text_bytes)

    def token_bytes(self) -> None:
        """None: a sentencepiece normalizer (NFKC, whitespace folding) and its word-boundary
        mark mean pieces do not say how many text bytes they cover."""
        return None


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``(kind, path)`` of a ``data.tokenizer`` value; ConfigError naming the field otherwise."""
    if spec == "bytes":
        return "bytes", None
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS[1:] or not path:
        raise ConfigError(f"data.tokenizer: {spec!r} is not one of bytes | bpe:PATH | hf:PATH | sentencepiece:PATH")
    return kind, path


def _model_file(kind: str, path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / ("tokenizer.model" if kind == "sentencepiece" else "tokenizer.json")
    if not p.is_file():
        raise ConfigError(f"data.tokenizer: {kind}:{path}: no such file {p}; train one with "
                          "`scaling data tokenizer train --out DIR` or fix the path")
    return p.resolve()


def get_tokenizer(spec: str = "bytes") -> Tokenizer:
    """The tokenizer ``spec`` names (see the module docstring); loaded once per process and file
    content."""
    kind, path = parse_spec(spec)
    if kind == "bytes":
        return ByteTokenizer()
    f = _model_file(kind, path)
    return _load(kind, spec, str(f), f.stat().st_mtime_ns, f.stat().st_size)


@lru_cache(maxsize=8)
def _load(kind: str, spec: str, file: str, _mtime: int, _size: int) -> Tokenizer:
    if kind == "sentencepiece":
        return SentencePieceTokenizer(spec, Path(file))
    return HFTokenizer(spec, Path(file))


def fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 (hex) that changes whenever the tokenizer's mapping could: of its model file when
    it has one, else of its name and vocabulary size (the parameter-free byte tokenizer)."""
    data = getattr(tokenizer, "fingerprint_bytes", None)
    blob = data() if callable(data) else f"{tokenizer.name}:{tokenizer.vocab_size}".encode()
    return hashlib.sha256(blob).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids < vocab_size (uint8, uint16 or uint32)."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


ENCODE_BATCH = 256  # documents per encode_batch call (bounded memory, parallel inside tokenizers)


def encode_stream(docs: Iterable, tokenizer: Tokenizer) -> Iterable[np.ndarray]:
    """Per document, its tokens followed by the separator, as ``token_dtype`` arrays (streamed)."""
    dtype = token_dtype(tokenizer.vocab_size)
    batch: list = []

    def flush():
        for ids in tokenizer.encode_batch(batch):
            out = np.empty(ids.size + 1, dtype)
            out[:-1] = ids
            out[-1] = tokenizer.separator
            yield out
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= ENCODE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def encode_documents(docs, tokenizer: Tokenizer) -> np.ndarray:
    """Concatenate documents into one token stream, each followed by the separator.

    docs: iterable of bytes/str. Returns a 1-D ``token_dtype`` array (``sum(len(doc) + 1)``
    tokens at byte level).
    """
    parts = list(encode_stream(docs, tokenizer))
    if not parts:
        return np.zeros(0, dtype=token_dtype(tokenizer.vocab_size))
    return np.concatenate(parts)


def bits_per_byte(nats_per_token: float | None, bytes_per_token: float | None) -> float | None:
    """Loss in bits per UTF-8 byte of text: ``nats_per_token / (ln 2 * bytes_per_token)``."""
    if nats_per_token is None or not bytes_per_token or not math.isfinite(nats_per_token):
        return None
    return float(nats_per_token) / (math.log(2) * float(bytes_per_token))


# --------------------------------------------------------------------------------------------
# Training a BPE
# --------------------------------------------------------------------------------------------


def train_bpe(docs: Iterable[bytes], vocab_size: int, out: Path, source: dict) -> dict:
    """Train a byte-level BPE (Hugging Face ``tokenizers``) with ``vocab_size`` ids (id 0 is
    ``<|sep|>``) on ``docs`` and write ``out/tokenizer.json`` and ``out/scaling_tokenizer.json``
    (vocabulary, source, sha256 of tokenizer.json). Byte-level means every text round-trips
    exactly. Returns the metadata written."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 257 + 1:
        raise ConfigError(f"--vocab: must be an integer above 257 (256 bytes and the separator), got {vocab_size!r}")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_SEPARATOR], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    n_docs = n_bytes = 0

    def texts():
        nonlocal n_docs, n_bytes
        for d in docs:
            n_docs += 1
            n_bytes += len(d)
            yield _text(d)

    tok.train_from_iterator(texts(), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    tmp.replace(out / "tokenizer.json")
    meta = {"kind": "bpe", "vocab_size": tok.get_vocab_size(with_added_tokens=True), "separator": BPE_SEPARATOR,
            "trained_on": {**source, "documents": n_docs, "bytes": n_bytes},
            "sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()}
    (out / BPE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
