"""A/B statistics for `speckv ab`: sum the replicas' arm stats, confidence intervals over
sequences, and a verdict (docs/client.md, "Running an A/B test").

Pure computation on `speckv_client.types` values (numpy for the resampling); the CLI does
the dialling. Everything here is exactly reproducible: replicas are merged in the order of
their identities, sequences in the order of their routing keys, and every random draw comes
from a generator seeded by (seed, the arm's identity).

**Merging replicas.** Each predictor replica counts only the outcomes its own Decide
streams carried. `merge_reports` counts each replica once (by `ArmStatsReport.replica`,
hostname:pid), sums every arm's totals keyed by (model, version, arm), and merges each
arm's per-sequence totals by routing key: a sequence whose worker reconnected to another
replica mid-generation has steps on both, and is one sequence, not two.

**Confidence intervals.** Steps of one sequence are correlated (the same prompt, the same
history), so the unit of resampling is the sequence, never the step. A percentile bootstrap
draws the arm's n sequences with replacement `resamples` times (default 2000) and computes
the ratio of sums on each draw: tokens/s = Σ tokens / Σ (draft + verify seconds), and
tokens/step = Σ tokens / Σ steps. The 95 % interval is the 2.5th to 97.5th percentile of
those draws.

**Comparison.** Each candidate arm is compared with the baseline arm (the arm named
"stable", else the arm with the most sequences) on tokens/s: the relative difference
d = tps(candidate) / tps(baseline) − 1. Its interval pairs draw b of the candidate with draw
b of the baseline; the two arms are resampled independently (their own generators), as two
independent samples of sequences. The verdict is "faster" when the whole interval is above
0, "slower" when it is below 0, else "cannot tell yet".

**How many more sequences.** When the interval contains 0, its half-width on the side of
zero, h (d − low for d > 0, high − d for d < 0), is assumed to shrink like 1/√n as both arms
grow in proportion (the traffic split is fixed). The interval stops containing 0 once
h·√(n / n′) < |d|, i.e. at n′ = n·(h / d)² sequences over the compared arms; K = n′ − n more
(rounded up, at least 1). This is a planning estimate that takes the observed difference at
face value; when |d| is about 0, or K exceeds `MAX_SEQUENCES_NEEDED`, the verdict says
"more than" that cap instead.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from speckv_client.types import ArmStats, ArmStatsReport, SequenceOutcome

CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
MIN_SEQUENCES = 2
"""An arm with fewer sequences has no interval (one sequence has no spread to resample)."""
MAX_SEQUENCES_NEEDED = 1_000_000
"""Above this, "need more than 1,000,000 more sequences": the arms are about equal."""
STABLE_ARM = "stable"
_NO_DIFFERENCE = 1e-9
_MAX_DRAW_CELLS = 2_000_000
"""Indices drawn per numpy call (bounds memory; 16 MB of int64)."""

ArmKey = tuple[str, int, str]
"""(model name, model version, arm)."""


# --- merging replicas ---


@dataclass(frozen=True)
class MergedArm:
    """One arm summed over replicas."""

    stats: ArmStats
    """Totals summed over replicas; `sequences` counts distinct routing keys (see
    `sequences_complete`), `sequence_outcomes` is merged by key and sorted by key."""
    replicas: int
    """Replicas that reported this arm."""
    split_sequences: int
    """Sequences whose steps reached more than one replica (merged into one)."""
    sequences_complete: bool
    """Every replica listed every one of its sequences. When False (a replica caps its list
    at its most recent sequences), `stats.sequences` = the replicas' counts minus the
    duplicates found in the lists, and intervals use only the listed sequences."""

    @property
    def key(self) -> ArmKey:
        return (self.stats.model_name, self.stats.model_version, self.stats.arm)


@dataclass(frozen=True)
class MergedStats:
    arms: tuple[MergedArm, ...]
    """Sorted by (model, version, arm)."""
    replicas: tuple[str, ...]
    """The replica identities summed, sorted; len() is how many were summed."""
    duplicates: tuple[str, ...] = ()
    """Identities that answered more than once (e.g. the same pod by two addresses),
    counted once."""
    fallback_steps: int = 0
    local_steps: int = 0
    rejected_outcomes: int = 0


def _identity(report: ArmStatsReport, index: int) -> str:
    return report.replica or f"(unnamed replica #{index + 1})"


_COUNTS = ("steps", "drafted", "accepted", "tokens")


def _summed_counts(parts: Sequence[SequenceOutcome] | Sequence[ArmStats]) -> dict[str, int]:
    """The step, drafted, accepted and token counts of several replicas' parts, summed."""
    return {name: sum(getattr(p, name) for p in parts) for name in _COUNTS}


