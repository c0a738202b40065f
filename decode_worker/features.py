"""The seed's draft signals (DESIGN.md, "Features"): exact definitions in one place.

For each drafted token, the draft's next-token distribution p = softmax(fp32 logits):
entropy H = -Σ p log2 p (bits) and confidence c = max p. A step aggregates its drafted
tokens into mean/max entropy and mean/min confidence. The signals describe the draft
model's own distribution (temperature 1, no top-p), whatever the request samples with,
so a predictor trained on greedy runs sees the same quantity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from speckv_client.types import DraftSignals

_LN2 = math.log(2.0)


@dataclass(frozen=True)
class TokenSignals:
    """Signals of one drafted token's distribution."""

    entropy_bits: float
    confidence: float


def token_signals(logits: torch.Tensor) -> list[TokenSignals]:
    """Entropy (bits) and top-1 probability per row of `logits` [num_tokens, vocab]."""
    logp = torch.log_softmax(logits.detach().to(torch.float32), dim=-1)  # [n, vocab]
    p = logp.exp()
    # p·log p is 0 where p is 0 (masked logits give log p = -inf).
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    entropy = (-plogp.sum(dim=-1) / _LN2).clamp_min(0.0)  # [n]
    confidence = p.max(dim=-1).values  # [n]
    return [
        TokenSignals(float(h), float(c))
        for h, c in zip(entropy.tolist(), confidence.tolist(), strict=True)
    ]


def aggregate(tokens: Sequence[TokenSignals]) -> DraftSignals:
    """Per-step mean/max entropy and mean/min confidence over the step's drafted tokens."""
    if not tokens:
        raise ValueError("a step without drafted tokens has no draft signals")
    entropies = [t.entropy_bits for t in tokens]
    confidences = [t.confidence for t in tokens]
    return DraftSignals(
        mean_draft_entropy=sum(entropies) / len(entropies),
        mean_draft_confidence=sum(confidences) / len(confidences),
        max_draft_entropy=max(entropies),
        min_draft_confidence=min(confidences),
    )
