"""A synthetic token source whose entropy rate is known exactly.

A first-order Markov chain over ``V`` symbols: row ``s`` of the transition matrix puts Zipf
weights ``k^-a / Z`` (k = 1..V) on a random permutation of the symbols, so every row has the same
entropy but different preferred successors. All transition probabilities are positive, so the
chain is irreducible and aperiodic with a unique stationary distribution ``pi``. Its entropy
rate ``H = -sum_s pi_s sum_t P_st ln P_st`` (nats/token) is the loss of the Bayes-optimal
predictor given the previous token, i.e. the irreducible loss a fitted scaling law should find.
Since every row is a permutation of the same law, H also equals that Zipf law's entropy, while
``pi`` is far from uniform (so the best context-free loss, H(pi), is well above H).

Samples are independent chains started from ``pi`` and stored side by side; training windows
never cross a chain boundary, so every target token is a genuine transition of the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class MarkovZipf:
    """Markov chain over ``vocab`` symbols with Zipf(``zipf``) rows; ``seed`` fixes the rows."""

    vocab: int
    zipf: float
    seed: int = 0

    @cached_property
    def zipf_weights(self) -> np.ndarray:
        """float64[V]: probability of a row's k-th most likely successor, k = 0..V-1."""
        w = np.arange(1, self.vocab + 1, dtype=np.float64) ** -self.zipf
        return w / w.sum()

    @cached_property
    def successors(self) -> np.ndarray:
        """int[V, V]: ``successors[s, k]`` is state s's k-th most likely next symbol."""
        rng = np.random.default_rng([self.seed, self.vocab, 0x5EED])
        return np.stack([rng.permutation(self.vocab) for _ in range(self.vocab)])

    @cached_property
    def transition(self) -> np.ndarray:
        """float64[V, V], rows sum to 1: ``P[s, successors[s, k]] = zipf_weights[k]``."""
        P = np.empty((self.vocab, self.vocab))
        np.put_along_axis(P, self.successors, np.broadcast_to(self.zipf_weights, P.shape), axis=1)
        return P

    @cached_property
    def stationary(self) -> np.ndarray:
        """float64[V]: the left eigenvector of ``transition`` for eigenvalue 1, summing to 1."""
        V = self.vocab
        # pi (P - I) = 0 with sum(pi) = 1: replace one redundant equation by the normalisation.
        A = (self.transition - np.eye(V)).T
        A[-1, :] = 1.0
        b = np.zeros(V)
        b[-1] = 1.0
        return np.linalg.solve(A, b)

    @property
    def entropy_rate_nats(self) -> float:
        """Exact entropy rate (nats/token) of the stationary chain."""
        P = self.transition
        row_entropy = -(P * np.log(P)).sum(axis=1)
        return float(self.stationary @ row_entropy)

    @property
    def unigram_entropy_nats(self) -> float:
        """Entropy (nats) of the stationary symbol distribution (the best context-free loss)."""
        pi = self.stationary
        return float(-(pi * np.log(pi)).sum())

    def sample(self, n_chains: int, length: int, rng: np.random.Generator, dtype=np.int32) -> np.ndarray:
        """``n_chains`` independent stationary chains of ``length`` symbols: dtype[n_chains, length].

        Every row is a permutation of the same Zipf law, so the successor's *rank* is i.i.d.
        and drawn for all positions at once; only the rank -> symbol lookup is sequential.
        """
        V = self.vocab
        wcdf = np.cumsum(self.zipf_weights)
        pcdf = np.cumsum(self.stationary)
        out = np.empty((length, n_chains), dtype=dtype)
        state = np.minimum(np.searchsorted(pcdf / pcdf[-1], rng.random(n_chains), side="right"), V - 1)
        out[0] = state
        block = max(1, 1 << 22 // max(n_chains, 1))  # ~4M draws per block bounds memory
        succ = self.successors
        for t0 in range(1, length, block):
            t1 = min(length, t0 + block)
            ranks = np.minimum(np.searchsorted(wcdf / wcdf[-1], rng.random((t1 - t0, n_chains)), side="right"), V - 1)
            for i, t in enumerate(range(t0, t1)):
                state = succ[state, ranks[i]]
                out[t] = state
        return out.T.copy()

    def log_prob_transitions(self, seq: np.ndarray) -> np.ndarray:
        """ln P[x_t, x_{t+1}] for each consecutive pair along the last axis of ``seq``."""
        return np.log(self.transition[seq[..., :-1], seq[..., 1:]])
