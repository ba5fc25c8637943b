"""``scaling eval RUN_DIR``: re-score a run's newest checkpoint on the current held-out set.

Runs measured under an older definition of the fitted loss (an older ``scaling.schema``
version: a held-out set tied to the batch size, MoD scored with look-ahead) stay usable: this
evaluates their newest checkpoint (read-only) the way the trainer evaluates now (one held-out
set of ``data.eval_tokens``, causal MoD routing, MoE without dropping) and writes
``RUN_DIR/rescored.json`` beside the old figures, never over them. ``scaling.runs.load`` reads
the rescored figures in place of the old ones when they are of the current schema version.

``--tokens N`` sets the held-out size; ``--data KEY=VALUE`` changes another ``data.*`` field
(e.g. ``--data source=local_text --data path=DIR``) to score on other text.

``--tasks arithmetic,copy,brackets,FILE.jsonl`` scores task suites instead (``scaling.tasks``):
per example the answer's log-likelihood, exact match and token edit distance of the greedy
continuation; writes ``RUN_DIR/tasks.json`` (``--examples N`` per built-in suite, ``--seed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

RESCORED = "rescored.json"
TASKS = "tasks.json"


def register(sub) -> None:
    p = sub.add_parser("eval", help="re-score a run's newest checkpoint on the current held-out set",
                       description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="a run directory written by scaling train / scaling sweep")
    p.add_argument("--tokens", type=int, default=None,
                   help="held-out tokens to score (default: the run's data.eval_tokens, else the trainer's default)")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="another data.* setting for the held-out text, e.g. --data source=local_text")
    p.add_argument("--tasks", default=None, metavar="SUITES",
                   help="score task suites instead: comma-separated built-in names (arithmetic, copy, brackets) "
                        "or JSONL task files; writes RUN_DIR/tasks.json (or --out)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="with --tasks: where to write the scores (default RUN_DIR/tasks.json); an existing file, "
                        "such as the scores written at the end of training, is never overwritten")
    p.add_argument("--examples", type=int, default=200, help="examples per built-in suite (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in suites' examples (default 0)")
    p.set_defaults(func=main)


def score_tasks(run_dir: str | Path, suites: list[str], *, examples: int = 200, seed: int = 0) -> dict:
    """Score ``run_dir``'s newest checkpoint on task suites (``scaling.tasks``); returns
    ``{"step", "split", "seed", "suites": {name: {"summary": means, "examples": [per-example rows]}}}``
    (built-in suites' examples come from their held-out ``split``, ``scaling.tasks``)."""
    from scaling import storage
    from scaling.data.corpus import corpus_info, tokenizer_for
    from scaling.errors import UsageError
    from scaling.train.loop import check_tokenizer
    from scaling.train.sample_cli import load_model
    from scaling.train.tasks_eval import NOT_CAUSAL, load_suites, score_suites, tasks_record

    loaded = load_suites(suites, examples=examples, seed=seed)
    cfg, model, step = load_model(run_dir)
    if not cfg.model.causal_eval:
        raise UsageError(f"{run_dir}: {NOT_CAUSAL}")
    tok = tokenizer_for(cfg.data)
    if tok is None:
        raise UsageError(f"{run_dir}: trained on synthetic tokens, which have no text for task prompts")
    check_tokenizer(storage.path(run_dir), corpus_info(cfg.data).get("tokenizer_sha256"))
    return tasks_record(step, score_suites(model, tok, loaded, context=cfg.data.seq_len), seed)


def rescore(run_dir: str | Path, *, tokens: int | None = None, data: list[str] = ()) -> dict:
    """Evaluate ``run_dir``'s newest checkpoint on the held-out set and write ``rescored.json``;
    returns what was written (see ``score``)."""
    from scaling.files import write_json_atomic

    out = score(run_dir, tokens=tokens, data=data)
    from scaling import storage

    write_json_atomic(storage.path(run_dir) / RESCORED, out)
    return out


def score(run_dir: str | Path, *, tokens: int | None = None, data: list[str] = ()) -> dict:
    """Evaluate ``run_dir``'s newest checkpoint (read-only) on a held-out set and return
    ``final_eval_loss`` (nats/token), ``final_eval_loss_se``, ``final_eval_bpb(_se)`` (bits per
    byte), ``eval_sha256``, ``eval_tokens``, ``eval_bytes``, ``step``, ``schema_version``,
    ``causal``, ``data``; writes nothing (a study can score its runs on another set without
    changing what ``scaling.runs.load`` reads)."""
    from scaling import schema
    from scaling.data import loader
    from scaling.errors import UsageError
    from scaling.train import step as step_lib
    from scaling.train.sample_cli import load_model

    if tokens is not None and tokens < 1:
        raise UsageError(f"--tokens: must be >= 1, got {tokens}")
    cfg, model, step = load_model(run_dir)
    overrides = {"data.eval_batches": None, "data.eval_tokens": tokens if tokens is not None else cfg.data.eval_tokens}
    for item in data:
        if "=" not in item:
            raise UsageError(f"--data: expected KEY=VALUE (a data.* field), got {item!r}")
        k, v = item.split("=", 1)
        overrides[f"data.{k.strip().removeprefix('data.')}"] = v.strip()
    data_cfg = cfg.with_overrides(overrides).data
    from scaling.data.corpus import corpus_info
    from scaling.train.loop import check_tokenizer

    from scaling import storage

    check_tokenizer(storage.path(run_dir), corpus_info(data_cfg).get("tokenizer_sha256"))  # its own tokens, or refuse
    ev = loader.eval_set(data_cfg)
    graphdef, params, rest = step_lib.split_model(model)
    causal_mod = cfg.model.mod is not None and cfg.model.mod.causal_aux != "none"
    eval_step = step_lib.make_eval_step(graphdef, mod_routing="causal" if causal_mod else "topk")
    mean, se = step_lib.evaluate_chunks(eval_step, params, rest, ev.chunks, put=lambda chunk: chunk)
    from scaling.data.tokenize import bits_per_byte

    out = {"schema_version": schema.SCHEMA_VERSION, "final_eval_loss": mean, "final_eval_loss_se": se,
           "final_eval_bpb": bits_per_byte(mean, ev.bytes_per_token), "final_eval_bpb_se": bits_per_byte(se, ev.bytes_per_token),
           "eval_sha256": ev.sha256, "eval_tokens": ev.n_tokens, "eval_bytes": ev.n_bytes, "step": step, "causal": cfg.model.causal_eval,
           "data": dataclasses.asdict(data_cfg), "time": time.time(), "provenance": schema.provenance()}
    return out


def main(args) -> int:
    if args.tasks is not None:
        from scaling import storage
        from scaling.errors import UsageError
        from scaling.files import write_json_atomic

        dest = Path(args.out) if args.out else storage.path(args.run) / TASKS
        if dest.exists():
            raise UsageError(f"--out: {dest} exists (scores are never overwritten); name another file with --out")
        out = score_tasks(args.run, args.tasks.split(","), examples=args.examples, seed=args.seed)
        write_json_atomic(dest, out)
        for name, s in out["suites"].items():
            m = s["summary"]
            print(f"{args.run}: step {out['step']}: {name}: {m['n']} examples, exact match {m['exact_match']:.3f}, "
                  f"edit distance {m['edit_distance']:.3f}, answer nll {m['answer_nll']:.4f} nats/token", file=sys.stderr)
        print(f"wrote {dest}", file=sys.stderr)
        return 0
    out = rescore(args.run, tokens=args.tokens, data=args.data)
    print(f"{args.run}: step {out['step']}: eval loss {out['final_eval_loss']:.4f} +- {out['final_eval_loss_se']:.4f} "
          f"nats on {out['eval_tokens']} held-out tokens (schema {out['schema_version']}); wrote {Path(args.run) / RESCORED}",
          file=sys.stderr)
    return 0
