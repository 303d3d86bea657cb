"""Confidence of a translated sentence in [0, 1], from the model's own signals.

A logistic function of:
- the length-normalised log-probability of the hypothesis (the search's score);
- attention coverage: the share of source subwords that received attention mass (a skipped
  clause leaves source subwords unattended);
- repetition: the share of repeated target bigrams (the looping failure of small models);
- the placeholder and markup checks of the pipeline (a projected or extra placeholder, a tag
  that had to be moved).

The weights were fitted by logistic regression on the shipped model's dev split, predicting
sentence chrF >= 50 (bench/text_eval.py); docs/text.md reports how well the score ranks
the held-out test split. Another model can ship other weights (ConfidenceWeights).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# Flags that lower confidence: the model did not keep a placeholder, a term or the markup.
PROBLEM_PREFIXES = ("placeholder_projected", "placeholder_extra", "glossary_projected", "glossary_missing",
                    "markup_reordered", "markup_projected")


@dataclasses.dataclass(frozen=True)
class ConfidenceWeights:
    # Fitted on the shipped model's dev split (bench/text_eval.py), except `repetition`: single
    # dev sentences almost never loop, so the fit cannot see it (it came out +0.27, noise); the
    # hand-set penalty makes a looping translation lose most of its confidence.
    bias: float = 1.378
    log_prob: float = 0.96
    coverage: float = 1.361
    repetition: float = -6.0
    problems: float = -0.179


@dataclasses.dataclass(frozen=True)
class Signals:
    log_prob: float  # length-normalised log-probability (<= 0)
    coverage: float  # [0, 1]
    repetition: float  # [0, 1]
    problems: int

    def features(self) -> list[float]:
        return [self.log_prob, self.coverage, self.repetition, float(self.problems)]


def attention_coverage(attention: Sequence[Sequence[float]] | None, source_tokens: int) -> float:
    """Mean over source subwords (EOS excluded) of min(1, total attention received)."""
    if not attention or source_tokens <= 0:
        return 1.0
    received = [0.0] * source_tokens
    for row in attention:
        for i in range(min(source_tokens, len(row))):
            received[i] += row[i]
    return sum(min(1.0, r) for r in received) / source_tokens


def repetition(text: str) -> float:
    words = text.lower().split()
    bigrams = list(zip(words, words[1:]))
    if len(bigrams) < 2:
        return 0.0
    return 1.0 - len(set(bigrams)) / len(bigrams)


def count_problems(flags: Sequence[str]) -> int:
    return sum(1 for flag in flags if flag.startswith(PROBLEM_PREFIXES))


def confidence(signals: Signals, weights: ConfidenceWeights = ConfidenceWeights()) -> float:
    z = (weights.bias + weights.log_prob * signals.log_prob + weights.coverage * signals.coverage
         + weights.repetition * signals.repetition + weights.problems * signals.problems)
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))
