"""Request builders and server fixtures' plumbing shared by the predictor tests."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from speckv.v1 import common_pb2 as cpb
from speckv.v1 import predictor_pb2 as pb

MODEL = "speckv-mlp16"
SAME_STEP_MODEL = "speckv-mlp16-same-step"
TOKEN = "s3cret-admin"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
TIMING = pb.StepTiming(
    draft_seconds_per_token=0.0014, verify_base_seconds=0.0051, verify_seconds_per_token=0.0004
)


def signals(i: int = 0) -> cpb.DraftSignals:
    """Plausible draft signals that vary with i, so rows differ."""
    f = (i % 17) / 17.0
    return cpb.DraftSignals(
        mean_draft_entropy=0.3 + 2.0 * f,
        mean_draft_confidence=0.9 - 0.5 * f,
        max_draft_entropy=1.0 + 3.0 * f,
        min_draft_confidence=0.5 - 0.4 * f,
    )


def row(key: str, i: int = 0, compression: int = cpb.COMPRESSION_INT8) -> pb.FeatureRow:
    return pb.FeatureRow(routing_key=key, step=i, signals=signals(i), compression=compression)


def request(
    request_id: int = 1,
    keys: Sequence[str] = ("seq-0",),
    window: int = cpb.DECISION_WINDOW_PREVIOUS_STEP,
    gammas: Sequence[int] = (0, 2, 4, 6, 8),
    objective: int = cpb.OBJECTIVE_GOODPUT,
    timing: pb.StepTiming | None = TIMING,
    model: cpb.ModelSelector | None = None,
) -> pb.DecideRequest:
    req = pb.DecideRequest(
        request_id=request_id,
        rows=[row(k, i) for i, k in enumerate(keys)],
        window=window,
        gamma_candidates=list(gammas),
        objective=objective,
        model=model,
    )
    if timing is not None:
        req.timing.CopyFrom(timing)
    return req


def copy_version(repo: Path, name: str, src: int, dst: int) -> Path:
    """A new complete version: copy, rewrite the manifest's version, rename into place."""
    import json

    tmp = repo / name / f".tmp-{dst}-test"
    shutil.copytree(repo / name / str(src), tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = dst
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    final = repo / name / str(dst)
    tmp.rename(final)
    return final


def decide_one(stub: object, req: pb.DecideRequest) -> pb.DecideResponse:
    """Send one message on a fresh stream and return its single answer."""
    (resp,) = list(stub.Decide(iter([req]), timeout=30))  # type: ignore[attr-defined]
    return resp
