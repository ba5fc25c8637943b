"""Batch size as a function of the tokens seen: ``data.batch_schedule`` (batch-size warmup,
Merrill et al. 2025, "Critical Batch Size Revisited"; and the branches that measure the
critical batch size from a checkpoint, ``scaling.sweep.cbs``).

``data.batch_size`` is the first batch; each ``"TOKENS:BATCH"`` entry switches to ``BATCH``
sequences at the first step that *starts* at or after ``TOKENS`` training tokens (so a switch
lands on a step boundary, at most one old step late). Everything else is a pure function of the
step index: the batch of step ``s``, the sequences (and tokens) read before it, the step a token
budget ends at. The loader reads global window slots ``sequences_before(s) ..`` and the trainer
counts tokens and FLOPs the same way, so a resume, a branch from another run's checkpoint and a
multi-host run all agree on which sequences a step reads. Without entries this reduces exactly
to ``s * batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scaling.config import ConfigError, DataConfig


def parse_entries(entries, first_batch: int) -> tuple[tuple[int, int], ...]:
    """``(("TOKENS:BATCH" | "TOKENS=BATCH"), ...)`` -> ``((tokens, batch), ...)``; ConfigError
    naming ``data.batch_schedule`` for a malformed entry, a non-increasing token count or a
    batch equal to the one before (an entry that changes nothing)."""
    out: list[tuple[int, int]] = []
    prev_t, prev_b = 0, first_batch
    for i, e in enumerate(entries):
        text = str(e).replace("=", ":")
        parts = [p.strip() for p in text.split(":")]
        try:
            if len(parts) != 2:
                raise ValueError
            t, b = float(parts[0]), float(parts[1])
            if not (math.isfinite(t) and math.isfinite(b) and t == int(t) and b == int(b)):
                raise ValueError
            t, b = int(t), int(b)
        except ValueError:
            raise ConfigError(f"data.batch_schedule[{i}]: expected TOKENS:BATCH (e.g. 1e6:64), got {e!r}") from None
        if t <= prev_t:
            raise ConfigError(f"data.batch_schedule[{i}]: tokens must increase and be > 0 (the first batch is "
                              f"data.batch_size), got {t} after {prev_t}")
        if b < 1:
            raise ConfigError(f"data.batch_schedule[{i}]: batch must be a positive number of sequences, got {b}")
        if b == prev_b:
            raise ConfigError(f"data.batch_schedule[{i}]: batch {b} is the batch already in use; drop the entry")
        out.append((t, b))
        prev_t, prev_b = t, b
    return tuple(out)


@dataclass(frozen=True)
class Segment:
    """Steps ``[start_step, next segment's start)`` read ``batch`` sequences each, the first
    from global slot ``start_sequences``."""

    start_step: int
    batch: int
    start_sequences: int


@dataclass(frozen=True)
class BatchSchedule:
    """The batch of every step. ``seq_len`` tokens per sequence; ``segments`` in step order."""

    seq_len: int
    segments: tuple[Segment, ...]

    @classmethod
    def of(cls, data: DataConfig) -> "BatchSchedule":
        entries = parse_entries(data.batch_schedule, data.batch_size)
        segs = [Segment(0, data.batch_size, 0)]
        for tokens, batch in entries:
            cur = segs[-1]
            # the first step whose start is at or after `tokens` (in sequences: ceil(tokens / L))
            want = -(-tokens // data.seq_len)
            steps_in = max(0, -(-(want - cur.start_sequences) // cur.batch))
            start = cur.start_step + steps_in
            seqs = cur.start_sequences + steps_in * cur.batch
            if steps_in == 0:  # two switches before one step of the first: the later one wins
                segs[-1] = Segment(cur.start_step, batch, cur.start_sequences)
            else:
                segs.append(Segment(start, batch, seqs))
        return cls(data.seq_len, tuple(segs))

    @property
    def constant(self) -> bool:
        return len(self.segments) == 1

    @property
    def batches(self) -> tuple[int, ...]:
        """Every batch size the schedule uses, in order of first use (sequences)."""
        return tuple(dict.fromkeys(s.batch for s in self.segments))

    def _segment(self, step: int) -> Segment:
        seg = self.segments[0]
        for s in self.segments[1:]:
            if s.start_step > step:
                break
            seg = s
        return seg

    def batch_at(self, step: int) -> int:
        """Sequences in step ``step`` (0-based)."""
        return self._segment(step).batch

    def sequences_before(self, step: int) -> int:
        """Sequences read by steps ``0 .. step-1``: the first global window slot of ``step``."""
        seg = self._segment(step)
        return seg.start_sequences + (step - seg.start_step) * seg.batch

    def tokens_before(self, step: int) -> int:
        """Training tokens consumed by steps ``0 .. step-1``."""
        return self.sequences_before(step) * self.seq_len

    def steps_for_tokens(self, tokens: float) -> int:
        """Steps whose token count is nearest ``tokens`` (a token budget; FLOP budgets convert
        at the model's constant FLOPs per token)."""
        target = tokens / self.seq_len
        seg = self.segments[0]
        for s in self.segments[1:]:
            if s.start_sequences > target:
                break
            seg = s
        return int(seg.start_step + round((target - seg.start_sequences) / seg.batch))
