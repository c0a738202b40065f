"""What every fixed draft length would have produced on the text the batch really decoded
(`batch-goodput`'s token estimate; docs/design.md, "The batch's draft length", and
docs/worker.md, "Batching").

With greedy decoding, whether a step accepts its drafted tokens is a function of one
sequence of booleans per row: m[t] is true when the draft's argmax after the true prefix
seq[:t] equals the target's token seq[t]. A step of draft length γ starting at generated
position p accepts a = the number of leading trues in m[p : p + γ], produces a + 1 tokens
and the next step starts at p + a + 1 — exactly (tests/worker/test_match_replay.py checks
it against real runs at fixed γ). The draft computes its argmax after every true prefix
anyway (catch-up feeds and accepted drafts), so m is observed for every generated token of
every greedy row whatever γ the batch ran, and a fixed-γ run can be replayed over it for
every γ at once.

Why replay rather than a model of per-position acceptance rates: on the demo pair a drafted
position's acceptance depends on where the step started (after a fully accepted step vs
after a rejection, differently for each γ; `benchmarks/acceptance_alignment.py`), so rates
pooled over positions priced γ = 1 and γ = 2 wrongly against each other (docs/notes.md,
"Batching"). A replay of fixed γ over the same text carries that dependence, needs no
probing of other widths, and compares every γ on the same prompts. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class MatchTrack:
    """One greedy row's agreement between draft and target, position by position.

    Positions are indices into the row's full sequence (prompt + generated). `predict` is
    given the draft's argmax after a prefix that is known to be the true one; `resolve`
    turns those into matches for the generated positions as the sequence grows."""

    __slots__ = ("cursors", "matches", "preds", "start", "steps", "tokens")

    def __init__(self, start: int, gammas: Sequence[int]) -> None:
        self.start = start  # index of the first generated token (the prompt's length)
        self.preds: dict[int, int] = {}  # q -> the draft's argmax after seq[: q + 1]
        self.matches: list[bool] = []  # m for positions start, start + 1, ...
        self.cursors = {g: 0 for g in gammas}  # where each γ's next replayed step starts
        # This row's own replayed steps per γ so far, and the tokens they produced.
        self.steps = dict.fromkeys(gammas, 0)
        self.tokens = dict.fromkeys(gammas, 0)

    def predict(self, position: int, token: int) -> None:
        """The draft's argmax after the true prefix seq[: position + 1]; positions in the
        prompt or already resolved are ignored (nothing would ever take them out)."""
        if position >= self.start + len(self.matches) - 1:
            self.preds[position] = token

    def resolve(self, seq: Sequence[int]) -> None:
        """Matches for every generated position whose preceding prediction is known, in
        order (a position whose prediction is still missing, because the draft has not
        caught up on it, waits)."""
        t = self.start + len(self.matches)
        while t < len(seq):
            pred = self.preds.pop(t - 1, None)
            if pred is None:
                break
            self.matches.append(pred == seq[t])
            t += 1


def replay_steps(matches: Sequence[bool], gamma: int, cursor: int) -> tuple[list[int], int]:
    """Steps of a fixed draft length `gamma` over `matches` from index `cursor`: the tokens
    each complete step produces (accepted + 1) and the cursor after them. A step is
    complete once its outcome is known: a false within its γ positions, or γ trues."""
    out: list[int] = []
    n = len(matches)
    while True:
        a = 0
        while a < gamma and cursor + a < n and matches[cursor + a]:
            a += 1
        if a < gamma and cursor + a >= n:
            return out, cursor  # outcome not known yet
        out.append(a + 1)
        cursor += a + 1


class ReplayYield:
    """Tokens per step of each draft length in `gammas`, replayed over the worker's recent
    greedy rows and pooled (each replayed step's weight decays by `decay` per later step of
    the same γ). `expected(prior)` blends the replayed mean with `prior` (the position-rate
    model's estimate) as `prior_steps` pseudo-steps, so a worker's first steps lean on it."""

    def __init__(self, gammas: Sequence[int], decay: float, prior_steps: float = 4.0) -> None:
        if not gammas or min(gammas) < 1:
            raise ValueError(f"replayed draft lengths must be ≥ 1, got {list(gammas)}")
        self.gammas = tuple(sorted(set(gammas)))
        self.decay = decay
        self.prior_steps = prior_steps
        self._tokens = dict.fromkeys(self.gammas, 0.0)
        self._steps = dict.fromkeys(self.gammas, 0.0)

    def track(self, prompt_len: int) -> MatchTrack:
        return MatchTrack(prompt_len, self.gammas)

    def advance(self, track: MatchTrack) -> None:
        """Add the replayed steps `track`'s new matches complete, for every γ."""
        d = self.decay
        for g in self.gammas:
            done, track.cursors[g] = replay_steps(track.matches, g, track.cursors[g])
            track.steps[g] += len(done)
            track.tokens[g] += sum(done)
            tok, st = self._tokens[g], self._steps[g]
            for n in done:
                tok = tok * d + n
                st = st * d + 1.0
            self._tokens[g], self._steps[g] = tok, st
        # The matches every γ's cursor has passed are no longer needed.
        low = min(track.cursors.values())
        if low > 256:
            del track.matches[:low]
            track.start += low
            for g in self.gammas:
                track.cursors[g] -= low

    def steps(self, gamma: int) -> float:
        """The (decayed) number of replayed steps behind γ's estimate."""
        return self._steps.get(gamma, 0.0)

    def expected(self, prior: Sequence[float]) -> list[float]:
        """Tokens per step at γ = 0 … len(prior) − 1 (index γ): 1 at γ = 0, else the
        replayed mean shrunk towards prior[γ]. γ not replayed keep the prior."""
        return _shrunk(self._tokens, self._steps, prior, self.prior_steps)

    @staticmethod
    def row_expected(track: MatchTrack, pooled: Sequence[float], prior_steps: float) -> list[float]:
        """One row's tokens per step at γ = 0 … len(pooled) − 1: each γ's replay over this
        row's own text so far, shrunk towards the pooled estimate `pooled[γ]` by
        `prior_steps` pseudo-steps (γ not replayed keep the pooled value). A row's text has
        its own structure — on the demo pair some prompts' agreement is periodic, so that
        γ = 1 makes nearly as many tokens per step as γ = 2 there, and others reward longer
        drafts — which the pooled mean averages away (docs/design.md, "The batch's draft
        length")."""
        return _shrunk(track.tokens, track.steps, pooled, prior_steps)


def _shrunk(
    tokens: Mapping[int, float], steps: Mapping[int, float], prior: Sequence[float], k: float
) -> list[float]:
    """Tokens per step at γ = 0 … len(prior) − 1: 1 at γ = 0; else the replayed
    tokens[γ] / steps[γ] shrunk towards prior[γ] by k pseudo-steps, or prior[γ] itself
    where γ has no replayed steps."""
    out = [1.0]
    for g in range(1, len(prior)):
        st = steps.get(g)
        out.append((tokens[g] + k * prior[g]) / (st + k) if st else prior[g])
    return out
