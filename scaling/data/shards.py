"""Pre-tokenized shards: tokenize a source once, then train from disk without holding it in RAM.

``prepare(cfg, out)`` (``scaling data prepare``) streams the documents of ``cfg`` through the
tokenizer ``cfg.tokenizer`` and writes, per split (``train``, ``validation``)::

    DIR/train-00000.tokens ...   raw little-endian token ids (uint8/16/32: tokenize.token_dtype),
                                 the packed stream of corpus.load: each document then the separator
    DIR/train.index.npy          int64 end offset (exclusive) of every document in that stream
    DIR/manifest.json            source, tokenizer (spec, sha256, vocabulary, separator), per split:
                                 files with token counts and sha256, documents, text bytes, token
                                 histogram; the content hash (the same number corpus.load reports
                                 for that source in memory), the text hash, the file list with hashes

A shard ends at a document boundary once it holds ``SHARD_TOKENS`` tokens. The directory is
written beside its final place and renamed into it, so a crash never leaves a half manifest, and
an existing directory is never overwritten.

``open_corpus(path)`` reads one back for ``data.source=shards``: ``TokenStream`` serves windows
with ``os.pread`` (random access, only the rows asked for, no memory map growing the resident
set), so a host reads its own rows and never the whole corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from scaling.config import ConfigError, DataConfig

FORMAT = "scaling-shards-v1"
SHARD_TOKENS = 1 << 27  # tokens per shard file (256 MiB at uint16) before the next document starts a new one
SPLITS = ("train", "validation")


class TokenStream:
    """A split's token stream over its shard files, read by ``pread``. ``size`` tokens of
    ``dtype``; picklable (file handles are reopened in each process)."""

    def __init__(self, files: list[Path], counts: list[int], dtype: np.dtype):
        self.files, self.counts, self.dtype = [Path(f) for f in files], [int(c) for c in counts], np.dtype(dtype)
        self.bounds = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.size = int(self.bounds[-1])
        self._fds: dict[int, int] = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fds"}

    def __setstate__(self, state):
        self.__dict__.update(state, _fds={})

    def _fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is None:
            fd = self._fds[i] = os.open(self.files[i], os.O_RDONLY)
        return fd

    def _read(self, start: int, n: int, out: np.ndarray) -> None:
        item = self.dtype.itemsize
        pos = 0
        while pos < n:
            i = int(np.searchsorted(self.bounds, start + pos, side="right") - 1)
            off = start + pos - int(self.bounds[i])
            take = min(n - pos, self.counts[i] - off)
            buf = os.pread(self._fd(i), take * item, off * item)
            if len(buf) != take * item:
                raise ConfigError(f"data.path: shard {self.files[i]} is shorter than its manifest says; prepare it again")
            out[pos:pos + take] = np.frombuffer(buf, self.dtype)
            pos += take

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Windows ``[s, s + length)`` for each start: ``dtype[len(starts), length]``."""
        out = np.empty((len(starts), length), self.dtype)
        for r, s in enumerate(np.asarray(starts, np.int64)):
            self._read(int(s), length, out[r])
        return out

    def chunks(self, n: int = 1 << 24):
        """The whole stream in pieces of at most ``n`` tokens (for hashing, in order)."""
        for s in range(0, self.size, n):
            out = np.empty(min(n, self.size - s), self.dtype)
            self._read(s, out.size, out)
            yield out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def content_sha256(parts) -> str:
    """The corpus content hash over (dtype, size, raw ids) of each part, train then eval:
    ``parts`` are arrays or ``TokenStream``s (the same hash for the same tokens either way)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(f"{part.dtype.str}:{part.size}\n".encode())
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).data)
        else:
            for c in part.chunks():
                h.update(c.data)
    return h.hexdigest()


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (bytes; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _SplitWriter:
    def __init__(self, directory: Path, split: str, dtype: np.dtype, vocab_size: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.files: list[dict] = []
        self.ends: list[int] = []
        self.n_tokens = 0
        self.counts = np.zeros(vocab_size, np.int64)
        self._f = None
        self._h = None
        self._in_file = 0

    def _open(self):
        name = f"{self.split}-{len(self.files):05d}.tokens"
        self._f = open(self.directory / name, "wb")
        self._h = hashlib.sha256()
        self._in_file = 0
        self.files.append({"name": name, "tokens": 0, "sha256": None})

    def _close(self):
        if self._f is not None:
            self._f.close()
            self.files[-1].update(tokens=self._in_file, sha256=self._h.hexdigest())
            self._f = None

    def add(self, doc_tokens: np.ndarray) -> None:
        if self._f is None or self._in_file >= SHARD_TOKENS:
            self._close()
            self._open()
        a = np.ascontiguousarray(doc_tokens, self.dtype)
        self._f.write(a.data)
        self._h.update(a.data)
        self._in_file += a.size
        self.n_tokens += a.size
        self.ends.append(self.n_tokens)
        self.counts += np.bincount(a, minlength=self.counts.size)[: self.counts.size]

    def finish(self) -> dict:
        if self._f is None and not self.files:
            self._open()  # an empty split still has one (empty) file
        self._close()
        np.save(self.directory / f"{self.split}.index.npy", np.asarray(self.ends, np.int64))
        return {"files": self.files, "tokens": self.n_tokens, "documents": len(self.ends),
                "index": f"{self.split}.index.npy"}


def source_description(cfg: DataConfig) -> dict:
    """The data fields that say where the text came from (recorded in the manifest)."""
    keys = {"stdlib": (), "packages": ("packages",), "local_text": ("path", "include", "exclude"),
            "hf": ("path", "text_feature"), "tfds": ("tfds_name", "path", "text_feature")}[cfg.source]
    return {"source": cfg.source, **{k: (list(v) if isinstance(v, tuple) else v) for k in keys for v in [getattr(cfg, k)]}}


def prepare(cfg: DataConfig, out: Path, log=print) -> dict:
    """Tokenize ``cfg``'s source with ``cfg.tokenizer`` into shards under ``out`` (which must not
    exist yet). Returns the manifest, which adds ``seconds`` and ``peak_rss_bytes``."""
    from scaling.data import corpus as corpus_lib
    from scaling.data import sources, tokenize

    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out: {out} already exists; name a new directory (prepared shards are never overwritten)")
    t0 = time.perf_counter()
    docs = sources.documents(cfg)
    tok = tokenize.get_tokenizer(cfg.tokenizer)
    dtype = tokenize.token_dtype(tok.vocab_size)
    tmp = out.parent / f".{out.name}.incomplete-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        text = corpus_lib.TextCount()
        splits = {}
        for split, stream in (("train", docs.train), ("validation", docs.validation)):
            w = _SplitWriter(tmp, split, dtype, tok.vocab_size)
            for arr in tokenize.encode_stream(text.counted(split, stream(), tok.text_bytes), tok):
                w.add(arr)
            splits[split] = {**w.finish(), "bytes": text.n_bytes[split]}
            if split == "train":
                splits[split]["token_counts"] = w.counts.tolist()
            log(f"{split}: {splits[split]['documents']:,} documents, {w.n_tokens:,} tokens, "
                f"{text.n_bytes[split]:,} bytes")
        streams = [TokenStream([tmp / f["name"] for f in splits[s]["files"]], [f["tokens"] for f in splits[s]["files"]], dtype)
                   for s in SPLITS]
        manifest = {
            "format": FORMAT, "name": docs.name, "source": source_description(cfg),
            "tokenizer": {"spec": tok.name, "sha256": tokenize.fingerprint(tok), "vocab_size": tok.vocab_size,
                          "separator": tok.separator},
            "dtype": dtype.str, "splits": splits, "content_sha256": content_sha256(streams),
            "text_sha256": text.hexdigest(), "files": docs.files, "extra": docs.extra,
        }
        for s in streams:
            s.close()
        if tok.name != "bytes":  # the tokenizer travels with its shards (bpb and sampling need it)
            src = Path(getattr(tok, "file"))
            shutil.copyfile(src, tmp / src.name)
            manifest["tokenizer"]["file"] = src.name
        manifest["seconds"] = time.perf_counter() - t0
        manifest["peak_rss_bytes"] = peak_rss_bytes()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> dict:
    """The manifest of a shard directory; ConfigError naming ``data.path`` when it is missing,
    unreadable or of another format, or a shard file it lists is missing."""
    root = Path(path).expanduser()
    f = root / "manifest.json"
    if not f.is_file():
        raise ConfigError(f"data.path: {path!r} has no manifest.json; write shards with `scaling data prepare`")
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.path: {f} is unreadable ({e}); prepare the shards again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ConfigError(f"data.path: {f} is not a {FORMAT} manifest")
    try:
        for key in ("name", "dtype", "content_sha256", "text_sha256"):
            m[key]
        np.dtype(m["dtype"])
        m["tokenizer"]["spec"], m["tokenizer"]["sha256"], m["tokenizer"]["vocab_size"]
        for s in SPLITS:
            sp = m["splits"][s]
            sp["tokens"], sp["documents"], sp["bytes"], [(x["name"], x["tokens"]) for x in sp["files"]]
        m["splits"]["train"]["token_counts"]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"data.path: {f} is incomplete ({type(e).__name__}: {e}); prepare the shards again") from None
    for s in SPLITS:
        for sh in m["splits"][s]["files"]:
            p = root / sh["name"]
            if not p.is_file():
                raise ConfigError(f"data.path: shard file {p} is missing; prepare the shards again")
            if p.stat().st_size != sh["tokens"] * np.dtype(m["dtype"]).itemsize:
                raise ConfigError(f"data.path: shard file {p} has {p.stat().st_size} bytes, not the "
                                  f"{sh['tokens']} tokens its manifest lists; prepare the shards again")
    return m


def streams(path: str | Path, manifest: Optional[dict] = None) -> dict[str, TokenStream]:
    """``{"train", "validation"}`` token streams of a shard directory."""
    root = Path(path).expanduser().resolve()
    m = manifest or read_manifest(path)
    return {s: TokenStream([root / f["name"] for f in m["splits"][s]["files"]],
                           [f["tokens"] for f in m["splits"][s]["files"]], np.dtype(m["dtype"])) for s in SPLITS}


def tokenizer_of(path: str | Path, manifest: dict):
    """The tokenizer a shard directory was written with (its own copy), checked against the
    manifest's hash."""
    from scaling.data import tokenize

    t = manifest["tokenizer"]
    if t["spec"] == "bytes":
        return tokenize.ByteTokenizer()
    kind, _ = tokenize.parse_spec(t["spec"])
    tok = tokenize.get_tokenizer(f"{kind}:{Path(path).expanduser().resolve() / t['file']}")
    if tokenize.fingerprint(tok) != t["sha256"]:
        raise ConfigError(f"data.path: the tokenizer copy in {path} does not match its manifest's sha256; "
                          "prepare the shards again")
    return tok
