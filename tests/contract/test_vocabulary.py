"""speckv.vocabulary is the one home of the shared words, and it agrees with the wire.

Checked against the generated stubs (every Compression, DecisionWindow and Objective value
maps, comp_enc = value - 1), against the manifests training writes, through the one
proto mapping in speckv_client.convert, and by scanning the packages' source for
restatements of the γ candidates or of a compression-code table.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from speckv import vocabulary as vocab
from speckv.v1 import common_pb2, decoder_pb2, predictor_pb2
from speckv_client import convert
from speckv_client.types import (
    ArmStats,
    ArmStatsReport,
    Compression,
    DecisionSource,
    FinishReason,
    Objective,
    SequenceOutcome,
    ShadowCalibration,
    StepOutcome,
    Window,
)

REPO = Path(__file__).resolve().parents[2]


def _named_values(enum: object, prefix: str) -> dict[str, int]:
    """{"fp16": 1, ...} for COMPRESSION_FP16 = 1, ...; UNSPECIFIED (0) left out."""
    items = enum.items()  # type: ignore[attr-defined]
    return {n.removeprefix(prefix).lower(): v for n, v in items if v != 0}


def test_every_wire_compression_maps_and_comp_enc_is_value_minus_one() -> None:
    wire = _named_values(common_pb2.Compression, "COMPRESSION_")
    assert dict(vocab.COMPRESSION_WIRE) == wire
    assert set(vocab.COMPRESSIONS) == set(wire)
    assert {v: k for k, v in wire.items()} == dict(vocab.COMPRESSION_FROM_WIRE)
    for name, value in wire.items():
        assert vocab.COMP_ENC[name] == value - 1
        assert vocab.COMP_ENC_BY_WIRE[value] == value - 1
    # the seed's encoding, as its step records and every manifest spell it
    assert dict(vocab.COMP_ENC) == {"fp16": 0, "int8": 1, "nf4": 2}
    assert (
        min(wire.values()),
        max(wire.values()),
    ) == (vocab.WIRE_COMPRESSION_MIN, vocab.WIRE_COMPRESSION_MAX)
    enc = vocab.comp_enc_from_wire(np.array(sorted(wire.values()), dtype=np.int64))
    assert enc.dtype == np.float32 and enc.tolist() == [0.0, 1.0, 2.0]


def test_every_wire_window_and_objective_maps() -> None:
    windows = _named_values(common_pb2.DecisionWindow, "DECISION_WINDOW_")
    assert dict(vocab.WINDOW_WIRE) == windows
    assert dict(vocab.WINDOW_FROM_WIRE) == {v: k for k, v in windows.items()}
    assert set(vocab.REQUEST_WINDOWS) == set(windows)
    objectives = _named_values(common_pb2.Objective, "OBJECTIVE_")
    assert dict(vocab.OBJECTIVE_WIRE) == objectives
    assert dict(vocab.OBJECTIVE_FROM_WIRE) == {v: k for k, v in objectives.items()}
    assert set(vocab.OBJECTIVES) == set(objectives)
    assert vocab.DEFAULT_OBJECTIVE in vocab.OBJECTIVES


def test_every_request_window_is_served_by_a_model_window_and_back() -> None:
    assert set(vocab.WINDOW_SERVED_BY) == set(vocab.REQUEST_WINDOWS)
    assert set(vocab.WINDOW_SERVED_BY.values()) == set(vocab.MODEL_WINDOWS)
    # the request window a worker sends for a model window is one that model window serves
    assert set(vocab.WORKER_REQUEST_WINDOW) == set(vocab.MODEL_WINDOWS)
    for model_window, request_window in vocab.WORKER_REQUEST_WINDOW.items():
        assert vocab.WINDOW_SERVED_BY[request_window] == model_window
    assert vocab.WORKER_REQUEST_WINDOW[vocab.WINDOW_SAME_STEP] == vocab.WINDOW_PREFIX


def test_feature_names_match_the_wire_and_each_other() -> None:
    assert tuple(f.name for f in common_pb2.DraftSignals.DESCRIPTOR.fields) == vocab.DRAFT_SIGNALS
    assert set(vocab.FEATURES_BY_WINDOW) | {vocab.WINDOW_DRAFT_PLAN} == set(vocab.MODEL_WINDOWS)
    for window, names in vocab.FEATURES_BY_WINDOW.items():
        assert frozenset(names) == vocab.FEATURES_ALLOWED_BY_WINDOW[window]
        assert names[-2:] == (vocab.COMP_ENC_FEATURE, "gamma")
    assert vocab.PREVIOUS_STEP_FEATURES[:4] == tuple(f"prev_{s}" for s in vocab.DRAFT_SIGNALS)
    plan = vocab.FEATURES_ALLOWED_BY_WINDOW[vocab.WINDOW_DRAFT_PLAN]
    assert plan == {*vocab.PLAN_FEATURES, vocab.COMP_ENC_FEATURE}
    # speckv.draft_plan re-exports the plan's names; they are the same objects
    from speckv import draft_plan

    assert draft_plan.PLAN_FEATURES is vocab.PLAN_FEATURES
    assert draft_plan.WINDOW_DRAFT_PLAN == vocab.WINDOW_DRAFT_PLAN


def test_the_manifests_training_writes_use_the_vocabulary(plan_repo_template: Path) -> None:
    from predictor_service.manifest import load_manifest

    manifests = [load_manifest(p) for p in sorted(plan_repo_template.glob("*/*/manifest.json"))]
    windows = {m.window for m in manifests}
    assert windows == set(vocab.MODEL_WINDOWS), windows  # one model of each window
    for m in manifests:
        assert dict(m.compression_encoding) == dict(vocab.COMP_ENC), m.name
        assert set(m.feature_names) <= vocab.FEATURES_ALLOWED_BY_WINDOW[m.window], m.name
        if m.window in vocab.FEATURES_BY_WINDOW:
            assert tuple(m.feature_names) == vocab.FEATURES_BY_WINDOW[m.window], m.name
            assert tuple(m.gamma_candidates) == vocab.DEFAULT_GAMMA_CANDIDATES, m.name
        assert m.default_objective in vocab.OBJECTIVES


def test_convert_maps_every_client_enum_to_the_wire_value_of_the_same_name() -> None:
    for c in Compression:
        assert convert.compression_to_pb(c) == common_pb2.Compression.Value(f"COMPRESSION_{c.name}")
    assert convert.compression_to_pb(None) == common_pb2.COMPRESSION_UNSPECIFIED
    for w in Window:
        assert convert.window_to_pb(w) == common_pb2.DecisionWindow.Value(
            f"DECISION_WINDOW_{w.name}"
        )
    for o in Objective:
        value = common_pb2.Objective.Value(f"OBJECTIVE_{o.name}")
        assert convert.objective_to_pb(o) == value
        assert convert.objective_from_pb(value) is o
    assert convert.objective_from_pb(common_pb2.OBJECTIVE_UNSPECIFIED) is None
    assert convert.objective_from_pb(99) is None  # a newer client's objective: unknown
    for s in DecisionSource:
        assert convert.source_to_pb(s) == decoder_pb2.DecisionSource.Value(
            f"DECISION_SOURCE_{s.name}"
        )
    for f in FinishReason:
        assert convert.finish_reason_to_pb(f) == decoder_pb2.FinishReason.Value(
            f"FINISH_REASON_{f.name}"
        )
    # the worker's engine reports the client's FinishReason (one enum, not two)
    from decode_worker.engine import FinishReason as EngineFinishReason

    assert EngineFinishReason is FinishReason


def test_a_step_outcome_maps_to_the_wire_and_back_field_for_field() -> None:
    sent = StepOutcome(
        routing_key="req-7",
        step=12,
        source=DecisionSource.REMOTE,
        drafted=6,
        accepted=4,
        tokens=5,
        draft_seconds=0.0125,
        verify_seconds=0.031,
        compression=Compression.NF4,
        model_name="speckv-mlp16",
        model_version=3,
        arm="canary",
        decision_step=11,
        sequence_end=True,
    )
    wire = convert.outcome_to_pb(sent)
    (got,) = convert.outcomes_from_pb(predictor_pb2.DecideRequest(outcomes=[wire]).outcomes)
    # every field of the message is mapped, and to the value that was sent
    assert set(got._fields) == {f.name for f in predictor_pb2.StepOutcome.DESCRIPTOR.fields}
    assert got._asdict() == {k: getattr(sent, k) for k in got._fields}
    # an old worker's outcome (no compression) and an unknown source stay readable
    bare = predictor_pb2.StepOutcome(routing_key="k", source=77)
    (old,) = convert.outcomes_from_pb([bare])
    assert old.compression is None and old.source is DecisionSource.UNSPECIFIED


def test_arm_stats_map_to_the_wire_and_back() -> None:
    report = ArmStatsReport(
        arms=(
            ArmStats(
                model_name="m",
                model_version=2,
                arm="stable",
                sequences=3,
                steps=40,
                drafted=120,
                accepted=90,
                tokens=130,
                draft_seconds=0.5,
                verify_seconds=1.25,
                sequence_outcomes=(
                    SequenceOutcome("a", 20, 60, 45, 65, 0.9, True),
                    SequenceOutcome("b", 20, 60, 45, 65, 0.85, False),
                ),
            ),
        ),
        shadows=(ShadowCalibration("m", 3, 40, 0.6, 0.55, 0.1),),
        fallback_steps=4,
        local_steps=5,
        rejected_outcomes=1,
        seconds_since_reset=12.5,
        replica="host:1:50051",
    )
    assert convert.arm_stats_from_pb(convert.arm_stats_to_pb(report)) == report


# --- one definition: no package restates the γ candidates or a compression-code table ---

# The packages' own source (generated stubs and tests excluded).
SOURCE_ROOTS = ("protos/speckv", "predictor_service", "decode_worker", "client", "benchmarks")
VOCABULARY = REPO / "protos" / "speckv" / "vocabulary.py"
RESTATEMENTS = {
    "the default γ candidates": re.compile(r"[(\[]\s*2\s*,\s*4\s*,\s*6\s*,\s*8\s*,?\s*[)\]]"),
    "the default γ candidates as a flag default": re.compile(r"[\"']2,\s*4,\s*6,\s*8[\"']"),
    "a compression -> comp_enc table": re.compile(r"[\"'](fp16|int8|nf4)[\"']\s*:\s*\d"),
    "a compression wire-value table": re.compile(
        r"COMPRESSION_(FP16|INT8|NF4)\s*:|:\s*[\w.]*COMPRESSION_(FP16|INT8|NF4)\b"
    ),
    "a wire value -> comp_enc subtraction": re.compile(r"compression\s*-\s*1\b"),
    "a window wire-value table": re.compile(
        r"DECISION_WINDOW_(?!UNSPECIFIED)[A-Z_]+\s*:|:\s*[\w.]*DECISION_WINDOW_(?!UNSPECIFIED)"
    ),
    "an objective wire-value table": re.compile(
        r"OBJECTIVE_(TOKENS_PER_STEP|GOODPUT)\s*:|:\s*[\w.]*OBJECTIVE_(TOKENS_PER_STEP|GOODPUT)\b"
    ),
}


def _package_sources() -> list[Path]:
    files: list[Path] = []
    for root in SOURCE_ROOTS:
        for p in sorted((REPO / root).rglob("*.py")):
            if "_pb2" in p.name or "__pycache__" in p.parts:
                continue
            files.append(p)
    return files


def test_the_vocabulary_is_defined_in_one_place() -> None:
    files = _package_sources()
    assert VOCABULARY in files and len(files) > 50  # the scan sees the packages
    found = []
    for p in files:
        if p == VOCABULARY:
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            for what, pattern in RESTATEMENTS.items():
                if pattern.search(line):
                    found.append(f"{p.relative_to(REPO)}:{i}: {what}: {line.strip()}")
    assert not found, "import these from speckv.vocabulary instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        "GAMMAS = (2, 4, 6, 8)",
        'parser.add_argument("--candidates", default="2,4,6,8")',
        "    default=[2, 4, 6, 8],",
        'ENC = {"fp16": 0, "int8": 1, "nf4": 2}',
        "    Compression.NF4: common_pb2.COMPRESSION_NF4,",
        "        return (compression - 1).astype(np.float32)",
        '    cpb.DECISION_WINDOW_PREFIX: "prefix",',
        "    cpb.OBJECTIVE_GOODPUT: Objective.GOODPUT,",
    ],
)
def test_the_scan_finds_the_restatements_it_was_written_for(line: str) -> None:
    """The patterns above match the lines this repository used to restate."""
    assert any(p.search(line) for p in RESTATEMENTS.values())
