"""`speckv ab` and `speckv promote` against two REAL predictor replicas on loopback.

Both replicas serve the same repository with the same routing (stable=v1, canary=v2,
50/50, one salt), so a routing key lands on the same arm on either. Each replica decides
rows on a real Decide stream and is then sent hand-made StepOutcomes piggybacked on a
Decide message, as a worker does; `speckv ab` must sum both replicas exactly as computed
here by hand, merge the sequence whose steps reached both, and judge the arms.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from speckv_client import cli
from speckv_client.cli import ExitCode
from speckv_client.predictor import PredictorClient
from speckv_client.types import (
    Compression,
    DecideBatch,
    DecisionSource,
    DraftSignals,
    FeatureRow,
    ModelSelector,
    Objective,
    RouteWeight,
    Routing,
    StepOutcome,
)

from tests.client.servers import ADMIN_TOKEN

pytestmark = pytest.mark.timeout(120)

MODEL = "speckv-mlp16"
KEYS = [f"seq-{i:02d}" for i in range(24)]


@dataclass
class Replica:
    address: str
    server: object


@pytest.fixture
def replicas(model_repo: Path) -> Iterator[list[Replica]]:
    """Two real predictor servers (in-process), one repository, the same A/B routing."""
    from predictor_service.server import PredictorServer, ServerConfig

    started: list[Replica] = []
    try:
        for _ in range(2):
            server = PredictorServer(
                ServerConfig(repo=model_repo, admin_token=ADMIN_TOKEN, grace_seconds=1.0)
            )
            port = server.start()
            started.append(Replica(f"127.0.0.1:{port}", server))
            with PredictorClient(started[-1].address, admin_token=ADMIN_TOKEN) as pc:
                pc.set_routing(
                    MODEL,
                    Routing(
                        weights=(RouteWeight("stable", 50.0), RouteWeight("canary", 50.0)),
                        salt="ab-cli-test",
                        aliases={"stable": 1, "canary": 2},
                    ),
                )
        yield started
    finally:
        for r in started:
            r.server.stop(0.0)  # type: ignore[attr-defined]


def speckv(*args: str) -> tuple[int, str, str]:
    """`speckv ARGS` in this process: (exit code, stdout, stderr). A bad flag ends in
    argparse's SystemExit, writing to sys.stderr, as it does for the installed command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args), out=out, err=err)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def rows(keys: list[str], step: int) -> DecideBatch:
    return DecideBatch(
        rows=tuple(
            FeatureRow(k, step, DraftSignals(1.1, 0.7, 2.4, 0.3), Compression.FP16) for k in keys
        ),
        objective=Objective.TOKENS_PER_STEP,
        model=ModelSelector(name=MODEL),
    )


def outcome(key: str, step: int, arm: str, version: int, i: int) -> StepOutcome:
    """Canary steps produce 3 tokens, stable steps 2, at the same seconds: canary is 50 %
    faster in tokens/s; seconds vary with the sequence so the arms have a spread."""
    canary = arm == "canary"
    scale = 1.0 + 0.1 * (i % 3)
    return StepOutcome(
        routing_key=key,
        step=step,
        source=DecisionSource.REMOTE,
        drafted=4,
        accepted=2 if canary else 1,
        tokens=3 if canary else 2,
        draft_seconds=0.004 * scale,
        verify_seconds=0.006 * scale,
        compression=Compression.FP16,
        model_name=MODEL,
        model_version=version,
        arm=arm,
        decision_step=step,
    )


@dataclass
class Expected:
    sequences: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    seconds: float = 0.0


