"""Scoring a model on task suites (``scaling eval RUN_DIR --tasks ...``; suites and metrics in
``scaling.tasks``).

Every example is written into a row of one fixed-shape buffer ``[ROWS, L]`` (``L`` the suite's
longest prompt + answer, right-padded: the model is causal, so what follows a position never
changes it), so a whole suite compiles one forward. One teacher-forced pass gives the answer's
log-likelihood; the greedy continuation takes as many passes as the longest answer, each row
writing its next token at its own position (no KV cache: the sizes trained here make it cheap).
The model reads at most the run's ``data.seq_len`` tokens (a longer example is refused).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling import tasks
from scaling.errors import UsageError

ROWS = 64  # examples per forward (the last batch is padded with empty rows)
NOT_CAUSAL = ("task scoring continues prompts token by token, which needs a causal model; expert-choice MoE and MoD "
              "with causal_aux=none are not")


def _scorer(model, mod_routing: str):
    """``(state, fn)``: ``fn(state, x_BxL) -> (lp_BxL, next_BxL)``, compiled once per shape:
    ``lp[b, t]`` the log-probability (nats) of token ``x[b, t + 1]`` after ``x[b, :t + 1]`` (the
    last column 0), ``next[b, t]`` the most likely token after ``x[b, :t + 1]``. Only these
    ``[B, L]`` arrays leave the device, whatever the vocabulary. The parameters are placed once."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state)

    @jax.jit
    def fn(state, x_BxL):
        logits_BxLxV, _ = nnx.merge(graphdef, state)(x_BxL, train=False, mod_routing=mod_routing)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
        nxt_BxL = jnp.concatenate([x_BxL[:, 1:], jnp.zeros_like(x_BxL[:, :1])], axis=1)
        lp_BxL = jnp.take_along_axis(logp_BxLxV, nxt_BxL[..., None], axis=-1)[..., 0]
        return lp_BxL.at[:, -1].set(0.0), jnp.argmax(logp_BxLxV, axis=-1).astype(jnp.int32)

    return state, fn


def score_examples(model, tok, examples: list[tasks.Example], *, context: int,
                   mod_routing: str = "causal") -> list[dict]:
    """Per example (in order): ``answer_logprob`` (nats, summed over the answer's tokens),
    ``answer_nll`` (nats/token), ``exact_match`` (0/1), ``edit_distance`` (token Levenshtein of the
    greedy continuation against the answer, over the answer's length), ``greedy`` (its text).
    The model must be causal (right padding must not change what a position sees)."""
    enc = []
    for i, e in enumerate(examples):
        p, a = list(tok.encode(e.prompt)), list(tok.encode(e.answer))
        if not p or not a:
            raise UsageError(f"--tasks: example {i} encodes to no tokens ({e.prompt!r} -> {e.answer!r})")
        if len(p) + len(a) > context:
            raise UsageError(f"--tasks: example {i} is {len(p) + len(a)} tokens, longer than the run's data.seq_len="
                             f"{context}; shorten it")
        enc.append((p, a))
    if not enc:
        return []
    state, scorer = _scorer(model, mod_routing)
    L = max(len(p) + len(a) for p, a in enc)
    out: list[dict] = []
    for lo in range(0, len(enc), ROWS):
        part = enc[lo:lo + ROWS]
        P = np.asarray([len(p) for p, _ in part])
        A = np.asarray([len(a) for _, a in part])
        rows = np.arange(len(part))
        full_BxL = np.zeros((ROWS, L), np.int32)
        for r, (p, a) in enumerate(part):
            full_BxL[r, :len(p) + len(a)] = p + a
        lp_BxL, nxt_BxL = (np.asarray(v) for v in scorer(state, jnp.asarray(full_BxL)))
        # greedy: step k writes each row's answer token k at position P + k (rows whose answer is
        # shorter stop writing); position P + k - 1 predicts it
        buf_BxL = full_BxL.copy()
        for r in rows:
            buf_BxL[r, P[r]:] = 0
        for k in range(int(A.max())):
            if k:
                nxt_BxL = np.asarray(scorer(state, jnp.asarray(buf_BxL))[1])
            live = rows[k < A]
            buf_BxL[live, P[live] + k] = nxt_BxL[live, P[live] + k - 1]
        for r, (p, a) in enumerate(part):
            lp_A = lp_BxL[r, len(p) - 1:len(p) + len(a) - 1].astype(np.float64)
            g = buf_BxL[r, len(p):len(p) + len(a)].tolist()
            out.append({"answer_logprob": float(lp_A.sum()), "answer_nll": float(-lp_A.mean()),
                        "exact_match": float(g == a), "edit_distance": tasks.edit_distance(g, a) / len(a),
                        "greedy": tok.decode(g)})
    return out


