"""Task suites for downstream evaluation: examples, the built-in synthetic suites, task files and
the per-example metrics. Standard library only (scoring a model: ``scaling.train.tasks_eval``).

An example is a ``prompt`` and the ``answer`` that should follow it (text). A suite is a list of
examples: a built-in name or a JSONL task file, one ``{"prompt": ..., "answer": ...}`` object per
line. Built-in suites (deterministic for a seed, ``n`` examples each):

* ``arithmetic``: multi-digit addition, ``"57+468="`` -> ``"525"`` (operands of 1-3 digits);
* ``copy``: ``"copy qzkf: "`` -> ``"qzkf"`` (3-8 lowercase letters);
* ``brackets``: ``"(()[]) ok? "`` -> ``"yes"`` or ``"no"`` (balanced or not, half each).

Metrics per example (``scaling.train.tasks_eval`` computes them from a model):

* ``answer_logprob``: log-likelihood of the answer's tokens given the prompt (nats, summed),
  and ``answer_nll``: its negative per answer token (nats/token), the smooth "task loss";
* ``exact_match``: 1 when the greedy continuation of the prompt is the answer token for token;
* ``edit_distance``: Levenshtein distance between the greedy continuation (as many tokens as
  the answer has) and the answer's tokens, over the answer's length (0 = equal, 1 = all wrong),
  the continuous metric of Schaeffer et al. ("Are Emergent Abilities ... a Mirage?").
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from scaling.errors import UsageError

BUILTIN = ("arithmetic", "copy", "brackets")


@dataclass(frozen=True)
class Example:
    """One task example: ``prompt`` text and the ``answer`` text that should follow it."""

    prompt: str
    answer: str


def _arithmetic(rng: random.Random) -> Example:
    a, b = (rng.randint(0, 10 ** rng.randint(1, 3) - 1) for _ in range(2))
    return Example(f"{a}+{b}=", str(a + b))


def _copy(rng: random.Random) -> Example:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
    return Example(f"copy {word}: ", word)


def _brackets(rng: random.Random, balanced: bool) -> Example:
    pairs = ["()", "[]"]
    while True:
        stack, out = [], []
        for _ in range(rng.randint(2, 4)):  # a random balanced string of 2-4 pairs
            if stack and rng.random() < 0.5:
                out.append(stack.pop())
            else:
                o, c = rng.choice(pairs)
                out.append(o)
                stack.append(c)
        out.extend(reversed(stack))
        s = "".join(out)
        if not balanced:  # one bracket swapped for the other kind: unbalanced
            i = rng.randrange(len(s))
            s = s[:i] + {"(": "[", ")": "]", "[": "(", "]": ")"}[s[i]] + s[i + 1:]
        if is_balanced(s) == balanced:
            return Example(f"{s} ok? ", "yes" if balanced else "no")


def is_balanced(s: str) -> bool:
    """Whether every bracket of ``s`` closes in order (``()`` and ``[]``)."""
    stack = []
    for ch in s:
        if ch in "([":
            stack.append(")" if ch == "(" else "]")
        elif ch in ")]":
            if not stack or stack.pop() != ch:
                return False
    return not stack


def builtin(name: str, n: int = 200, seed: int = 0) -> list[Example]:
    """``n`` examples of the built-in suite ``name`` (deterministic for ``seed``)."""
    if name not in BUILTIN:
        raise UsageError(f"--tasks: unknown suite {name!r}; use one of {', '.join(BUILTIN)} or a JSONL task file")
    rng = random.Random(f"{name}:{seed}")
    if name == "arithmetic":
        return [_arithmetic(rng) for _ in range(n)]
    if name == "copy":
        return [_copy(rng) for _ in range(n)]
    return [_brackets(rng, balanced=i % 2 == 0) for i in range(n)]


def read_task_file(path: str | Path) -> list[Example]:
    """Examples of a JSONL task file; UsageError naming the file and line of a malformed one."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"--tasks {path}: not UTF-8 text; write one JSON object per line") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError:
            raise UsageError(f"--tasks {path}:{i}: not a JSON object; write {{\"prompt\": ..., \"answer\": ...}} "
                             "per line") from None
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) or not isinstance(d.get("answer"), str):
            raise UsageError(f"--tasks {path}:{i}: needs string fields prompt and answer, got {line.strip()[:80]!r}")
        if not d["prompt"] or not d["answer"]:
            raise UsageError(f"--tasks {path}:{i}: prompt and answer must be non-empty")
        out.append(Example(d["prompt"], d["answer"]))
    if not out:
        raise UsageError(f"--tasks {path}: no examples; write one JSON object per line")
    return out


def load_suite(spec: str, n: int = 200, seed: int = 0) -> tuple[str, list[Example]]:
    """``(name, examples)`` of a built-in suite name or a JSONL task file path."""
    p = Path(spec)
    if spec not in BUILTIN and (p.suffix in (".jsonl", ".json") or p.exists()):
        if not p.is_file():
            raise UsageError(f"--tasks {spec}: no such task file")
        return p.stem, read_task_file(p)
    return spec, builtin(spec, n=n, seed=seed)


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def summarize(rows: list[dict]) -> dict:
    """Suite means of the per-example metrics (``n`` examples)."""
    keys = ("answer_logprob", "answer_nll", "exact_match", "edit_distance")
    return {"n": len(rows), **{k: sum(r[k] for r in rows) / len(rows) for k in keys}} if rows else {"n": 0}
