"""Scoring a model on task suites (``scaling eval RUN_DIR --tasks ...``; suites and metrics in
``scaling.tasks``).

Examples are grouped by (prompt tokens, answer tokens) so each group is one batch: one
teacher-forced forward for the answer's log-likelihood, and one greedy continuation of exactly
the answer's length for exact match and edit distance. The model reads at most the run's
``data.seq_len`` tokens (an example longer than that is refused).
"""

from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from scaling import tasks
from scaling.errors import UsageError


def score_examples(model, tok, examples: list[tasks.Example], *, context: int,
                   mod_routing: str = "causal") -> list[dict]:
    """Per example (in order): ``answer_logprob`` (nats, summed over the answer's tokens),
    ``answer_nll`` (nats/token), ``exact_match`` (0/1), ``edit_distance`` (token Levenshtein of the
    greedy continuation against the answer, over the answer's length), ``greedy`` (its text)."""
    from scaling.models.sample import generate

    enc = []
    for i, e in enumerate(examples):
        p, a = list(tok.encode(e.prompt)), list(tok.encode(e.answer))
        if not p or not a:
            raise UsageError(f"--tasks: example {i} encodes to no tokens ({e.prompt!r} -> {e.answer!r})")
        if len(p) + len(a) > context:
            raise UsageError(f"--tasks: example {i} is {len(p) + len(a)} tokens, longer than the run's data.seq_len="
                             f"{context}; shorten it")
        enc.append((p, a))
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (p, a) in enumerate(enc):
        groups[(len(p), len(a))].append(i)
    out: list[dict | None] = [None] * len(examples)
    for (P, A), idx in sorted(groups.items()):
        p_BxP = np.asarray([enc[i][0] for i in idx], np.int32)
        a_BxA = np.asarray([enc[i][1] for i in idx], np.int32)
        full = np.concatenate([p_BxP, a_BxA], axis=1)
        logits, _ = model(jnp.asarray(full[:, :-1]), train=False, mod_routing=mod_routing)
        logp_BxLxV = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        # positions P-1 .. P+A-2 predict the answer's tokens
        lp_BxA = np.asarray(jnp.take_along_axis(logp_BxLxV[:, P - 1:], jnp.asarray(a_BxA)[..., None], axis=-1)[..., 0],
                            np.float64)
        greedy_BxA = np.asarray(generate(model, jnp.asarray(p_BxP), A, key=jax.random.key(0), temperature=0.0,
                                         context=context, mod_routing=mod_routing))[:, P:]
        for row, i in enumerate(idx):
            g, a = greedy_BxA[row].tolist(), a_BxA[row].tolist()
            out[i] = {"answer_logprob": float(lp_BxA[row].sum()), "answer_nll": float(-lp_BxA[row].mean()),
                      "exact_match": float(g == a), "edit_distance": tasks.edit_distance(g, a) / len(a),
                      "greedy": tok.decode(g)}
    return out  # type: ignore[return-value]