def load_suites(suites, *, examples: int = 200, seed: int = 0) -> list[tuple[str, list[tasks.Example]]]:
    """``(name, examples)`` of each suite spec (a built-in name or a JSONL task file), blanks
    dropped; UsageError for none, an unknown name, a missing or malformed file."""
    if examples < 1:
        raise UsageError(f"--examples: must be >= 1, got {examples}")
    loaded = [tasks.load_suite(s.strip(), n=examples, seed=seed) for s in suites if s.strip()]
    if not loaded:
        raise UsageError("--tasks: name at least one suite (arithmetic, copy, brackets) or a JSONL task file")
    names = [name for name, _ in loaded]
    for name in names:  # a suite's scores are keyed by its name (a file: its stem)
        if names.count(name) > 1:
            raise UsageError(f"--tasks: two suites are named {name!r} (a task file is named by its stem); "
                             "rename one file")
    return loaded


def score_suites(model, tok, loaded: list[tuple[str, list[tasks.Example]]], *, context: int,
                 mod_routing: str = "causal") -> dict:
    """``{name: {"summary": suite means, "examples": per-example rows with prompt and answer}}``
    (what ``tasks.json`` holds under ``suites``)."""
    out = {}
    for name, exs in loaded:
        rows = score_examples(model, tok, exs, context=context, mod_routing=mod_routing)
        rows = [{"prompt": e.prompt, "answer": e.answer, **r} for e, r in zip(exs, rows)]
        out[name] = {"summary": tasks.summarize(rows), "examples": rows}
    return out


def tasks_record(step: int, suites: dict, seed: int) -> dict:
    """What ``tasks.json`` holds, written at the end of training and by ``scaling eval --tasks``:
    ``schema_version``, ``step``, ``time``, ``split`` (built-in examples come from the held-out
    split), ``seed`` and ``suites`` (``score_suites``)."""
    import time

    from scaling import schema

    return {"schema_version": schema.SCHEMA_VERSION, "step": step, "time": time.time(), "split": "eval", "seed": seed,
            "suites": suites}


def summary_keys(suites: dict) -> dict:
    """``final_tasks/NAME/METRIC`` for a run's summary: each suite's mean ``exact_match``,
    ``edit_distance``, ``answer_nll`` (nats/token) and ``answer_logprob`` (nats)."""
    return {f"final_tasks/{name}/{k}": v for name, s in suites.items() for k, v in s["summary"].items() if k != "n"}


def suites_for_run(cfg) -> list[tuple[str, list[tasks.Example]]]:
    """A training run's ``eval_tasks`` read and checked before it trains: ConfigError naming
    ``eval_tasks`` for a missing or malformed task file, an example longer than
    ``data.seq_len``, or a multi-process run (scoring runs in one process)."""
    from scaling.config import ConfigError
    from scaling.data.corpus import tokenizer_for

    if not cfg.eval_tasks:
        return []
    if jax.process_count() > 1:
        raise ConfigError("eval_tasks: scoring at the end of training runs in one process; leave it unset and "
                          "score the finished run with scaling eval RUN --tasks ...")
    try:
        loaded = load_suites(cfg.eval_tasks, examples=cfg.eval_task_examples)
    except UsageError as e:
        raise ConfigError(f"eval_tasks: {str(e).removeprefix('--tasks: ').removeprefix('--tasks ')}") from None
    if not cfg.model.causal_eval:
        raise ConfigError(f"eval_tasks: {NOT_CAUSAL}; leave eval_tasks unset")
    tok = tokenizer_for(cfg.data)
    for name, ex in loaded:
        for i, e in enumerate(ex):
            n = len(tok.encode(e.prompt)) + len(tok.encode(e.answer))
            if n > cfg.data.seq_len:
                raise ConfigError(f"eval_tasks: {name} example {i} is {n} tokens, longer than data.seq_len="
                                  f"{cfg.data.seq_len}; shorten it or raise data.seq_len")
    return loaded
