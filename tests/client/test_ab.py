"""`speckv_client.ab`: merging replicas' arm stats, bootstrap intervals over sequences,
the comparison and its verdict. Pure computation; the CLI against real servers is in
test_ab_cli.py."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
from speckv_client import ab
from speckv_client.types import ArmStats, ArmStatsReport, SequenceOutcome

pytestmark = pytest.mark.timeout(120)

MODEL = "m"
FASTER = re.compile(r"^v(\d+) is faster by (\d+\.\d) % \(95 % CI (-?\d+\.\d) % to (-?\d+\.\d) %\)$")
SLOWER = re.compile(r"^v(\d+) is slower by (\d+\.\d) % \(95 % CI (-?\d+\.\d) % to (-?\d+\.\d) %\)$")
NEED = re.compile(r"^cannot tell yet — need about ([\d,]+) more sequences$")


def seq(key: str, steps: int, tokens: int, seconds: float, drafted: int = 0) -> SequenceOutcome:
    return SequenceOutcome(
        routing_key=key,
        steps=steps,
        drafted=drafted or 3 * steps,
        accepted=tokens - steps,
        tokens=tokens,
        seconds=seconds,
        ended=True,
    )


def arm_of(
    name: str, version: int, seqs: list[SequenceOutcome], *, listed: int | None = None
) -> ArmStats:
    """An arm whose totals are its sequences' sums (draft seconds 1/4 of the seconds);
    `listed` keeps only the last that many sequences in the list, as a capped replica does."""
    seconds = math.fsum(s.seconds for s in seqs)
    return ArmStats(
        model_name=MODEL,
        model_version=version,
        arm=name,
        sequences=len(seqs),
        steps=sum(s.steps for s in seqs),
        drafted=sum(s.drafted for s in seqs),
        accepted=sum(s.accepted for s in seqs),
        tokens=sum(s.tokens for s in seqs),
        draft_seconds=seconds / 4,
        verify_seconds=seconds - seconds / 4,
        sequence_outcomes=tuple(seqs if listed is None else seqs[len(seqs) - listed :]),
    )


def synthetic(
    prefix: str, n: int, tokens_per_second: float, rng: np.random.Generator
) -> list[SequenceOutcome]:
    """n sequences of varied length whose speed scatters ±30 % around tokens_per_second."""
    out = []
    for i in range(n):
        steps = int(rng.integers(8, 64))
        tokens = int(steps * rng.uniform(1.5, 3.5))
        speed = tokens_per_second * rng.uniform(0.7, 1.3)
        out.append(seq(f"{prefix}-{i}", steps, tokens, tokens / speed))
    return out


def analyze(*arms: ArmStats, **kw: object) -> ab.ABResult:
    report = ArmStatsReport(arms=tuple(arms), replica="host:1")
    return ab.analyze(MODEL, ab.merge_reports([report]), **kw)  # type: ignore[arg-type]


# --- merging ---


def test_merge_sums_arms_and_merges_a_sequence_split_over_two_replicas() -> None:
    # Sequence "b" reconnected: 3 steps on replica 1, 2 steps on replica 2.
    r1 = ArmStatsReport(
        arms=(
            arm_of("stable", 1, [seq("a", 4, 9, 0.25), seq("b", 3, 7, 0.125)]),
            arm_of("canary", 2, [seq("c", 5, 11, 0.5)]),
        ),
        fallback_steps=3,
        local_steps=1,
        rejected_outcomes=2,
        replica="pod-a:7",
    )
    r2 = ArmStatsReport(
        arms=(arm_of("stable", 1, [seq("b", 2, 5, 0.0625), seq("d", 6, 13, 0.5)]),),
        fallback_steps=4,
        replica="pod-b:7",
    )
    merged = ab.merge_reports([r2, r1])
    assert merged.replicas == ("pod-a:7", "pod-b:7")
    assert merged.duplicates == ()
    assert (merged.fallback_steps, merged.local_steps, merged.rejected_outcomes) == (7, 1, 2)
    assert [a.key for a in merged.arms] == [(MODEL, 1, "stable"), (MODEL, 2, "canary")]
    stable, canary = merged.arms
    s = stable.stats
    # Hand-computed: a + b + b' + d.
    assert (s.sequences, s.steps, s.tokens) == (3, 4 + 3 + 2 + 6, 9 + 7 + 5 + 13)
    assert s.drafted == 3 * (4 + 3 + 2 + 6)
    assert s.accepted == (9 - 4) + (7 - 3) + (5 - 2) + (13 - 6)
    assert s.draft_seconds + s.verify_seconds == pytest.approx(0.25 + 0.125 + 0.0625 + 0.5)
    assert (stable.replicas, stable.split_sequences, stable.sequences_complete) == (2, 1, True)
    assert [o.routing_key for o in s.sequence_outcomes] == ["a", "b", "d"]
    b = s.sequence_outcomes[1]
    assert (b.steps, b.tokens, b.drafted, b.accepted, b.seconds) == (5, 12, 15, 7, 0.1875)
    assert (canary.replicas, canary.split_sequences, canary.stats.sequences) == (1, 0, 1)
    assert s.tokens_per_step == pytest.approx(34 / 15)


def test_a_replica_answering_twice_is_counted_once() -> None:
    r = ArmStatsReport(arms=(arm_of("stable", 1, [seq("a", 4, 9, 0.25)]),), replica="pod-a:7")
    other = ArmStatsReport(arms=(arm_of("stable", 1, [seq("b", 2, 5, 0.5)]),), replica="pod-b:9")
    # The same pod by its IPv4 and IPv6 address, plus the other pod.
    merged = ab.merge_reports([r, other, r])
    assert merged.replicas == ("pod-a:7", "pod-b:9")
    assert merged.duplicates == ("pod-a:7",)
    s = merged.arms[0].stats
    assert (s.sequences, s.steps, s.tokens) == (2, 6, 14)
    # Replicas without an identity cannot be deduplicated: each is counted, and named so.
    anon = ab.merge_reports([replace(r, replica=""), replace(r, replica="")])
    assert len(anon.replicas) == 2 and anon.arms[0].stats.steps == 8


def test_capped_sequence_lists_count_every_sequence_and_say_so() -> None:
    seqs = [seq(f"k{i}", 2, 5, 0.1) for i in range(10)]
    r1 = ArmStatsReport(arms=(arm_of("stable", 1, seqs, listed=4),), replica="a")
    # Replica b saw the last listed sequence too (a reconnect), and one of its own.
    r2 = ArmStatsReport(arms=(arm_of("stable", 1, [seqs[9], seq("z", 1, 2, 0.1)]),), replica="b")
    arm = ab.merge_reports([r1, r2]).arms[0]
    assert not arm.sequences_complete
    assert arm.stats.sequences == 10 + 2 - 1
    assert len(arm.stats.sequence_outcomes) == 5
    res = ab.analyze(MODEL, ab.merge_reports([r1, r2]))
    assert "intervals resample the 5 most recent sequences the replicas list, of 11" in "\n".join(
        ab.format_table(res)
    )


def test_merge_and_analysis_do_not_depend_on_the_order_replicas_answered() -> None:
    rng = np.random.default_rng(3)
    reports = [
        ArmStatsReport(
            arms=(
                arm_of("stable", 1, synthetic(f"s{r}", 40, 100.0, rng)),
                arm_of("canary", 2, synthetic(f"c{r}", 10, 104.0, rng)),
            ),
            replica=f"pod-{r}:1",
        )
        for r in range(3)
    ]
    forward = ab.merge_reports(reports)
    backward = ab.merge_reports(reports[::-1])
    assert forward == backward
    a = ab.result_to_json(ab.analyze(MODEL, forward, seed=11))
    b = ab.result_to_json(ab.analyze(MODEL, backward, seed=11))
    assert json.dumps(a) == json.dumps(b)


# --- intervals and verdicts ---


def test_intervals_are_exactly_reproducible_per_seed_and_per_arm() -> None:
    rng = np.random.default_rng(5)
    stable = arm_of("stable", 1, synthetic("s", 60, 100.0, rng))
    canary = arm_of("canary", 2, synthetic("c", 20, 103.0, rng))
    one = analyze(stable, canary, seed=7)
    two = analyze(stable, canary, seed=7)
    assert ab.result_to_json(one) == ab.result_to_json(two)
    other = analyze(stable, canary, seed=8)
    assert other.arms[0].tokens_per_second_ci != one.arms[0].tokens_per_second_ci
    # An arm's interval is its own: it does not move when another arm comes or goes.
    alone = analyze(stable, seed=7)
    assert alone.arms[0].tokens_per_second_ci == one.arms[0].tokens_per_second_ci
    # ... and equals the public one-arm helper's.
    tps, tpstep = ab.bootstrap_interval(stable.sequence_outcomes, seed=7, key=(MODEL, 1, "stable"))
    assert (tps, tpstep) == (one.arms[0].tokens_per_second_ci, one.arms[0].tokens_per_step_ci)
    for s in one.arms:
        ci = s.tokens_per_second_ci
        assert ci is not None and ci.low < s.stats.tokens_per_second < ci.high
        step_ci = s.tokens_per_step_ci
        assert step_ci is not None and step_ci.low < s.stats.tokens_per_step < step_ci.high


def test_a_clearly_faster_arm_is_reported_faster_with_an_interval_above_zero() -> None:
    rng = np.random.default_rng(1)
    stable = arm_of("stable", 1, synthetic("s", 80, 100.0, rng))
    canary = arm_of("canary", 2, synthetic("c", 20, 125.0, rng))
    res = analyze(stable, canary)
    (comp,) = res.comparisons
    assert comp.baseline.stats.arm == "stable" and comp.candidate.stats.arm == "canary"
    assert comp.ci is not None and comp.ci.low > 0
    m = FASTER.match(res.verdict)
    assert m, res.verdict
    assert m.group(1) == "2"
    assert float(m.group(2)) == round(100 * comp.relative_difference, 1)  # type: ignore[operator]
    assert float(m.group(3)) == round(100 * comp.ci.low, 1)
    assert float(m.group(3)) < float(m.group(2)) < float(m.group(4))
    # Seen from the other side: stable is slower, its interval stated as a slowdown.
    back = analyze(stable, canary, baseline="canary")
    m = SLOWER.match(back.verdict)
    assert m, back.verdict
    assert m.group(1) == "1"
    assert 0 < float(m.group(3)) < float(m.group(2)) < float(m.group(4))


def test_identical_arms_cannot_be_told_apart() -> None:
    rng = np.random.default_rng(2)
    seqs = synthetic("x", 30, 100.0, rng)
    twin = [replace(s, routing_key=s.routing_key + "-twin") for s in seqs]
    res = analyze(arm_of("stable", 1, seqs), arm_of("canary", 2, twin))
    (comp,) = res.comparisons
    assert comp.relative_difference == 0.0
    assert comp.ci is not None and comp.ci.low < 0 < comp.ci.high
    assert res.verdict == "cannot tell yet — need more than 1,000,000 more sequences"
    assert comp.sequences_needed_capped


def test_same_speed_arms_ask_for_more_sequences() -> None:
    rng = np.random.default_rng(4)
    stable = arm_of("stable", 1, synthetic("s", 30, 100.0, rng))
    canary = arm_of("canary", 2, synthetic("c", 30, 101.0, rng))
    res = analyze(stable, canary)
    m = NEED.match(res.verdict)
    assert m, res.verdict
    (comp,) = res.comparisons
    assert int(m.group(1).replace(",", "")) == comp.sequences_needed
    assert comp.sequences_needed is not None and comp.sequences_needed >= 1


def test_coverage_sanity_same_distribution_rarely_called_different() -> None:
    """Two arms drawn from one distribution: a 95 % interval should exclude 0 in about 5 %
    of experiments; a broken bootstrap (steps as the unit, a wrong tail) lands far off."""
    rng = np.random.default_rng(12345)
    wrong = 0
    trials = 120
    diffs, widths = [], []
    for t in range(trials):
        stable = arm_of("stable", 1, synthetic(f"s{t}", 25, 100.0, rng))
        canary = arm_of("canary", 2, synthetic(f"c{t}", 25, 100.0, rng))
        res = analyze(stable, canary, seed=t, resamples=400)
        wrong += not res.verdict.startswith("cannot tell yet")
        comp = res.comparisons[0]
        assert comp.ci is not None and comp.relative_difference is not None
        diffs.append(comp.relative_difference)
        widths.append(comp.ci.high - comp.ci.low)
    assert wrong <= 0.12 * trials, wrong
    # The intervals are as wide as the spread of the difference across experiments:
    # half-width ~ 1.96 sd (too narrow an interval, e.g. a wrong tail, fails here).
    half = np.mean(widths) / 2
    assert 0.75 < half / (1.96 * np.std(diffs)) < 1.33, (half, np.std(diffs))
    # And a real 40 % difference is called nearly always.
    found = 0
    for t in range(40):
        stable = arm_of("stable", 1, synthetic(f"s{t}", 25, 100.0, rng))
        canary = arm_of("canary", 2, synthetic(f"c{t}", 25, 140.0, rng))
        found += bool(FASTER.match(analyze(stable, canary, seed=t, resamples=400).verdict))
    assert found >= 38, found


def test_sequences_needed_shrinks_as_sequences_accumulate() -> None:
    # The formula: at a fixed difference, the half-width shrinking like 1/sqrt(n).
    ks = [ab.sequences_needed(n, 0.02, 0.08 * math.sqrt(100 / n))[0] for n in (100, 200, 400)]
    assert ks == sorted(ks, reverse=True) and len(set(ks)) == 3
    assert ks[0] == math.ceil(100 * (0.08 / 0.02) ** 2 - 100)  # 1500
    assert ab.sequences_needed(100, 0.0, 0.1) == (ab.MAX_SEQUENCES_NEEDED, True)
    assert ab.sequences_needed(100, 1e-6, 0.1) == (ab.MAX_SEQUENCES_NEEDED, True)
    assert ab.sequences_needed(100, 0.05, 0.0499) == (1, False)
    # Through the bootstrap: the same sequences seen 1, 2, 3 times (same difference,
    # narrower interval) need fewer and fewer more; 4 times (160 > 40 + K(40)) decides.
    rng = np.random.default_rng(9)
    s_seqs = synthetic("s", 20, 100.0, rng)
    c_seqs = synthetic("c", 20, 108.0, rng)
    needed: list[int | None] = []
    verdicts = []
    for copies in (1, 2, 3, 4):
        s = [replace(x, routing_key=f"{x.routing_key}/{i}") for i in range(copies) for x in s_seqs]
        c = [replace(x, routing_key=f"{x.routing_key}/{i}") for i in range(copies) for x in c_seqs]
        res = analyze(arm_of("stable", 1, s), arm_of("canary", 2, c))
        needed.append(res.comparisons[0].sequences_needed)
        verdicts.append(res.verdict)
    k1, k2, k3, k4 = needed
    assert k1 is not None and k2 is not None and k3 is not None, verdicts
    assert k1 > k2 > k3 and 40 + k1 < 160, needed
    assert k4 is None and FASTER.match(verdicts[3]), verdicts


def test_no_arms_one_arm_and_too_few_sequences_say_so() -> None:
    none = analyze()
    assert none.verdict == f"cannot tell yet — no arm of {MODEL} has reported outcomes"
    assert none.arms == () and none.comparisons == ()
    rng = np.random.default_rng(6)
    stable = arm_of("stable", 1, synthetic("s", 10, 100.0, rng))
    one = analyze(stable)
    assert one.verdict == (
        "cannot tell yet — only one arm, stable (v1), has outcomes; nothing to compare it with"
    )
    lonely = arm_of("canary", 2, [seq("c", 10, 30, 0.1)])
    res = analyze(stable, lonely)
    assert res.verdict == (
        "cannot tell yet — arm canary (v2) has 1 sequence(s); an interval needs at least 2"
    )
    assert res.arms[1].tokens_per_second_ci is None
    assert ab.result_to_json(res)["arms"][1]["ci_low"] is None  # type: ignore[index]
    unmeasured = arm_of("canary", 2, [seq("c", 10, 30, 0.0), seq("d", 10, 30, 0.0)])
    res = analyze(stable, unmeasured)
    assert res.verdict == "cannot tell yet — arm canary (v2) has no measured step seconds"
    arm_json = ab.result_to_json(res)["arms"][1]  # type: ignore[index]
    assert arm_json["tokens_per_second"] is None  # not 0 tokens/s: not measured


def test_baseline_choice() -> None:
    rng = np.random.default_rng(8)
    big = arm_of("v1", 1, synthetic("a", 30, 100.0, rng))
    small = arm_of("v2", 2, synthetic("b", 10, 100.0, rng))
    # No "stable" arm: the arm with the most sequences.
    assert analyze(big, small).baseline.stats.arm == "v1"  # type: ignore[union-attr]
    stable = arm_of("stable", 3, synthetic("c", 5, 100.0, rng))
    assert analyze(big, small, stable).baseline.stats.arm == "stable"  # type: ignore[union-attr]
    assert analyze(big, small, stable, baseline="v2").baseline.stats.arm == "v2"  # type: ignore[union-attr]
    # "v3" names the arm serving version 3 when no arm is called that.
    assert analyze(big, stable, baseline="v3").baseline.stats.arm == "stable"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"--baseline 'canary' matches no arm; the arms are: v1"):
        analyze(big, small, baseline="canary")
    assert analyze(baseline="stable").verdict.startswith("cannot tell yet — no arm of")


def test_two_arms_on_one_version_are_labelled_by_arm() -> None:
    rng = np.random.default_rng(10)
    stable = arm_of("stable", 1, synthetic("s", 40, 100.0, rng))
    pinned = arm_of("pinned", 1, synthetic("p", 40, 140.0, rng))
    res = analyze(stable, pinned)
    assert res.verdict.startswith("v1 (pinned) is faster by "), res.verdict


def test_json_object_has_the_documented_keys() -> None:
    rng = np.random.default_rng(11)
    res = analyze(
        arm_of("stable", 1, synthetic("s", 12, 100.0, rng)),
        arm_of("canary", 2, synthetic("c", 12, 90.0, rng)),
    )
    obj = ab.result_to_json(res, {"summed": 1})
    json.dumps(obj, allow_nan=False)
    assert list(obj) == ["model", "arms", "verdict", "replicas", "comparisons"]
    arms = obj["arms"]
    assert isinstance(arms, list)
    for a in arms:
        assert list(a) == [
            "arm",
            "version",
            "sequences",
            "steps",
            "drafted",
            "accepted",
            "tokens",
            "tokens_per_step",
            "tokens_per_second",
            "ci_low",
            "ci_high",
        ]
    assert arms[0]["tokens_per_step"] == res.arms[0].stats.tokens / res.arms[0].stats.steps


def test_large_arms_are_resampled_in_bounded_chunks() -> None:
    """20,000 sequences x 2,000 draws would be 320 MB of indices in one call."""
    rng = np.random.default_rng(13)
    n = 20_000
    tokens = rng.integers(20, 200, size=n)
    seqs = [
        seq(f"k{i}", int(t // 2), int(t), float(t) / 100.0 * rng.uniform(0.9, 1.1))
        for i, t in enumerate(tokens)
    ]
    res = analyze(arm_of("stable", 1, seqs), resamples=200)
    ci = res.arms[0].tokens_per_second_ci
    assert ci is not None and ci.low < res.arms[0].stats.tokens_per_second < ci.high
    assert ci.high - ci.low < 1.0  # 20,000 sequences pin 100 tokens/s down tightly
