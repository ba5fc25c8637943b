"""Task suites for downstream evaluation: examples, the built-in synthetic suites, task files and
the per-example metrics. Standard library only (scoring a model: ``scaling.train.tasks_eval``).

An example is a ``prompt`` and the ``answer`` that should follow it (text). A suite is a list of
examples: a built-in name or a JSONL task file, one ``{"prompt": ..., "answer": ...}`` object per
line. Built-in suites (deterministic for a seed, ``n`` examples each):

* ``arithmetic``: multi-digit addition, ``"57+468="`` -> ``"525"`` (operands of 1-3 digits);
* ``copy``: ``"copy qzkf: "`` -> ``"qzkf"`` (3-8 lowercase letters);
* ``brackets``: ``"(()[]) ok? "`` -> ``"yes"`` or ``"no"`` (balanced or not, half each).

A scored prompt starts with a line break (``LINE_START``, e.g. ``"\n57+468="``): in the training
text every example begins a line, and a prompt scored at position 0 without it is ambiguous.

Every built-in example belongs to one split, fixed by the SHA-256 of its prompt: ``eval`` (about
one prompt in ten, ``EVAL_SHARE``) or ``train``. Evaluation draws from ``eval`` and the training
source (``data.source=tasks``, or a ``tasks:SUITE`` mixture component) from ``train``, so a model
is never scored on a prompt it was trained on, at any seed or size.

Metrics per example (``scaling.train.tasks_eval`` computes them from a model):

* ``answer_logprob``: log-likelihood of the answer's tokens given the prompt (nats, summed),
  and ``answer_nll``: its negative per answer token (nats/token), the smooth "task loss";
* ``exact_match``: 1 when the greedy continuation of the prompt is the answer token for token;
* ``edit_distance``: Levenshtein distance between the greedy continuation (as many tokens as
  the answer has) and the answer's tokens, over the answer's length (0 = equal, 1 = all wrong),
  the continuous metric of Schaeffer et al. ("Are Emergent Abilities ... a Mirage?").
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from scaling.errors import UsageError

BUILTIN = ("arithmetic", "copy", "brackets")
SPLITS = ("eval", "train")
LINE_START = "\n"  # every built-in prompt begins a line, as each example does in the training text
EVAL_SHARE = 26  # of 256: prompts whose SHA-256 starts with a byte below this are held out (~10%)


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


def split_of(prompt: str) -> str:
    """``"eval"`` or ``"train"``: the split a prompt belongs to (SHA-256 of its UTF-8 bytes)."""
    return "eval" if hashlib.sha256(prompt.encode("utf-8")).digest()[0] < EVAL_SHARE else "train"


def _draw(name: str, n: int, seed: int, split: str) -> list[Example]:
    """``n`` raw examples (prompts without the leading line break) of ``split``."""
    if name not in BUILTIN:
        raise UsageError(f"--tasks: unknown suite {name!r}; use one of {', '.join(BUILTIN)} or a JSONL task file")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{name}:{seed}" if split == "eval" else f"{name}:train:{seed}")
    out: list[Example] = []
    while len(out) < n:
        if name == "arithmetic":
            e = _arithmetic(rng)
        elif name == "copy":
            e = _copy(rng)
        else:
            e = _brackets(rng, balanced=len(out) % 2 == 0)
        if split_of(e.prompt) == split:
            out.append(e)
    return out


def builtin(name: str, n: int = 200, seed: int = 0, split: str = "eval") -> list[Example]:
    """``n`` examples of the built-in suite ``name`` from ``split`` (deterministic for ``seed``;
    the two splits draw from separate streams and never share a prompt). Each prompt starts with
    ``LINE_START``, the line break that precedes every example in the training text: without it a
    model scored at position 0 cannot tell ``5+3=`` from the end of ``125+3=`` (measured on the
    emergence study's largest model: arithmetic exact match 0.042 without, 0.202 with)."""
    return [Example(LINE_START + e.prompt, e.answer) for e in _draw(name, n, seed, split)]


def training_text(name: str, n: int, seed: int = 0, per_document: int = 64) -> list[bytes]:
    """The training split of built-in suite ``name`` as documents: ``n`` examples, each written
    ``prompt + answer`` on its own line, ``per_document`` lines per document (bytes, UTF-8)."""
    return lines_text(_draw(name, n, seed, "train"), per_document)


def lines_text(examples: list[Example], per_document: int) -> list[bytes]:
    """Raw examples as documents of ``per_document`` lines ``prompt + answer`` (bytes, UTF-8)."""
    return ["".join(f"{e.prompt}{e.answer}\n" for e in examples[i:i + per_document]).encode("utf-8")
            for i in range(0, len(examples), per_document)]


def held_out_text(name: str, n: int) -> bytes:
    """The held-out text of built-in suite ``name`` (the eval split, seed 0) as one document."""
    return lines_text(_draw(name, n, 0, "eval"), n)[0]


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