def merge_sequences(
    outcomes: Sequence[SequenceOutcome],
) -> tuple[tuple[SequenceOutcome, ...], int]:
    """Merge sequence totals by routing key; returns (sorted by key, keys seen twice or more)."""
    by_key: dict[str, list[SequenceOutcome]] = {}
    for o in outcomes:
        by_key.setdefault(o.routing_key, []).append(o)
    merged: list[SequenceOutcome] = []
    split = 0
    for key in sorted(by_key):
        parts = by_key[key]
        split += len(parts) > 1
        merged.append(
            SequenceOutcome(
                routing_key=key,
                **_summed_counts(parts),
                seconds=math.fsum(p.seconds for p in parts),
                ended=any(p.ended for p in parts),
            )
        )
    return tuple(merged), split


def merge_reports(reports: Sequence[ArmStatsReport]) -> MergedStats:
    """Sum replicas' reports; a replica identity seen twice is counted once (the first)."""
    seen: dict[str, ArmStatsReport] = {}
    duplicates: list[str] = []
    for i, report in enumerate(reports):
        ident = _identity(report, i)
        if ident in seen:
            if ident not in duplicates:
                duplicates.append(ident)
            continue
        seen[ident] = report
    order = sorted(seen)  # a canonical order: float sums do not depend on dial order
    per_arm: dict[ArmKey, list[ArmStats]] = {}
    for ident in order:
        for arm in seen[ident].arms:
            per_arm.setdefault((arm.model_name, arm.model_version, arm.arm), []).append(arm)
    arms: list[MergedArm] = []
    for key in sorted(per_arm):
        parts = per_arm[key]
        listed = [o for p in parts for o in p.sequence_outcomes]
        sequences, split = merge_sequences(listed)
        complete = all(len(p.sequence_outcomes) == p.sequences for p in parts)
        count = (
            len(sequences)
            if complete
            else sum(p.sequences for p in parts) - (len(listed) - len(sequences))
        )
        arms.append(
            MergedArm(
                stats=ArmStats(
                    model_name=key[0],
                    model_version=key[1],
                    arm=key[2],
                    sequences=count,
                    **_summed_counts(parts),
                    draft_seconds=math.fsum(p.draft_seconds for p in parts),
                    verify_seconds=math.fsum(p.verify_seconds for p in parts),
                    sequence_outcomes=sequences,
                ),
                replicas=len(parts),
                split_sequences=split,
                sequences_complete=complete,
            )
        )
    return MergedStats(
        arms=tuple(arms),
        replicas=tuple(order),
        duplicates=tuple(duplicates),
        fallback_steps=sum(seen[i].fallback_steps for i in order),
        local_steps=sum(seen[i].local_steps for i in order),
        rejected_outcomes=sum(seen[i].rejected_outcomes for i in order),
    )


# --- bootstrap ---


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class _Draws:
    """Per-draw sums over a resample of an arm's sequences."""

    tokens: np.ndarray
    seconds: np.ndarray
    steps: np.ndarray

    def tokens_per_second(self) -> np.ndarray:
        return _ratio(self.tokens, self.seconds)

    def tokens_per_step(self) -> np.ndarray:
        return _ratio(self.tokens, self.steps)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def arm_rng(seed: int, key: ArmKey) -> np.random.Generator:
    """The arm's own generator: its draws do not depend on which other arms exist."""
    ident = zlib.crc32(f"{key[0]}\x00{key[1]}\x00{key[2]}".encode())
    return np.random.default_rng([seed, ident])


def _draw(sequences: Sequence[SequenceOutcome], rng: np.random.Generator, resamples: int) -> _Draws:
    ordered = sorted(sequences, key=lambda s: s.routing_key)  # draws independent of order
    cols = np.array(
        [(float(s.tokens), s.seconds, float(s.steps)) for s in ordered], dtype=np.float64
    )
    n = len(cols)
    sums = np.empty((resamples, 3))
    chunk = max(1, _MAX_DRAW_CELLS // n)
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(m, n))
        sums[start : start + m] = cols[idx].sum(axis=1)
    return _Draws(tokens=sums[:, 0], seconds=sums[:, 1], steps=sums[:, 2])


