"""``scaling data ...``: train a tokenizer, write pre-tokenized shards, describe a corpus.

    scaling data tokenizer train --vocab 4096 --source stdlib --out tok/
    scaling data prepare packages --tokenizer bpe:tok/ --out shards/packages-bpe4k
    scaling data info --source shards --path shards/packages-bpe4k

A source is named as ``data.source`` is, with its fields as flags (``--path``, ``--include``,
...); bad input is one line naming the flag (exit 2).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SOURCES = ("stdlib", "packages", "local_text", "hf", "tfds")


def _source_flags(p) -> None:
    p.add_argument("--path", default=None, help="local_text: directory; hf: save_to_disk dir or parquet/jsonl/arrow "
                                                "files; tfds: data_dir")
    p.add_argument("--tfds-name", dest="tfds_name", default=None)
    p.add_argument("--text-feature", dest="text_feature", default="text", help="hf/tfds: the text column (default text)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB", help="local_text: keep matching files")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="local_text: drop matching files")
    p.add_argument("--packages", default="", metavar="A,B", help="packages: distributions (default: our dependencies)")


def _data_config(args, source: str, tokenizer: str = "bytes"):
    from scaling.config import DataConfig

    return DataConfig(source=source, path=args.path, tfds_name=args.tfds_name, text_feature=args.text_feature,
                      include=tuple(args.include), exclude=tuple(args.exclude),
                      packages=tuple(p for p in args.packages.split(",") if p), tokenizer=tokenizer)


def register(sub) -> None:
    p = sub.add_parser("data", help="tokenizers, pre-tokenized shards and corpus facts")
    kinds = p.add_subparsers(dest="data_command", metavar="ACTION")

    t = kinds.add_parser("tokenizer", help="train a tokenizer")
    tk = t.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tt = tk.add_parser("train", help="train a byte-level BPE (Hugging Face tokenizers) on a source's training split")
    tt.add_argument("--vocab", type=int, required=True, help="vocabulary size, the separator included (e.g. 4096)")
    tt.add_argument("--source", choices=SOURCES, default="stdlib")
    _source_flags(tt)
    tt.add_argument("--out", required=True, help="directory for tokenizer.json and scaling_tokenizer.json")
    tt.set_defaults(func=_train_tokenizer)

    pr = kinds.add_parser("prepare", help="tokenize a source once into shards (data.source=shards reads them)")
    pr.add_argument("source", choices=SOURCES)
    _source_flags(pr)
    pr.add_argument("--tokenizer", default="bytes", help="bytes | bpe:PATH | hf:PATH | sentencepiece:PATH")
    pr.add_argument("--out", required=True, help="new directory for the shards and their manifest")
    pr.set_defaults(func=_prepare)

    i = kinds.add_parser("info", help="a corpus's facts (tokens, bytes, hashes, epochs) as JSON")
    i.add_argument("--source", choices=SOURCES + ("shards", "synthetic"), default="stdlib")
    _source_flags(i)
    i.add_argument("--tokenizer", default="bytes")
    i.add_argument("--seq-len", dest="seq_len", type=int, default=128)
    i.set_defaults(func=_info)


def _train_tokenizer(args) -> int:
    from scaling.data import sources, tokenize
    from scaling.errors import ConfigError

    out = Path(args.out)
    if (out / "tokenizer.json").exists():
        raise ConfigError(f"--out: {out} already holds a tokenizer; name a new directory (tokenizers are never overwritten)")
    cfg = _data_config(args, args.source)
    docs = sources.documents(cfg)
    t0 = time.perf_counter()
    desc = {"source": args.source, **({"path": args.path} if args.path else {})}
    meta = tokenize.train_bpe(docs.train(), args.vocab, out, desc)
    tok = tokenize.get_tokenizer(f"bpe:{out}")
    print(f"wrote {out}/tokenizer.json: vocabulary {meta['vocab_size']}, trained on {meta['trained_on']['documents']:,} "
          f"documents ({meta['trained_on']['bytes']:,} bytes) in {time.perf_counter() - t0:.1f} s; "
          f"sha256 {tokenize.fingerprint(tok)[:16]}")
    print(f"use it with --set data.tokenizer=bpe:{out} --set model.vocab_size={meta['vocab_size']}")
    return 0


def _prepare(args) -> int:
    from scaling.data import shards

    cfg = _data_config(args, args.source, args.tokenizer)
    m = shards.prepare(cfg, Path(args.out), log=lambda s: print(s, file=sys.stderr))
    tr, va = m["splits"]["train"], m["splits"]["validation"]
    print(f"wrote {args.out}: {tr['tokens']:,} train + {va['tokens']:,} held-out tokens "
          f"({tr['bytes'] / max(tr['tokens'], 1):.3f} bytes/token) from {tr['documents'] + va['documents']:,} documents "
          f"in {m['seconds']:.1f} s, peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB; content sha256 {m['content_sha256'][:16]}")
    print(f"train from it with --set data.source=shards --set data.path={args.out} "
          f"--set model.vocab_size={m['tokenizer']['vocab_size']}")
    return 0


def _info(args) -> int:
    import dataclasses

    from scaling.config import DataConfig
    from scaling.data import corpus

    if args.source in ("shards", "synthetic"):
        cfg = DataConfig(source=args.source, path=args.path, seq_len=args.seq_len)
    else:
        cfg = dataclasses.replace(_data_config(args, args.source, args.tokenizer), seq_len=args.seq_len)
    print(json.dumps(corpus.corpus_info(cfg), indent=2, sort_keys=True, default=str))
    return 0
