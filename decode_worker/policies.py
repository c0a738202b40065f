"""Gamma policies behind one small interface, plus the local ones (fixed, heuristic).

A `GammaPolicy` is shared by the worker; `start` gives each sequence its own
`SequencePolicy`, so concurrent sequences never share state. The engine calls, per step:

    decide(step, prefix_signals)   before drafting (after the prefix, in the prefix window)
    after_token(step, j, features, cap)
                                   only when `in_step`: after each drafted token, with its
                                   features (docs/design.md, "Draft plans"); the answer may
                                   end drafting and say how many tokens to verify
    drafted(step, gamma, signals)  as soon as drafting ends, before the target verifies
    verified(step, gamma, accepted)
    finished(outcome)              the step's outcome (tokens produced, timings, the
                                   decision that decided it), before the next step's
                                   `decide`; `outcome.sequence_end` on a sequence's last
                                   outcome however it ended: the step that ended it, or
                                   the last step before a cancel, an abandoned stream or
                                   an error between steps
    close()                        once, after the last `finished`

The remote policy (remote_policy.py) uses `drafted` to send step t's signals early so the
answer for step t+1 arrives while the target is busy.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace

from speckv_client.types import DecisionSource, DraftSignals, StepOutcome

# DecisionSource is defined once, in speckv_client.types (re-exported here).

HEURISTIC_INITIAL_GAMMA = 4


class PolicyError(ValueError):
    """An unknown or malformed policy spec; the message lists the valid forms."""


@dataclass(frozen=True)
class GammaDecision:
    """A step's draft length and where it came from."""

    gamma: int
    source: DecisionSource
    model_name: str = ""
    model_version: int = 0
    arm: str = ""
    # Time the step loop spent waiting for this decision.
    wait_seconds: float = 0.0
    # The step the remote decision was made for (a draft plan decides many steps).
    decision_step: int = 0

    @property
    def model_key(self) -> str:
        return f"{self.model_name}:{self.model_version}" if self.model_name else ""


@dataclass(frozen=True)
class SequenceInfo:
    """What a policy may know about the sequence it decides for."""

    request_id: str
    # "fp16", "int8" or "nf4": the target's compression, the seed's `comp_enc`.
    compression: str


class SequencePolicy(ABC):
    """Per-sequence gamma state. Subclasses override the hooks they need."""

    # Tokens to draft before `decide` is called (the prefix window); 0 for most policies.
    prefix_tokens: int = 0
    # True: the engine drafts one token at a time and asks `after_token` after each.
    in_step: bool = False

    @abstractmethod
    def decide(self, step: int, prefix_signals: DraftSignals | None) -> GammaDecision: ...

    def after_token(self, step: int, j: int, features: Mapping[str, float], cap: int) -> int | None:
        """Token j (1-based) of `step` was drafted; `features` holds its token features
        and the sequence's history (speckv.draft_plan.PLAN_FEATURES). Return None to draft
        another (the engine stops at min(decided γ, cap) by itself), or how many of the j
        drafted tokens to verify (0: a plain target step)."""
        return None

    def drafted(self, step: int, gamma: int, signals: DraftSignals | None) -> None:  # noqa: B027
        """Drafting of `step` ended; `signals` is None when nothing was drafted (gamma 0)."""

    def verified(self, step: int, gamma: int, accepted: int) -> None:  # noqa: B027
        """The target verified `step`: `accepted` of `gamma` drafted tokens were kept."""

    def finished(self, outcome: StepOutcome) -> None:  # noqa: B027
        """What the step produced (the remote policy reports it to the predictor so an A/B
        test measures every arm; docs/design.md, "Outcomes and A/B tests")."""

    def close(self) -> None:  # noqa: B027
        """The sequence ended; drop anything in flight."""


class HeldOutcome:
    """A sequence's last step outcome, held for its policy's `finished` hook: reported when
    the next step starts, or marked as the sequence's end (`cut`) when none does (cancelled
    between steps, the consumer stopped reading, an error), so every sequence's last
    reported outcome says it ended. One per sequence, for GenerationRun and the batch."""

    __slots__ = ("_outcome", "_policy")

    def __init__(self, policy: SequencePolicy) -> None:
        self._policy = policy
        self._outcome: StepOutcome | None = None

    def step_done(self, outcome: StepOutcome) -> None:
        """A step finished: an outcome that ends the sequence goes out at once."""
        if outcome.sequence_end:
            self._policy.finished(outcome)
        else:
            self._outcome = outcome

    def next_step(self) -> None:
        """Another step starts: the held outcome did not end the sequence."""
        outcome, self._outcome = self._outcome, None
        if outcome is not None:
            self._policy.finished(outcome)

    def cut(self) -> None:
        """No step follows: the held outcome, if any, ends the sequence."""
        outcome, self._outcome = self._outcome, None
        if outcome is not None:
            self._policy.finished(replace(outcome, sequence_end=True))


class GammaPolicy(ABC):
    """Makes per-sequence policies; `spec` is the string a user gave ("fixed:4", ...)."""

    spec: str

    @abstractmethod
    def start(self, seq: SequenceInfo) -> SequencePolicy: ...


class _FixedSequence(SequencePolicy):
    def __init__(self, gamma: int) -> None:
        self._gamma = gamma

    def decide(self, step: int, prefix_signals: DraftSignals | None) -> GammaDecision:
        return GammaDecision(self._gamma, DecisionSource.LOCAL)