def _percentile_interval(values: np.ndarray) -> Interval | None:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return None
    tail = (1.0 - CONFIDENCE) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return Interval(float(low), float(high))


def bootstrap_interval(
    sequences: Sequence[SequenceOutcome],
    *,
    seed: int = DEFAULT_SEED,
    resamples: int = DEFAULT_RESAMPLES,
    key: ArmKey = ("", 0, ""),
) -> tuple[Interval | None, Interval | None]:
    """95 % percentile intervals of (tokens/s, tokens/step) over `sequences` (≥ 2)."""
    if len(sequences) < MIN_SEQUENCES:
        return None, None
    draws = _draw(sequences, arm_rng(seed, key), resamples)
    return (
        _percentile_interval(draws.tokens_per_second()),
        _percentile_interval(draws.tokens_per_step()),
    )


# --- per-arm summaries and the comparison ---


@dataclass(frozen=True)
class ArmSummary:
    arm: MergedArm
    tokens_per_second_ci: Interval | None
    tokens_per_step_ci: Interval | None
    resampled_sequences: int
    """Sequences the intervals resample (the listed ones)."""
    note: str = ""
    """Why there is no interval, when there is none."""

    @property
    def stats(self) -> ArmStats:
        return self.arm.stats

    @property
    def label(self) -> str:
        return f"{self.stats.arm} (v{self.stats.model_version})"


@dataclass(frozen=True)
class Comparison:
    candidate: ArmSummary
    baseline: ArmSummary
    verdict: str
    relative_difference: float | None = None
    """tokens/s of the candidate over the baseline's, minus 1, on the resampled sequences."""
    ci: Interval | None = None
    tokens_per_step_difference: float | None = None
    tokens_per_step_ci: Interval | None = None
    sequences_needed: int | None = None
    """K, when the verdict is "cannot tell yet" for want of sequences."""
    sequences_needed_capped: bool = False
    """K exceeds `MAX_SEQUENCES_NEEDED` (or the arms look equal)."""


@dataclass(frozen=True)
class ABResult:
    model: str
    merged: MergedStats
    arms: tuple[ArmSummary, ...]
    baseline: ArmSummary | None
    comparisons: tuple[Comparison, ...]
    verdict: str
    seed: int
    resamples: int


def sequences_needed(n: int, difference: float, half_width: float) -> tuple[int, bool]:
    """More sequences (over the compared arms, now n) before the interval excludes 0.

    The interval's half-width on the side of 0 is taken to shrink like 1/√n at a fixed
    split: it excludes 0 at n′ = n·(half_width / difference)². Returns (K, capped).
    """
    if abs(difference) < _NO_DIFFERENCE or not math.isfinite(difference):
        return MAX_SEQUENCES_NEEDED, True
    target = n * (half_width / difference) ** 2
    if not math.isfinite(target) or target - n > MAX_SEQUENCES_NEEDED:
        return MAX_SEQUENCES_NEEDED, True
    return max(1, math.ceil(target - n)), False


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def _summary(arm: MergedArm, seed: int, resamples: int) -> tuple[ArmSummary, _Draws | None]:
    listed = arm.stats.sequence_outcomes
    note = ""
    draws: _Draws | None = None
    if len(listed) < MIN_SEQUENCES:
        have = len(listed) if arm.sequences_complete else f"{len(listed)} listed"
        note = f"has {have} sequence(s); an interval needs at least {MIN_SEQUENCES}"
    elif math.fsum(s.seconds for s in listed) <= 0:
        note = "has no measured step seconds"
    else:
        draws = _draw(listed, arm_rng(seed, arm.key), resamples)
    summary = ArmSummary(
        arm=arm,
        tokens_per_second_ci=(
            _percentile_interval(draws.tokens_per_second()) if draws is not None else None
        ),
        tokens_per_step_ci=(
            _percentile_interval(draws.tokens_per_step()) if draws is not None else None
        ),
        resampled_sequences=len(listed),
        note=note,
    )
    return summary, draws


def _labels(arms: Sequence[ArmSummary]) -> dict[ArmKey, str]:
    """ "v<N>", or "v<N> (arm)" when two arms share a version."""
    versions = [a.stats.model_version for a in arms]
    return {
        a.arm.key: (
            f"v{a.stats.model_version}"
            if versions.count(a.stats.model_version) == 1
            else f"v{a.stats.model_version} ({a.stats.arm})"
        )
        for a in arms
    }


