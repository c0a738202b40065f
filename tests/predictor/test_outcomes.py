"""Step outcomes and arm statistics: the tracker's arithmetic by hand, then over a real server.

The tracker tests feed hand-written outcomes and compare every total with numbers computed
by hand in the test; the server tests send outcomes on real Decide streams (127.0.0.1,
port 0) and read them back through GetArmStats, the client library and /metrics values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from speckv.v1 import common_pb2 as cpb
from speckv.v1 import decoder_pb2 as dpb
from speckv.v1 import predictor_pb2 as pb
from speckv.v1 import predictor_pb2_grpc as pb_grpc
from speckv_client.errors import AdminAuthError, InvalidArgument, NotFound
from speckv_client.predictor import PredictorClient
from speckv_client.types import DecisionSource, StepOutcome

from predictor_service.outcomes import ArmStatsTracker, OutcomeConfig, ShadowScores
from predictor_service.server import PredictorServer
from tests.predictor.helpers import ADMIN, MODEL, TOKEN, decide_one, request

pytestmark = pytest.mark.timeout(120)

REMOTE, FALLBACK, LOCAL = DecisionSource.REMOTE, DecisionSource.FALLBACK, DecisionSource.LOCAL


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def out(
    key: str,
    step: int,
    drafted: int,
    accepted: int,
    tokens: int,
    draft: float = 0.01,
    verify: float = 0.02,
    *,
    source: DecisionSource = REMOTE,
    model: str = "m",
    version: int = 1,
    arm: str = "stable",
    end: bool = False,
    decision_step: int | None = None,
) -> StepOutcome:
    remote = source == REMOTE
    return StepOutcome(
        routing_key=key,
        step=step,
        source=source,
        drafted=drafted,
        accepted=accepted,
        tokens=tokens,
        draft_seconds=draft,
        verify_seconds=verify,
        model_name=model if remote else "",
        model_version=version if remote else 0,
        arm=arm if remote else "",
        decision_step=step if decision_step is None else decision_step,
        sequence_end=end,
    )


# ----- the tracker on its own ------------------------------------------------------------

# Two arms, three sequences, plus steps no arm decided. By hand:
#   stable (m v1): a: (4,3,4,.010,.020) (2,2,3,.005,.015) (0,0,1,0,.010, end)
#                  b: (4,1,2,.010,.020)
#     steps 4, drafted 10, accepted 6, tokens 10, draft .025, verify .065, 2 sequences
#   canary (m v2): c: (8,8,9,.020,.030) (8,0,1,.020,.030, end)
#     steps 2, drafted 16, accepted 8, tokens 10, draft .040, verify .060, 1 sequence
#   fallback 2 (a and c), local 1 (b): never credited.
HAND = [
    out("a", 1, 4, 3, 4, 0.010, 0.020),
    out("c", 1, 8, 8, 9, 0.020, 0.030, version=2, arm="canary"),
    out("a", 2, 2, 2, 3, 0.005, 0.015),
    out("a", 3, 0, 0, 1, 0.0, 0.010, source=FALLBACK),
    out("b", 1, 4, 1, 2, 0.010, 0.020),
    out("b", 2, 6, 6, 7, 0.5, 0.5, source=LOCAL),
    out("c", 2, 8, 0, 1, 0.020, 0.030, version=2, arm="canary", end=True),
    out("c", 3, 2, 1, 2, 0.1, 0.1, source=FALLBACK),
    out("a", 4, 0, 0, 1, 0.0, 0.010, end=True),
]


def test_arm_totals_are_the_hand_computed_sums_and_fallback_local_are_never_credited() -> None:
    t = ArmStatsTracker(clock=Clock())
    summary = t.record(HAND)
    assert (summary.fallback, summary.local, summary.rejected) == (2, 1, {})
    r = t.report("", 0.0, include_sequences=True, replica="r1")
    assert [(a.model_name, a.model_version, a.arm) for a in r.arms] == [
        ("m", 1, "stable"),
        ("m", 2, "canary"),
    ]
    stable, canary = r.arms
    assert (stable.sequences, stable.steps, stable.drafted, stable.accepted, stable.tokens) == (
        2,
        4,
        10,
        6,
        10,
    )
    assert stable.draft_seconds == pytest.approx(0.025)
    assert stable.verify_seconds == pytest.approx(0.065)
    assert stable.tokens_per_step == 2.5
    assert stable.acceptance_rate == 0.6
    assert stable.tokens_per_second == pytest.approx(10 / 0.09)
    assert (canary.sequences, canary.steps, canary.drafted, canary.accepted, canary.tokens) == (
        1,
        2,
        16,
        8,
        10,
    )
    assert (canary.draft_seconds, canary.verify_seconds) == pytest.approx((0.04, 0.06))
    seqs = {s.routing_key: s for s in stable.sequence_outcomes}
    assert (seqs["a"].steps, seqs["a"].drafted, seqs["a"].accepted, seqs["a"].tokens) == (
        3,
        6,
        5,
        8,
    )
    assert seqs["a"].seconds == pytest.approx(0.06) and seqs["a"].ended
    assert (seqs["b"].steps, seqs["b"].tokens, seqs["b"].ended) == (1, 2, False)
    assert [s.routing_key for s in canary.sequence_outcomes] == ["c"]
    assert canary.sequence_outcomes[0].ended
    # the per-arm summary the metrics are fed carries the same sums
    d = summary.arms[("m", 1, "stable")]
    assert (d.steps, d.drafted, d.accepted, d.tokens, d.sequences) == (4, 10, 6, 10, 2)
    assert d.seconds == pytest.approx(0.09)
    assert (r.fallback_steps, r.local_steps, r.rejected_outcomes, r.replica) == (2, 1, 0, "r1")
    # one model only; no sequences when not asked
    only = t.report("m", 0.0, include_sequences=False)
    assert all(not a.sequence_outcomes for a in only.arms) and len(only.arms) == 2
    assert t.report("other", 0.0).arms == ()


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (out("k", 1, 2, 3, 3), "accepted"),  # accepted > drafted
        (out("k", 1, 2, 2, 4), "tokens"),  # tokens > drafted + 1
        (out("k", 1, 2, 1, 2, draft=-0.1), "draft_seconds"),
        (out("k", 1, 2, 1, 2, verify=math.nan), "verify_seconds"),
        (out("k", 1, 2, 1, 2, draft=math.inf), "draft_seconds"),
        (out("", 1, 2, 1, 2), "routing_key"),
        (out("k" * 300, 1, 2, 1, 2), "routing_key"),
        (out("k", 1, 2, 1, 2, model=""), "model_name"),
        (out("k", 1, 2, 1, 2, model="m" * 300), "model_name"),
        (out("k", 1, 2, 1, 2, arm=""), "arm"),
        (out("k", 1, 2, 1, 2, arm="a" * 300), "arm"),
        (out("k", 1, 2, 1, 2, version=0), "model_version"),
        (out("k", 1, 65, 1, 2), "drafted"),  # over the largest gamma a decision asks
        (replace(out("k", 1, 2, 1, 2), source=DecisionSource.UNSPECIFIED), "source"),
        (out("k", 1, 2, 3, 3, source=FALLBACK), "accepted"),  # checked for every source
    ],
)
def test_a_malformed_outcome_is_rejected_counted_and_never_credited(
    bad: StepOutcome, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    t = ArmStatsTracker(clock=Clock())
    good = out("g", 1, 4, 2, 3)
    with caplog.at_level(logging.WARNING, logger="predictor_service.outcomes"):
        summary = t.record([good, bad])
    assert summary.rejected == {"invalid": 1}
    r = t.report()
    assert r.rejected_outcomes == 1
    assert (r.fallback_steps, r.local_steps) == (0, 0)
    ((arm,),) = [r.arms]
    assert (arm.steps, arm.drafted, arm.accepted, arm.tokens) == (1, 4, 2, 3)  # only `good`
    assert f"outcomes[1].{why}" in caplog.text


def test_rejections_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    t = ArmStatsTracker(OutcomeConfig(log_interval_s=10.0), clock=clock)
    bad = out("k", 1, 1, 2, 2)
    with caplog.at_level(logging.WARNING, logger="predictor_service.outcomes"):
        for _ in range(5):
            t.record([bad, bad])
        assert len(caplog.records) == 1
        clock.now += 11
        t.record([bad])
    assert len(caplog.records) == 2
    assert "+8 refused since the last report" in caplog.records[1].getMessage()
    assert t.report().rejected_outcomes == 11


def test_unknown_arms_are_rejected_and_asked_about_once() -> None:
    asked: list[tuple[str, int, str]] = []

    def known(key: tuple[str, int, str]) -> bool:
        asked.append(key)
        return key[2] != "made-up"

    t = ArmStatsTracker(clock=Clock(), arm_known=known)
    s = t.record([out("a", 1, 2, 1, 2), out("a", 2, 2, 1, 2), out("b", 1, 2, 2, 3, arm="made-up")])
    assert s.rejected == {"unknown_arm": 1}
    assert asked == [("m", 1, "stable"), ("m", 1, "made-up")]
    r = t.report()
    assert [a.arm for a in r.arms] == ["stable"] and r.arms[0].steps == 2
    assert r.rejected_outcomes == 1


def test_a_window_counts_recent_sequences_and_since_reset_counts_all() -> None:
    clock = Clock()
    t = ArmStatsTracker(clock=clock)
    t.record([out("old", 1, 4, 4, 5, 0.1, 0.2)])  # t = 1000
    clock.now += 50
    t.record([out("mid", 1, 2, 0, 1, 0.1, 0.1), out("late", 1, 4, 2, 3, 0.05, 0.05)])  # 1050
    clock.now += 50
    t.record([out("late", 2, 4, 4, 5, 0.05, 0.05, end=True)])  # 1100
    # window 30 s at 1100: only `late` (last outcome at 1100), with ALL its steps
    (w,) = t.report("m", 30.0).arms
    assert (w.sequences, w.steps, w.drafted, w.accepted, w.tokens) == (1, 2, 8, 6, 8)
    assert (w.draft_seconds, w.verify_seconds) == pytest.approx((0.1, 0.1))
    assert [(s.routing_key, s.ended) for s in w.sequence_outcomes] == [("late", True)]
    # window 60 s: `mid` and `late`, oldest first
    (w60,) = t.report("m", 60.0).arms
    assert [s.routing_key for s in w60.sequence_outcomes] == ["mid", "late"]
    assert (w60.sequences, w60.steps, w60.tokens) == (2, 3, 9)
    # since reset: everything
    (a,) = t.report("m", 0.0).arms
    assert (a.sequences, a.steps, a.drafted, a.accepted, a.tokens) == (3, 4, 14, 10, 14)
    assert (a.draft_seconds, a.verify_seconds) == pytest.approx((0.3, 0.4))
    # a window nobody reported in: no arm at all
    clock.now += 1000
    assert t.report("m", 5.0).arms == ()
    with pytest.raises(ValueError, match="window_seconds"):
        t.report("m", -1.0)


def test_per_sequence_records_are_bounded_and_totals_keep_the_evicted() -> None:
    clock = Clock()
    t = ArmStatsTracker(OutcomeConfig(max_sequences=3), clock=clock)

    def at(*outcomes: StepOutcome) -> None:
        clock.now += 1
        t.record(list(outcomes))

    at(out("s0", 1, 2, 1, 2))
    at(out("s1", 1, 2, 1, 2))
    at(out("s2", 1, 2, 1, 2))
    at(out("s0", 2, 2, 2, 3))  # s0 is recent again: s1 is the oldest now
    at(out("s3", 1, 2, 1, 2))  # evicts s1
    at(out("s4", 1, 2, 1, 2))  # evicts s2
    (a,) = t.report().arms
    assert [s.routing_key for s in a.sequence_outcomes] == ["s0", "s3", "s4"]
    assert (a.sequences, a.steps, a.drafted, a.accepted, a.tokens) == (5, 6, 12, 7, 13)
    # a window is summed from the records: the evicted sequences are not in it
    (w,) = t.report("", 100.0).arms
    assert (w.sequences, w.steps) == (3, 4)
    # an evicted sequence that reports again starts a new record and counts again
    at(out("s1", 2, 2, 1, 2))
    assert t.report().arms[0].sequences == 6


def test_reset_one_model_or_everything() -> None:
    clock = Clock()
    t = ArmStatsTracker(clock=clock)
    t.record([*HAND, out("x", 1, 2, 2, 3, model="other", arm="v1")])
    clock.now += 10
    t.reset("m")
    r = t.report()
    assert [(a.model_name, a.arm) for a in r.arms] == [("other", "v1")]
    assert (r.fallback_steps, r.local_steps) == (2, 1)  # not per model: kept
    assert t.report("m").seconds_since_reset == 0.0
    assert t.report("other").seconds_since_reset == 10.0
    clock.now += 5
    t.record([out("a", 9, 2, 1, 2)])
    (a,) = t.report("m").arms
    assert (a.sequences, a.steps) == (1, 1)
    t.reset()
    r = t.report()
    assert (r.arms, r.fallback_steps, r.local_steps, r.rejected_outcomes) == ((), 0, 0, 0)
    assert r.seconds_since_reset == 0.0


def test_shadow_calibration_by_hand() -> None:
    t = ArmStatsTracker(OutcomeConfig(shadow_memory=4), clock=Clock())
    cands = (0, 2, 4)
    # predictions for (key, step): acceptance per candidate
    t.remember_shadow(
        ShadowScores("m", 2, ["a", "b", "c"], [1, 1, 1], cands, np.array([[0, 0.9, 0.8]] * 3))
    )
    t.remember_shadow(ShadowScores("m", 2, ["a"], [2], cands, np.array([[0, 0.5, 0.25]])))
    t.record(
        [
            out("a", 1, 4, 2, 3),  # predicted 0.8, realised 0.5
            out("b", 1, 2, 2, 3),  # predicted 0.9, realised 1.0
            out("c", 1, 3, 3, 4),  # drafted 3 was not a candidate: skipped
            out("a", 2, 0, 0, 1),  # nothing drafted: skipped
            out("z", 1, 4, 4, 5),  # never shadowed
        ]
    )
    (c,) = t.report().shadows
    assert (c.model_name, c.model_version, c.steps) == ("m", 2, 2)
    assert c.mean_predicted_acceptance == pytest.approx(0.85)
    assert c.mean_realised_acceptance == pytest.approx(0.75)
    assert c.mean_absolute_error == pytest.approx((0.3 + 0.1) / 2)
    # an outcome is compared once; a draft-plan step (decision_step != step) never
    t.remember_shadow(ShadowScores("m", 2, ["d", "e"], [5, 6], cands, np.full((2, 3), 0.5)))
    t.record([out("a", 1, 4, 4, 5), out("d", 5, 4, 4, 5, decision_step=3)])
    assert t.report().shadows[0].steps == 2
    # bounded: 4 entries; the least recently stored are dropped
    t.remember_shadow(
        ShadowScores("m", 2, [f"k{i}" for i in range(6)], [1] * 6, cands, np.ones((6, 3)))
    )
    t.record([out("k0", 1, 2, 2, 3), out("k1", 1, 2, 2, 3), out("k5", 1, 2, 2, 3)])
    assert t.report().shadows[0].steps == 3  # only k5 was still remembered


# ----- over a real server -------------------------------------------------------------------


def pb_outcome(
    key: str,
    step: int,
    drafted: int,
    accepted: int,
    tokens: int,
    *,
    version: int = 1,
    arm: str = "v1",
    source: int = dpb.DECISION_SOURCE_REMOTE,
    draft: float = 0.004,
    verify: float = 0.006,
    end: bool = False,
) -> pb.StepOutcome:
    remote = source == dpb.DECISION_SOURCE_REMOTE
    return pb.StepOutcome(
        routing_key=key,
        step=step,
        source=source,  # type: ignore[arg-type]
        model_name=MODEL if remote else "",
        model_version=version if remote else 0,
        arm=arm if remote else "",
        decision_step=step if remote else 0,
        drafted=drafted,
        accepted=accepted,
        tokens=tokens,
        draft_seconds=draft,
        verify_seconds=verify,
        sequence_end=end,
        compression=cpb.COMPRESSION_INT8,
    )


def with_outcomes(req: pb.DecideRequest, *outcomes: pb.StepOutcome) -> pb.DecideRequest:
    req.outcomes.extend(outcomes)
    return req


def test_outcome_only_messages_are_answered_empty_and_rows_beside_outcomes_are_decided(
    server: PredictorServer, stub: pb_grpc.PredictorServiceStub
) -> None:
    keys = [f"s-{i}" for i in range(20)]
    plain = decide_one(stub, request(1, keys))  # an old worker: no outcomes at all
    assert not plain.HasField("error") and len(plain.decisions) == 20
    assert {(d.model_version, d.arm) for d in plain.decisions} == {(2, "v2")}
    v2 = {"version": 2, "arm": "v2"}
    msgs = [
        pb.DecideRequest(request_id=7, outcomes=[pb_outcome("s-0", 0, 4, 3, 4, **v2)]),
        with_outcomes(
            request(8, keys),
            pb_outcome("s-1", 0, 4, 4, 5, **v2),
            pb_outcome("s-2", 0, 4, 9, 5, **v2),  # malformed: accepted > drafted
            pb_outcome("s-3", 0, 2, 1, 2, source=dpb.DECISION_SOURCE_FALLBACK),
            pb_outcome("s-4", 0, 2, 1, 2, version=2, arm="made-up"),  # never served
        ),
        request(9, keys=()),  # neither rows nor outcomes: refused as before
    ]
    empty, decided, refused = list(stub.Decide(iter(msgs), timeout=30))
    assert empty == pb.DecideResponse(request_id=7)
    assert decided.request_id == 8 and not decided.HasField("error")
    assert list(decided.decisions) == list(plain.decisions)
    assert refused.request_id == 9 and refused.error.field == "rows"
    with PredictorClient(server.address) as client:
        r = client.arm_stats()
    (arm,) = r.arms
    assert (arm.model_name, arm.model_version, arm.arm) == (MODEL, 2, "v2")
    assert (arm.sequences, arm.steps, arm.drafted, arm.accepted, arm.tokens) == (2, 2, 8, 7, 9)
    assert (r.rejected_outcomes, r.fallback_steps, r.local_steps) == (2, 1, 0)
    m = server.metrics
    assert m.value("speckv_predictor_outcomes_rejected_total", {"reason": "invalid"}) == 1
    assert m.value("speckv_predictor_outcomes_rejected_total", {"reason": "unknown_arm"}) == 1
    assert m.value("speckv_predictor_outcomes_unattributed_total", {"source": "fallback"}) == 1
    assert m.value("speckv_predictor_outcomes_unattributed_total", {"source": "local"}) == 0


def test_too_many_outcomes_are_refused_per_message_and_the_stream_stays_open(
    model_repo: Path, start_server: Callable[..., PredictorServer]
) -> None:
    server = start_server(model_repo, default_model=MODEL, max_outcomes_per_message=3)
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.PredictorServiceStub(ch)
        many = with_outcomes(
            request(1), *[pb_outcome(f"k{i}", 1, 2, 1, 2, version=2, arm="v2") for i in range(4)]
        )
        three = with_outcomes(
            request(2), *[pb_outcome(f"k{i}", 1, 2, 1, 2, version=2, arm="v2") for i in range(3)]
        )
        refused, ok = list(stub.Decide(iter([many, three]), timeout=30))
    assert refused.request_id == 1 and not refused.decisions
    assert refused.error.code == pb.ERROR_CODE_RESOURCE_EXHAUSTED
    assert refused.error.field == "outcomes"
    assert "--max-outcomes-per-message" in refused.error.message
    assert ok.request_id == 2 and len(ok.decisions) == 1
    (arm,) = server.servicer.tracker.report().arms
    assert arm.steps == 3  # none of the refused message's outcomes were counted


def test_a_refused_row_does_not_lose_the_outcomes_beside_it(
    server: PredictorServer, stub: pb_grpc.PredictorServiceStub
) -> None:
    bad = request(1)
    bad.rows[0].signals.mean_draft_confidence = 7.0
    resp = decide_one(stub, with_outcomes(bad, pb_outcome("k", 3, 4, 2, 3, version=2, arm="v2")))
    assert resp.error.field == "rows[0].signals.mean_draft_confidence"
    (arm,) = server.servicer.tracker.report().arms
    assert (arm.steps, arm.accepted) == (1, 2)


def test_arm_stats_over_a_50_50_split_equal_the_outcomes_sent(
    server: PredictorServer, stub: pb_grpc.PredictorServiceStub
) -> None:
    routing = pb.Routing(
        weights=[
            pb.RouteWeight(target="stable", weight=1),
            pb.RouteWeight(target="canary", weight=1),
        ],
        salt="ab",
        aliases={"stable": 1, "canary": 2},
    )
    stub.SetRouting(pb.SetRoutingRequest(model_name=MODEL, routing=routing), metadata=ADMIN)
    keys = [f"seq-{i}" for i in range(40)]
    expected: dict[str, list[float]] = {}
    seqs: dict[str, set[str]] = {}
    # three decided steps per sequence; each step's outcome rides on the next message
    pending: list[pb.StepOutcome] = []
    for step in range(3):
        req = with_outcomes(request(step + 1, keys), *pending)
        (resp,) = list(stub.Decide(iter([req]), timeout=30))
        assert not resp.HasField("error")
        pending = []
        for i, d in enumerate(resp.decisions):
            accepted = (i + step) % (d.gamma + 1)
            tokens = accepted + 1
            o = pb_outcome(
                d.routing_key,
                d.step,
                d.gamma,
                accepted,
                tokens,
                version=d.model_version,
                arm=d.arm,
                draft=0.001 * d.gamma,
                verify=0.005,
                end=step == 2,
            )
            pending.append(o)
            e = expected.setdefault(d.arm, [0, 0, 0, 0, 0.0])
            e[0] += 1
            e[1] += d.gamma
            e[2] += accepted
            e[3] += tokens
            e[4] += 0.001 * d.gamma + 0.005
            seqs.setdefault(d.arm, set()).add(d.routing_key)
    last = pb.DecideRequest(request_id=99, outcomes=pending)
    assert decide_one(stub, last) == pb.DecideResponse(request_id=99)
    assert set(expected) == {"stable", "canary"}

    client = PredictorClient(server.address, admin_token=TOKEN)
    report = client.arm_stats(MODEL)
    assert [(a.model_version, a.arm) for a in report.arms] == [(1, "stable"), (2, "canary")]
    for a in report.arms:
        e = expected[a.arm]
        assert (a.steps, a.drafted, a.accepted, a.tokens) == tuple(e[:4])
        assert a.draft_seconds + a.verify_seconds == pytest.approx(e[4])
        assert a.sequences == len(seqs[a.arm])
        assert {s.routing_key for s in a.sequence_outcomes} == seqs[a.arm]
        assert all(s.ended and s.steps == 3 for s in a.sequence_outcomes)
        assert sum(s.tokens for s in a.sequence_outcomes) == a.tokens
    assert report.replica.endswith(f":{server.port}") and report.replica.count(":") == 2
    assert report.seconds_since_reset > 0
    # a window: every sequence reported just now; without sequences: totals only
    windowed = client.arm_stats(MODEL, window_seconds=600.0, include_sequences=False)
    assert [(a.steps, a.tokens) for a in windowed.arms] == [
        (a.steps, a.tokens) for a in report.arms
    ]
    assert all(not a.sequence_outcomes for a in windowed.arms)
    assert client.arm_stats("").arms == report.arms

    # Prometheus: the same sums, labelled by model, version and arm
    m = server.metrics
    for a in report.arms:
        labels = {"model": MODEL, "version": str(a.model_version), "arm": a.arm}
        e = expected[a.arm]
        assert m.value("speckv_predictor_arm_outcome_steps_total", labels) == e[0]
        assert m.value("speckv_predictor_arm_outcome_drafted_tokens_total", labels) == e[1]
        assert m.value("speckv_predictor_arm_outcome_accepted_tokens_total", labels) == e[2]
        assert m.value("speckv_predictor_arm_outcome_tokens_total", labels) == e[3]
        assert m.value("speckv_predictor_arm_outcome_step_seconds_total", labels) == pytest.approx(
            e[4]
        )
        assert m.value("speckv_predictor_arm_outcome_sequences_total", labels) == len(seqs[a.arm])
    text = m.exposition().decode()
    for name in (
        "speckv_predictor_arm_outcome_steps_total{",
        "speckv_predictor_outcomes_unattributed_total{",
        "speckv_predictor_outcomes_rejected_total{",
    ):
        assert name in text

    # errors name the field
    with pytest.raises(InvalidArgument, match="window_seconds"):
        client.arm_stats(MODEL, window_seconds=-1.0)
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        client.arm_stats("nope")
    client.close()


def test_reset_arm_stats_needs_the_admin_token(
    server: PredictorServer, stub: pb_grpc.PredictorServiceStub
) -> None:
    decide_one(
        stub,
        pb.DecideRequest(request_id=1, outcomes=[pb_outcome("k", 1, 2, 1, 2, version=2, arm="v2")]),
    )
    reset = pb.ResetArmStatsRequest(model_name=MODEL)
    for md in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as err:
            stub.ResetArmStats(reset, metadata=md)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(AdminAuthError):
        PredictorClient(server.address).reset_arm_stats(MODEL)
    assert stub.GetArmStats(pb.GetArmStatsRequest()).arms[0].steps == 1  # reads stay open
    with PredictorClient(server.address, admin_token=TOKEN) as admin:
        with pytest.raises(NotFound):
            admin.reset_arm_stats("nope")
        admin.reset_arm_stats(MODEL)
        assert admin.arm_stats().arms == ()


def test_shadow_calibration_compares_the_shadow_prediction_with_the_realised_acceptance(
    server: PredictorServer, stub: pb_grpc.PredictorServiceStub
) -> None:
    routing = pb.Routing(weights=[pb.RouteWeight(target="1", weight=1)], shadow_version=2)
    stub.SetRouting(pb.SetRoutingRequest(model_name=MODEL, routing=routing), metadata=ADMIN)
    keys = [f"k{i}" for i in range(6)]
    # What the shadow predicts for these rows: the same rows pinned to v2.
    pinned = decide_one(stub, request(1, keys, model=cpb.ModelSelector(name=MODEL, version=2)))
    predicted = {
        d.routing_key: {c.gamma: c.predicted_acceptance for c in d.candidates}
        for d in pinned.decisions
    }
    served = request(2, keys)
    outcomes, realised_at4 = [], []
    for i, key in enumerate(keys):
        if i < 4:  # drafted 4 of candidates (0, 2, 4, 6, 8)
            outcomes.append(pb_outcome(key, i, 4, i, i + 1))
            realised_at4.append((predicted[key][4], i / 4))
        elif i == 4:
            outcomes.append(pb_outcome(key, i, 3, 1, 2))  # 3 is not a candidate: skipped
        else:
            outcomes.append(pb_outcome(key, i, 0, 0, 1))  # nothing drafted: skipped
    # same stream: the shadow is scored before the next message is read
    answers = list(
        stub.Decide(iter([served, pb.DecideRequest(request_id=3, outcomes=outcomes)]), timeout=30)
    )
    assert [a.request_id for a in answers] == [2, 3]
    assert {d.model_version for d in answers[0].decisions} == {1}
    (cal,) = PredictorClient(server.address).arm_stats(MODEL).shadows
    n = len(realised_at4)
    assert (cal.model_name, cal.model_version, cal.steps) == (MODEL, 2, n)
    assert cal.mean_predicted_acceptance == pytest.approx(sum(p for p, _ in realised_at4) / n)
    assert cal.mean_realised_acceptance == pytest.approx(sum(r for _, r in realised_at4) / n)
    mae = sum(abs(p - r) for p, r in realised_at4) / n
    assert cal.mean_absolute_error == pytest.approx(mae)
    labels = {"model": MODEL, "version": "2"}
    m = server.metrics
    assert m.value("speckv_predictor_shadow_calibration_steps_total", labels) == n
    assert m.value("speckv_predictor_shadow_calibration_abs_error_sum", labels) == pytest.approx(
        mae * n
    )


def test_the_serve_flags_reach_the_tracker_and_bad_values_are_refused(
    model_repo: Path, start_server: Callable[..., PredictorServer]
) -> None:
    import argparse

    from predictor_service.serve_cli import add_arguments
    from predictor_service.server import ServerConfig

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        ["--repo", "x", "--arm-stats-max-sequences", "7", "--max-outcomes-per-message", "9"]
    )
    assert (args.arm_stats_max_sequences, args.max_outcomes_per_message) == (7, 9)
    defaults = p.parse_args(["--repo", "x"])
    assert (defaults.arm_stats_max_sequences, defaults.max_outcomes_per_message) == (20_000, 4096)
    for flag in ("--arm-stats-max-sequences=-1", "--max-outcomes-per-message=0"):
        with pytest.raises(SystemExit):
            p.parse_args(["--repo", "x", flag])
    with pytest.raises(ValueError, match="--max-outcomes-per-message"):
        ServerConfig(repo=model_repo, max_outcomes_per_message=0).check()
    server = start_server(model_repo, arm_stats_max_sequences=7, max_outcomes_per_message=9)
    cfg = server.servicer.tracker.config
    assert (cfg.max_sequences, cfg.max_outcomes_per_message) == (7, 9)
