"""The seed's draft signals (docs/design.md, "Features"): exact definitions in one place.

For each drafted token, the draft's next-token distribution p = softmax(fp32 logits):
entropy H = -Σ p log2 p (bits) and confidence c = max p. A step aggregates its drafted
tokens into mean/max entropy and mean/min confidence. The signals describe the draft
model's own distribution (temperature 1, no top-p), whatever the request samples with,
so a predictor trained on greedy runs sees the same quantity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from speckv.draft_plan import ACCEPT_EMA_ALPHA, ACCEPT_EMA_INITIAL, MAX_MATCH_LENGTH
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


def token_features(
    context: ContextIndex,
    earlier: Sequence[int],
    token: int,
    signals: TokenSignals,
    history: Mapping[str, float],
) -> dict[str, float]:
    """What an in-step policy sees of a drafted token (speckv.draft_plan.PLAN_FEATURES): its
    context match given this step's `earlier` drafts, its own signals, and the sequence's
    history before the step. The engine and the replay both build features here."""
    return {
        "match_length": float(context.match_length(earlier, token)),
        "draft_confidence": signals.confidence,
        "draft_entropy": signals.entropy_bits,
        **history,
    }


class ContextIndex:
    """Which n-grams (n ≤ MAX_MATCH_LENGTH) occur in a sequence's committed tokens.

    `add` costs MAX_MATCH_LENGTH set inserts per committed token and `match_length`
    at most MAX_MATCH_LENGTH lookups per drafted token: no scans of the context, so the
    work per token does not grow with the sequence (docs/design.md, "Context match").
    """

    def __init__(self, max_n: int = MAX_MATCH_LENGTH) -> None:
        self.max_n = max_n
        self._grams: set[tuple[int, ...]] = set()
        self._tail: list[int] = []  # last max_n - 1 committed tokens

    def add(self, tokens: Sequence[int]) -> None:
        tail = self._tail
        grams = self._grams
        keep = self.max_n - 1
        for t in tokens:
            tail.append(int(t))
            k = len(tail)
            for n in range(1, min(self.max_n, k) + 1):
                grams.add(tuple(tail[k - n :]))
            if k > keep:
                del tail[: k - keep]

    def match_length(self, drafted: Sequence[int], token: int) -> int:
        """The longest n such that (the n-1 tokens before `token`, `token`) already occurs
        in the committed tokens; the tokens before it are the committed tail followed by
        this step's earlier drafts."""
        before = (self._tail + list(drafted))[-(self.max_n - 1) :] if self.max_n > 1 else []
        grams = self._grams
        for n in range(min(self.max_n, len(before) + 1), 0, -1):
            if (*before[len(before) - n + 1 :], token) in grams:
                return n
        return 0


@dataclass
class SequenceHistory:
    """A sequence's recent outcomes, kept by the worker across every kind of step.

    Agreement events: each verified drafted token the target kept (1), the first one it
    rejected (0), and — when every verified token was kept but more were drafted — whether
    the first unverified draft equals the target's token (a free look at the draft's
    quality on steps a stop rule cut short, γ = 0 included). Steps with no event (nothing
    drafted) leave the history as it was, so a sequence that sat at γ = 0 keeps learning
    from its probes and can come back.
    """

    prev_full: float = 0.0
    accept_ema: float = ACCEPT_EMA_INITIAL
    last_gamma: int = 0
    last_accepted: int = 0
    events: int = 0

    def observe(
        self, drafts: Sequence[int], gamma: int, accepted: int, next_token: int
    ) -> list[int]:
        """Record one verified step; returns its agreement events (1 agree, 0 disagree)."""
        ev = [1] * accepted
        if accepted < gamma:
            ev.append(0)
        elif len(drafts) > gamma:
            ev.append(1 if int(drafts[gamma]) == int(next_token) else 0)
        self.last_gamma = gamma
        self.last_accepted = accepted
        if ev:
            self.prev_full = 1.0 if all(ev) else 0.0
            a = ACCEPT_EMA_ALPHA
            ema = self.accept_ema
            for e in ev:
                ema = (1 - a) * ema + a * e
            self.accept_ema = ema
            self.events += len(ev)
        return ev

    def values(self) -> dict[str, float]:
        return {"prev_full": self.prev_full, "accept_ema": self.accept_ema}