def _ratio_of_sums(sequences: Sequence[SequenceOutcome], attr: str) -> float:
    den = math.fsum(float(getattr(s, attr)) for s in sequences)
    return math.fsum(float(s.tokens) for s in sequences) / den if den > 0 else math.nan


def _compare(
    cand: ArmSummary,
    cand_draws: _Draws | None,
    base: ArmSummary,
    base_draws: _Draws | None,
    label: str,
) -> Comparison:
    for s in (cand, base):
        if s.note:
            return Comparison(cand, base, f"cannot tell yet — arm {s.label} {s.note}")
    assert cand_draws is not None and base_draws is not None
    c_seq, b_seq = cand.stats.sequence_outcomes, base.stats.sequence_outcomes
    d = _ratio_of_sums(c_seq, "seconds") / _ratio_of_sums(b_seq, "seconds") - 1.0
    d_step = _ratio_of_sums(c_seq, "steps") / _ratio_of_sums(b_seq, "steps") - 1.0
    ci = _percentile_interval(cand_draws.tokens_per_second() / base_draws.tokens_per_second() - 1)
    ci_step = _percentile_interval(
        cand_draws.tokens_per_step() / base_draws.tokens_per_step() - 1.0
    )
    k: int | None = None
    capped = False
    if ci is None:
        verdict = "cannot tell yet — no finite tokens/s draws"
    elif ci.low > 0:
        verdict = f"{label} is faster by {_pct(d)} (95 % CI {_pct(ci.low)} to {_pct(ci.high)})"
    elif ci.high < 0:
        verdict = f"{label} is slower by {_pct(-d)} (95 % CI {_pct(-ci.high)} to {_pct(-ci.low)})"
    else:
        half = (d - ci.low) if d >= 0 else (ci.high - d)
        k, capped = sequences_needed(len(c_seq) + len(b_seq), d, half)
        verdict = (
            f"cannot tell yet — need more than {k:,} more sequences"
            if capped
            else f"cannot tell yet — need about {k:,} more sequences"
        )
    return Comparison(
        candidate=cand,
        baseline=base,
        verdict=verdict,
        relative_difference=d,
        ci=ci,
        tokens_per_step_difference=d_step,
        tokens_per_step_ci=ci_step,
        sequences_needed=k,
        sequences_needed_capped=capped,
    )


_VERSION_ARM = re.compile(r"^v(\d+)$")


def choose_baseline(arms: Sequence[ArmSummary], wanted: str | None) -> ArmSummary:
    """`wanted` names an arm ("stable", "canary") or a version ("v3"); None: "stable", else
    the arm with the most sequences. Several matches: the one with the most sequences.

    Raises ValueError naming the arms there are when `wanted` matches none.
    """
    if not arms:
        raise ValueError("there are no arms to choose a baseline from")
    name = wanted or STABLE_ARM
    matches = [a for a in arms if a.stats.arm == name]
    m = _VERSION_ARM.match(name)
    if not matches and m:
        matches = [a for a in arms if a.stats.model_version == int(m.group(1))]
    if not matches:
        if wanted:
            there = ", ".join(a.label for a in arms)
            raise ValueError(f"--baseline {wanted!r} matches no arm; the arms are: {there}")
        matches = list(arms)
    return max(
        matches,
        key=lambda a: (a.stats.sequences, -a.stats.model_version, a.stats.arm),
    )