def feed(replicas: list[Replica]) -> tuple[dict[str, int], dict[str, Expected]]:
    """Decide every key on both replicas, then report each key's steps: even keys to
    replica 0, odd keys to replica 1, and the first key of each arm split over both (a
    reconnect). Returns (the arms' versions, the totals by hand) and one fallback step."""
    arms: dict[str, tuple[str, int]] = {}
    for r in replicas:
        with PredictorClient(r.address) as pc:
            for d in pc.decide(rows(KEYS, 1)):
                assert arms.setdefault(d.routing_key, (d.arm, d.model_version)) == (
                    d.arm,
                    d.model_version,
                ), "the same routing key must land on the same arm on both replicas"
    assert {a for a, _ in arms.values()} == {"stable", "canary"}
    per_replica: list[list[StepOutcome]] = [[], []]
    expected: dict[str, Expected] = {}
    split: set[str] = set()
    for i, key in enumerate(KEYS):
        arm, version = arms[key]
        e = expected.setdefault(arm, Expected())
        e.sequences += 1
        n_steps = 3 + i % 4
        first_of_arm = arm not in split
        split.add(arm)
        for step in range(1, n_steps + 1):
            o = outcome(key, step, arm, version, i)
            where = (0 if step <= 2 else 1) if first_of_arm else i % 2
            per_replica[where].append(o)
            e.steps += 1
            e.drafted += o.drafted
            e.accepted += o.accepted
            e.tokens += o.tokens
            e.seconds += o.draft_seconds + o.verify_seconds
    fallback = StepOutcome(
        routing_key="seq-fb",
        step=1,
        source=DecisionSource.FALLBACK,
        drafted=2,
        accepted=1,
        tokens=2,
        draft_seconds=0.002,
        verify_seconds=0.005,
    )
    per_replica[1].append(fallback)
    for r, outcomes in zip(replicas, per_replica, strict=True):
        with PredictorClient(r.address) as pc:
            # Piggybacked on the next decision message, as the worker sends them.
            decided = pc.decide(replace(rows(KEYS[:1], 2), outcomes=tuple(outcomes)))
            assert len(decided) == 1
    versions = {arm: v for arm, v in arms.values()}
    return versions, expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ab_sums_both_replicas_and_judges_the_arms(replicas: list[Replica]) -> None:
    versions, expected = feed(replicas)
    a, b = (r.address for r in replicas)
    code, out, err = speckv("ab", MODEL, "--predictor", a, "--predictor", b, "--json")
    assert code == ExitCode.OK, err
    obj = json.loads(out)
    assert out.count("\n") == 1  # exactly one object
    assert list(obj) == ["model", "arms", "verdict", "replicas", "comparisons"]
    assert obj["model"] == MODEL
    assert obj["replicas"]["summed"] == 2 and obj["replicas"]["partial"] is False
    assert obj["replicas"]["fallback_steps"] == 1
    by_arm = {x["arm"]: x for x in obj["arms"]}
    assert set(by_arm) == {"stable", "canary"}
    for arm, e in expected.items():
        got = by_arm[arm]
        assert list(got) == [
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
        assert got["version"] == versions[arm]
        # The split sequence counts once; every step of both replicas counts.
        assert (got["sequences"], got["steps"], got["drafted"]) == (
            e.sequences,
            e.steps,
            e.drafted,
        )
        assert (got["accepted"], got["tokens"]) == (e.accepted, e.tokens)
        assert got["tokens_per_step"] == e.tokens / e.steps
        assert got["tokens_per_second"] == pytest.approx(e.tokens / e.seconds, rel=1e-9)
        assert got["ci_low"] < got["tokens_per_second"] < got["ci_high"]
    d = (expected["canary"].tokens / expected["canary"].seconds) / (
        expected["stable"].tokens / expected["stable"].seconds
    ) - 1
    assert obj["verdict"].startswith(f"v2 is faster by {100 * d:.1f} % (95 % CI "), obj["verdict"]
    (comp,) = obj["comparisons"]
    assert comp["baseline"] == {"arm": "stable", "version": 1}
    assert comp["ci"][0] > 0

    # The same seed gives the same numbers; the human output says what was summed.
    again = speckv("ab", MODEL, "--predictor", a, "--predictor", b, "--json")
    assert again[1] == out
    code, text, err = speckv("ab", MODEL, "--predictor", a, "--predictor", b)
    assert code == ExitCode.OK, err
    lines = text.splitlines()
    assert "summed 2 replica(s)" in lines[0]
    header = lines[1].split()
    assert header[:8] == [
        "arm",
        "version",
        "sequences",
        "steps",
        "drafted",
        "accepted",
        "tokens",
        "tokens/step",
    ]
    table = {ln.split()[0]: ln.split() for ln in lines[2:4]}
    assert table["canary"][1:7] == [
        "v2",
        str(expected["canary"].sequences),
        str(expected["canary"].steps),
        str(expected["canary"].drafted),
        str(expected["canary"].accepted),
        str(expected["canary"].tokens),
    ]
    assert "not credited to any arm: 1 fallback and 0 local step(s)" in text
    assert lines[-1] == f"verdict: {obj['verdict']}"

    # One replica alone is one replica's share, and says so.
    code, one, err = speckv("ab", MODEL, "--predictor", a, "--json")
    assert code == ExitCode.OK, err
    single = json.loads(one)
    assert single["replicas"]["summed"] == 1
    assert sum(x["steps"] for x in single["arms"]) < sum(e.steps for e in expected.values())


def test_ab_counts_a_replica_reached_twice_once(replicas: list[Replica]) -> None:
    _, expected = feed(replicas)
    a, b = (r.address for r in replicas)
    code, out, err = speckv(
        "ab", MODEL, "--predictor", a, "--predictor", f"ipv4:{a}", "--predictor", b, "--json"
    )
    assert code == ExitCode.OK, err
    obj = json.loads(out)
    assert obj["replicas"]["summed"] == 2
    assert len(obj["replicas"]["addresses"]) == 3 and len(obj["replicas"]["duplicates"]) == 1
    assert {x["arm"]: x["steps"] for x in obj["arms"]} == {
        arm: e.steps for arm, e in expected.items()
    }


def test_ab_refuses_to_present_a_part_as_the_whole(replicas: list[Replica]) -> None:
    feed(replicas)
    a = replicas[0].address
    dead = f"127.0.0.1:{free_port()}"
    code, out, err = speckv("--timeout", "1", "ab", MODEL, "--predictor", a, "--predictor", dead)
    assert code == ExitCode.UNREACHABLE, (out, err)
    assert dead in err and "--allow-partial" in err and "Traceback" not in err
    assert out == ""
    code, out, err = speckv(
        "--timeout", "1", "ab", MODEL, "--predictor", a, "--predictor", dead, "--allow-partial"
    )
    assert code == ExitCode.OK, err
    assert "summed 1 replica(s)" in out and "PARTIAL" in out and dead in out
    assert "warning" in err and dead in err
    code, out, err = speckv("--timeout", "1", "ab", MODEL, "--predictor", dead, "--allow-partial")
    assert code == ExitCode.UNREACHABLE and "no predictor answered" in err


def test_ab_bad_inputs(replicas: list[Replica]) -> None:
    a = replicas[0].address
    code, _, err = speckv("ab", "no-such-model", "--predictor", a)
    assert code == ExitCode.NOT_FOUND and "no-such-model" in err, err
    # Nothing reported yet: no arms, and the verdict says so (not an error).
    code, out, err = speckv("ab", MODEL, "--predictor", a)
    assert code == ExitCode.OK, err
    assert (
        out.splitlines()[-1]
        == f"verdict: cannot tell yet — no arm of {MODEL} has reported outcomes"
    )
    feed(replicas)
    code, _, err = speckv("ab", MODEL, "--predictor", a, "--baseline", "nope")
    assert code == ExitCode.USAGE and "--baseline 'nope' matches no arm" in err, err
    code, out, err = speckv("ab", MODEL, "--predictor", a, "--baseline", "canary")
    assert code == ExitCode.OK and "verdict: v1 is slower by" in out, (out, err)
    for bad in (("--resamples", "5"), ("--window-seconds", "-1"), ("--seed", "-3")):
        code, _, err = speckv("ab", MODEL, "--predictor", a, *bad)
        assert code == ExitCode.USAGE and bad[0] in err, err
    code, _, err = speckv("ab", MODEL, "--predictor", "no-such-host.invalid:50051")
    assert code == ExitCode.UNREACHABLE and "cannot resolve 'no-such-host.invalid'" in err, err


def test_a_host_name_is_resolved_to_every_address() -> None:
    addresses, why = cli._replica_addresses("localhost:50051")
    assert why is None and "127.0.0.1:50051" in addresses
    assert len(addresses) == len(set(addresses))
    assert cli._replica_addresses("dns:///127.0.0.1:7") == (["127.0.0.1:7"], None)
    assert cli._replica_addresses("[::1]:7") == (["[::1]:7"], None)
    assert cli._replica_addresses("unix:/tmp/p.sock") == (["unix:/tmp/p.sock"], None)


def test_promote_points_stable_at_the_version_and_zeroes_the_canary(
    replicas: list[Replica],
) -> None:
    a = replicas[0].address
    p = ("--predictor", a)
    code, _, err = speckv("promote", MODEL, "2", *p)
    assert code == ExitCode.AUTH and "--admin-token" in err, err
    code, out, err = speckv("--admin-token", ADMIN_TOKEN, "promote", MODEL, "2", *p)
    assert code == ExitCode.OK, err
    assert out == f"{MODEL}: stable=100 canary=0; aliases canary=v2 stable=v2; salt 'ab-cli-test'\n"
    assert "promoted speckv-mlp16 v2 to stable (was v1)" in err
    with PredictorClient(a) as pc:
        routing = pc.get_routing(MODEL)
        assert routing.aliases["stable"] == 2
        assert {w.target: w.weight for w in routing.weights} == {"stable": 100.0, "canary": 0.0}
        # Every decision now comes from v2 through the stable arm.
        decided = pc.decide(rows(KEYS, 1))
        assert {(d.arm, d.model_version) for d in decided} == {("stable", 2)}
    # The other replica was not touched: promote is per address, like route and rollback.
    with PredictorClient(replicas[1].address) as pc:
        assert pc.get_routing(MODEL).aliases["stable"] == 1
    code, out, err = speckv("--admin-token", ADMIN_TOKEN, "promote", MODEL, "1", *p, "--json")
    assert code == ExitCode.OK, err
    assert json.loads(out)["aliases"] == {"canary": 2, "stable": 1}

    code, _, err = speckv("--admin-token", ADMIN_TOKEN, "promote", MODEL, "9", *p)
    assert code == ExitCode.NOT_FOUND and "no version 9 (versions: v1, v2)" in err, err
    code, _, err = speckv("--admin-token", ADMIN_TOKEN, "promote", "no-such-model", "2", *p)
    assert code == ExitCode.NOT_FOUND and "no-such-model" in err, err
    code, _, err = speckv("--admin-token", ADMIN_TOKEN, "promote", MODEL, "two", *p)
    assert code == ExitCode.USAGE and "VERSION" in err, err
    assert "Traceback" not in err


def test_ab_waits_for_nothing_stale(replicas: list[Replica]) -> None:
    """--window-seconds: outcomes older than the window are left out."""
    feed(replicas)
    time.sleep(1.2)
    a, b = (r.address for r in replicas)
    code, out, err = speckv(
        "ab", MODEL, "--predictor", a, "--predictor", b, "--window-seconds", "1", "--json"
    )
    assert code == ExitCode.OK, err
    assert json.loads(out)["arms"] == []
    code, out, err = speckv(
        "ab", MODEL, "--predictor", a, "--predictor", b, "--window-seconds", "600", "--json"
    )
    assert code == ExitCode.OK and len(json.loads(out)["arms"]) == 2
