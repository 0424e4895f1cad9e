"""The `markov` corpus: words drawn from a known first-order Markov chain (50 states, 4 successors each, Dirichlet
probabilities, seed 2017), so its true perplexity is exact: exp(H), H = -sum_i pi_i sum_j P_ij log P_ij = 1.0918
nats per token (Cover & Thomas, Elements of Information Theory, thm 4.2.4), exp(H) = 2.980. The floor no language
model can beat: the answer key a study can check on any machine. `python -m harness data fetch markov` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.sparse.csgraph import connected_components

from harness.data import EOS, Corpus, batchify

N_STATES = 50
SUCCESSORS = 4
SEED = 2017
# Tokens per split (each split is cut at the first sentence end past this many); 70k tokenise in ~0.1 s.
SPLIT_TOKENS = {"train": 50_000, "valid": 10_000, "test": 10_000}


@dataclass(frozen=True)
class MarkovSource:
    """A first-order Markov chain over words; `transition[i, j]` = P(next = word j | current = word i)."""

    words: tuple[str, ...]  # state index -> word; words[0] == EOS
    transition: np.ndarray  # (V, V) float64, rows sum to 1

    @property
    def stationary(self) -> np.ndarray:
        """pi (V,): the left eigenvector of the transition matrix for eigenvalue 1, normalised to sum 1."""
        values, vectors = np.linalg.eig(self.transition.T)
        pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
        return pi / pi.sum()

    @property
    def entropy_rate(self) -> float:
        """H in nats per token: -sum_i pi_i sum_j P_ij log P_ij (0 log 0 = 0)."""
        p = self.transition
        row_entropy = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
        return float(self.stationary @ row_entropy)

    @property
    def perplexity(self) -> float:
        """exp(H): the perplexity of the true model, the floor no language model can beat in expectation."""
        return float(np.exp(self.entropy_rate))

    def sample(self, n_tokens: int, rng: np.random.Generator, start: int) -> list[int]:
        """States of the chain from `start` (exclusive) until at least n_tokens are drawn and the last is EOS."""
        cumulative = self.transition.cumsum(axis=1)
        states, state = [], start
        while len(states) < n_tokens or state != 0:
            # searchsorted on the row's CDF: one categorical draw; min() guards the CDF's last rounding ulp.
            state = min(int(np.searchsorted(cumulative[state], rng.random(), side="right")), N_STATES - 1)
            states.append(state)
        return states

    def text(self, states: list[int]) -> str:
        """The file content: words separated by spaces, EOS as a line break (harness.data reads it back as <eos>)."""
        return "".join("\n" if s == 0 else self.words[s] + " " for s in states)

    def state_ids(self, corpus: Corpus) -> torch.Tensor:
        """(V,) int64: the chain state of each of the corpus's token ids (the loader numbers words its own way)."""
        index = {word: i for i, word in enumerate(self.words)}
        return torch.tensor([index[word] for word in corpus.vocab], dtype=torch.int64)

    def oracle_losses(self, corpus: Corpus, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
        """-log P(target | input) in nats for every pair `evaluate` scores on batchify(tokens, batch_size)."""
        source = self.state_ids(corpus)[batchify(tokens, batch_size)]  # (L, B) chain states
        log_p = torch.from_numpy(np.log(np.maximum(self.transition, 1e-300)))
        return -log_p[source[:-1], source[1:]].flatten()


def make_source(n_states: int = N_STATES, successors: int = SUCCESSORS, seed: int = SEED) -> MarkovSource:
    """The random sparse chain described in the module docstring; raises if it is not irreducible. 50 words rather
    than a few hundred: SGD must see every transition often enough for a CPU run of seconds to come within a few
    hundredths of a nat of H (with 200 words and 8 successors a 10-second run stays 0.15 nats above it)."""
    rng = np.random.default_rng(seed)
    transition = np.zeros((n_states, n_states))
    for row in transition:
        row[rng.choice(n_states, size=successors, replace=False)] = rng.dirichlet(np.ones(successors))
    # An irreducible chain has one stationary distribution, so H is well defined; this seed gives one.
    n_components, _ = connected_components(transition > 0, directed=True, connection="strong")
    if n_components != 1:
        raise ValueError(f"seed {seed}: the chain has {n_components} strongly connected components, not 1")
    words = (EOS,) + tuple(f"w{i:03d}" for i in range(1, n_states))
    return MarkovSource(words, transition)


def write_corpus(folder: Path, source: MarkovSource | None = None, seed: int = SEED) -> Path:
    """Write train.txt, valid.txt and test.txt: one run of the chain cut at sentence ends; returns folder."""
    source = source or make_source()
    rng = np.random.default_rng(seed + 1)
    folder.mkdir(parents=True, exist_ok=True)
    state = 0  # every split starts after a sentence end, like a real corpus
    for split, n_tokens in SPLIT_TOKENS.items():
        states = source.sample(n_tokens, rng, state)
        state = states[-1]
        (folder / f"{split}.txt").write_text(source.text(states), encoding="utf-8")
    return folder