class FixedPolicy(GammaPolicy):
    """The same gamma every step; `fixed:0` is plain target decoding (a baseline)."""

    def __init__(self, gamma: int) -> None:
        if gamma < 0:
            raise PolicyError(f"fixed gamma must be ≥ 0, got {gamma}")
        self.gamma = gamma
        self.spec = f"fixed:{gamma}"

    def start(self, seq: SequenceInfo) -> SequencePolicy:
        return _FixedSequence(self.gamma)


class _HeuristicSequence(SequencePolicy):
    def __init__(self, initial: int) -> None:
        self._gamma = initial

    def decide(self, step: int, prefix_signals: DraftSignals | None) -> GammaDecision:
        return GammaDecision(self._gamma, DecisionSource.LOCAL)

    def verified(self, step: int, gamma: int, accepted: int) -> None:
        # Judged on the gamma actually drafted (the engine may cap it near max tokens).
        if gamma > 0 and accepted == gamma:
            self._gamma = self._gamma + 2
        else:
            self._gamma = max(1, self._gamma - 1)


class HeuristicPolicy(GammaPolicy):
    """Hugging Face's `num_assistant_tokens_schedule="heuristic"`: +2 after a fully
    accepted step, −1 otherwise, never below 1; state per sequence."""

    def __init__(self, initial_gamma: int = HEURISTIC_INITIAL_GAMMA) -> None:
        if initial_gamma < 1:
            raise PolicyError(f"heuristic initial gamma must be ≥ 1, got {initial_gamma}")
        self.initial_gamma = initial_gamma
        self.spec = (
            "heuristic"
            if initial_gamma == HEURISTIC_INITIAL_GAMMA
            else f"heuristic:{initial_gamma}"
        )

    def start(self, seq: SequenceInfo) -> SequencePolicy:
        return _HeuristicSequence(self.initial_gamma)


class _HeuristicContextSequence(_HeuristicSequence):
    in_step = True

    def __init__(self, initial: int, min_match: int) -> None:
        super().__init__(initial)
        self._min_match = min_match

    def after_token(self, step: int, j: int, features: Mapping[str, float], cap: int) -> int | None:
        # Stop before the first drafted token that does not continue a context n-gram.
        if features["match_length"] < self._min_match:
            return j - 1
        return None


class HeuristicContextPolicy(GammaPolicy):
    """The heuristic schedule plus prompt lookup's signal, applied inside the step: drafting
    stops before the first token that does not continue an n-gram (n ≥ `min_match`)
    already in the prompt or output; such a token is dropped (one wasted draft forward),
    so a step whose first draft does not continue the context is a plain target step.
    A local baseline for the learned `draft_plan` selector (docs/results.md)."""

    def __init__(self, initial_gamma: int = HEURISTIC_INITIAL_GAMMA, min_match: int = 2) -> None:
        if initial_gamma < 1:
            raise PolicyError(f"heuristic initial gamma must be ≥ 1, got {initial_gamma}")
        self.initial_gamma = initial_gamma
        self.min_match = min_match
        self.spec = "heuristic-ctx"

    def start(self, seq: SequenceInfo) -> SequencePolicy:
        return _HeuristicContextSequence(self.initial_gamma, self.min_match)


class _ExploreSequence(SequencePolicy):
    def __init__(self, rng: random.Random, low: int, high: int) -> None:
        self._rng = rng
        self._low, self._high = low, high

    def decide(self, step: int, prefix_signals: DraftSignals | None) -> GammaDecision:
        return GammaDecision(self._rng.randint(self._low, self._high), DecisionSource.LOCAL)


class ExplorePolicy(GammaPolicy):
    """A uniformly random γ in [1, N] per step, seeded by the request id: the behaviour
    policy for logging training data (every draft length and history state is seen).
    Not for serving."""

    def __init__(self, high: int = 8) -> None:
        if high < 1:
            raise PolicyError(f"explore max gamma must be ≥ 1, got {high}")
        self.high = high
        self.spec = f"explore:{high}"

    def start(self, seq: SequenceInfo) -> SequencePolicy:
        return _ExploreSequence(random.Random(seq.request_id), 1, self.high)


POLICY_FORMS = "remote, fixed:N (N ≥ 0), heuristic or heuristic:N (N ≥ 1), batch-goodput"


def parse_local_policy(spec: str) -> GammaPolicy | None:
    """`fixed:N` / `heuristic[:N]` as a policy; None for `remote`; PolicyError otherwise."""
    text = spec.strip()
    if text == "remote":
        return None
    name, _, arg = text.partition(":")
    if name == "fixed" and arg:
        return FixedPolicy(_int_arg(spec, arg))
    if name == "heuristic":
        return HeuristicPolicy(_int_arg(spec, arg)) if arg else HeuristicPolicy()
    if text == "batch-goodput":  # decode_worker/batching.py (a batching worker's choice)
        from decode_worker.batching import BatchGoodputPolicy

        return BatchGoodputPolicy()
    raise PolicyError(f"unknown policy {spec!r}; use one of: {POLICY_FORMS}")


def _int_arg(spec: str, arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise PolicyError(
            f"policy {spec!r}: {arg!r} is not an integer; use one of: {POLICY_FORMS}"
        ) from None