def analyze(
    model: str,
    merged: MergedStats,
    *,
    baseline: str | None = None,
    seed: int = DEFAULT_SEED,
    resamples: int = DEFAULT_RESAMPLES,
) -> ABResult:
    """Per-arm intervals and every other arm compared with the baseline (see the module)."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    arms = [a for a in merged.arms if a.stats.model_name == model]
    pairs = [_summary(a, seed, resamples) for a in arms]
    summaries = tuple(p[0] for p in pairs)
    draws = {p[0].arm.key: p[1] for p in pairs}

    def result(base: ArmSummary | None, comps: Sequence[Comparison], verdict: str) -> ABResult:
        return ABResult(model, merged, summaries, base, tuple(comps), verdict, seed, resamples)

    if not summaries:  # whatever --baseline names: there is nothing yet to compare
        return result(None, (), f"cannot tell yet — no arm of {model} has reported outcomes")
    base = choose_baseline(summaries, baseline)
    if len(summaries) == 1:
        return result(
            base,
            (),
            f"cannot tell yet — only one arm, {base.label}, has outcomes; "
            "nothing to compare it with",
        )
    labels = _labels(summaries)
    comps = [
        _compare(s, draws[s.arm.key], base, draws[base.arm.key], labels[s.arm.key])
        for s in summaries
        if s is not base
    ]
    return result(base, comps, "; ".join(c.verdict for c in comps))


# --- output ---


def _num(x: float | None) -> float | None:
    """A JSON number, or null for what JSON cannot carry (NaN, infinities) or is absent."""
    return None if x is None or not math.isfinite(x) else float(x)


def result_to_json(
    result: ABResult, replicas: dict[str, object] | None = None
) -> dict[str, object]:
    """The `speckv ab --json` object (docs/client.md)."""
    arms = [
        {
            "arm": s.stats.arm,
            "version": s.stats.model_version,
            "sequences": s.stats.sequences,
            "steps": s.stats.steps,
            "drafted": s.stats.drafted,
            "accepted": s.stats.accepted,
            "tokens": s.stats.tokens,
            "tokens_per_step": _num(s.stats.tokens_per_step),
            "tokens_per_second": _num(
                s.stats.tokens_per_second
                if s.stats.draft_seconds + s.stats.verify_seconds > 0
                else None
            ),
            "ci_low": _num(s.tokens_per_second_ci.low if s.tokens_per_second_ci else None),
            "ci_high": _num(s.tokens_per_second_ci.high if s.tokens_per_second_ci else None),
        }
        for s in result.arms
    ]

    def interval(i: Interval | None) -> list[float | None] | None:
        return None if i is None else [_num(i.low), _num(i.high)]

    comparisons = [
        {
            "candidate": {"arm": c.candidate.stats.arm, "version": c.candidate.stats.model_version},
            "baseline": {"arm": c.baseline.stats.arm, "version": c.baseline.stats.model_version},
            "relative_difference": _num(c.relative_difference),
            "ci": interval(c.ci),
            "tokens_per_step_difference": _num(c.tokens_per_step_difference),
            "tokens_per_step_ci": interval(c.tokens_per_step_ci),
            "candidate_sequences_resampled": c.candidate.resampled_sequences,
            "baseline_sequences_resampled": c.baseline.resampled_sequences,
            "sequences_needed": c.sequences_needed,
            "sequences_needed_capped": c.sequences_needed_capped,
            "verdict": c.verdict,
        }
        for c in result.comparisons
    ]
    out: dict[str, object] = {"model": result.model, "arms": arms, "verdict": result.verdict}
    if replicas is not None:
        out["replicas"] = replicas
    out["comparisons"] = comparisons
    return out


def format_table(result: ABResult) -> list[str]:
    """The arms side by side, one line each (plus a header), for `speckv ab`."""
    header = (
        "arm",
        "version",
        "sequences",
        "steps",
        "drafted",
        "accepted",
        "tokens",
        "tokens/step",
        "acceptance",
        "tokens/s",
        "95 % CI tokens/s",
        "95 % CI tokens/step",
    )

    def ci(i: Interval | None, digits: int) -> str:
        return "-" if i is None else f"{i.low:.{digits}f} to {i.high:.{digits}f}"

    rows = [header]
    for s in result.arms:
        a = s.stats
        rows.append(
            (
                a.arm,
                f"v{a.model_version}",
                f"{a.sequences}",
                f"{a.steps}",
                f"{a.drafted}",
                f"{a.accepted}",
                f"{a.tokens}",
                f"{a.tokens_per_step:.3f}",
                f"{a.acceptance_rate:.3f}",
                f"{a.tokens_per_second:.1f}",
                ci(s.tokens_per_second_ci, 1),
                ci(s.tokens_per_step_ci, 3),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    lines = [line(r) for r in rows]
    for s in result.arms:
        if not s.arm.sequences_complete:
            lines.append(
                f"note: {s.label}: intervals resample the {s.resampled_sequences} most recent "
                f"sequences the replicas list, of {s.stats.sequences}"
            )
        if s.arm.split_sequences:
            lines.append(
                f"note: {s.label}: {s.arm.split_sequences} sequence(s) reached more than one "
                "replica (merged by routing key)"
            )
    return lines
