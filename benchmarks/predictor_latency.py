"""Decision latency and throughput of the predictor, the seed's way and the served way.

    .venv/bin/python benchmarks/predictor_latency.py [--seconds 3] [--json out.json]

(a) the seed's way: sklearn MLPRegressor, 4 `predict` calls (one per γ) and an argmax;
(b) in-process onnxruntime: one 4-candidate decision, all candidates in one run
    (b0: the bare `session.run`; b1: the server's full decision code without protobuf);
(c) over a gRPC Decide stream on loopback, one row per message, 1 and 8 concurrent streams;
(d) several rows per message, 32 concurrent streams;
(c0) the floor under (c): the same client against a bare grpc.aio Decide that answers every
    message with a prebuilt one-row response (no decision work), so (c) - (c0) is what the
    predictor itself adds per message.
The server is the real `speckv-predictor serve` in a subprocess, so client and server do not
share a GIL; on a 2-core machine they still share the cores, which the report says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from speckv.vocabulary import DEFAULT_GAMMA_CANDIDATES as GAMMAS


def percentiles(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(samples_s) * 1e6
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99))}


def time_calls(fn: Callable[[], object], seconds: float) -> list[float]:
    for _ in range(200):
        fn()
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_sklearn(x_row: np.ndarray, seed_csv: Path, seconds: float) -> dict[str, Any]:
    """(a) the seed's overhead: a fitted MLPRegressor((16,)), one predict per candidate."""
    import warnings

    from sklearn.neural_network import MLPRegressor

    from predictor_service.dataset import read_step_records, window_data

    data = window_data(read_step_records(seed_csv), "same_step")
    model = MLPRegressor(hidden_layer_sizes=(16,), max_iter=500, random_state=42)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data.x, data.y)
    rows = [np.append(x_row[:5], g).reshape(1, 6) for g in GAMMAS]

    def seed_decision() -> int:
        scores = [
            float(np.clip(model.predict(r)[0], 0, 1)) * g + 1
            for r, g in zip(rows, GAMMAS, strict=True)
        ]
        return GAMMAS[int(np.argmax(scores))]

    samples = time_calls(seed_decision, seconds)
    return {"name": "(a) sklearn, 4 predict calls", **percentiles(samples), "n": len(samples)}


def bench_onnx(repo: Path, name: str, x_row: np.ndarray, seconds: float) -> list[dict[str, Any]]:
    from predictor_service.decisions import CandidateSet, Objective, StepTiming, choose_gamma
    from predictor_service.repository import load_version

    version = load_version(repo / name / "1")
    session = version._session
    x4 = np.stack([np.append(x_row[:5], g) for g in GAMMAS]).astype(np.float32)
    feeds = {version.manifest.onnx.input_name: x4}
    outputs = [version.manifest.onnx.output_name]
    bare = time_calls(lambda: session.run(outputs, feeds), seconds)
    signals = x_row[None, :4].astype(np.float64)
    comp = np.array([x_row[4]], dtype=np.float32)
    cands = CandidateSet.of(GAMMAS)
    timing = StepTiming(0.0014, 0.0051, 0.0004)
    full = time_calls(
        lambda: choose_gamma(version.predict, signals, comp, cands, Objective.GOODPUT, timing),
        seconds,
    )
    return [
        {"name": "(b0) onnxruntime session.run, 4 candidates", **percentiles(bare), "n": len(bare)},
        {
            "name": "(b1) full decision (features, run, goodput, argmax)",
            **percentiles(full),
            "n": len(full),
        },
    ]


def start_server(repo: Path, model: str) -> tuple[subprocess.Popen[str], str]:
    exe = Path(sys.executable).with_name("speckv-predictor")
    cmd = [
        str(exe),
        "serve",
        "--repo",
        str(repo),
        "--port",
        "0",
        "--default-model",
        model,
        "--log-level",
        "WARNING",
        "--max-batch-rows",
        "1024",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = ""
    for line in proc.stdout:
        if m := re.search(r"listening on (\S+)", line):
            address = m.group(1)
        if line.startswith("serving "):
            return proc, address
    raise RuntimeError("the server exited before serving")


def start_echo_server() -> tuple[subprocess.Popen[str], str]:
    """The (c0) floor: this script in `--echo-server` mode, in its own process like the server."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--echo-server"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"listening on (\S+)", line):
            return proc, m.group(1)
    raise RuntimeError("the echo server exited before listening")


async def echo_server() -> None:
    """A Decide that does no work: one prebuilt decision of the size the server sends."""
    import grpc
    from speckv.v1 import predictor_pb2 as pb
    from speckv.v1 import predictor_pb2_grpc as pb_grpc

    answer = pb.DecideResponse(
        decisions=[
            pb.Decision(
                routing_key="bench-0-0",
                gamma=8,
                candidates=[
                    pb.CandidateScore(gamma=g, predicted_acceptance=0.5, score=1.0) for g in GAMMAS
                ],
                model_name="speckv-mlp16-same-step",
                model_version=1,
                arm="v1",
            )
        ]
    )

    class Echo(pb_grpc.PredictorServiceServicer):
        async def Decide(self, request_iterator: Any, context: Any) -> None:
            async for req in request_iterator:
                answer.request_id = req.request_id
                await context.write(answer)

    server = grpc.aio.server()
    pb_grpc.add_PredictorServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def bench_grpc(address: str, streams: int, rows: int, seconds: float) -> dict[str, Any]:
    import grpc
    from speckv.v1 import common_pb2 as cpb
    from speckv.v1 import predictor_pb2 as pb
    from speckv.v1 import predictor_pb2_grpc as pb_grpc

    def make(i: int) -> pb.DecideRequest:
        return pb.DecideRequest(
            rows=[
                pb.FeatureRow(
                    routing_key=f"bench-{i}-{j}",
                    step=j,
                    signals=cpb.DraftSignals(
                        mean_draft_entropy=0.9,
                        mean_draft_confidence=0.7,
                        max_draft_entropy=2.1,
                        min_draft_confidence=0.3,
                    ),
                    compression=cpb.COMPRESSION_INT8,
                )
                for j in range(rows)
            ],
            window=cpb.DECISION_WINDOW_SAME_STEP,
            gamma_candidates=list(GAMMAS),
            objective=cpb.OBJECTIVE_TOKENS_PER_STEP,
        )

    latencies: list[float] = []
    decided = 0
    errors = 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.PredictorServiceStub(ch)

        async def one(i: int, until: float, record: bool) -> None:
            nonlocal decided, errors
            req = make(i)
            call = stub.Decide()
            rid = 0
            while time.perf_counter() < until:
                rid += 1
                req.request_id = rid
                t0 = time.perf_counter()
                await call.write(req)
                resp = await call.read()
                dt = time.perf_counter() - t0
                if record:
                    if resp.HasField("error"):
                        errors += 1
                    else:
                        latencies.append(dt)
                        decided += len(resp.decisions)
            await call.done_writing()

        warm = time.perf_counter() + min(1.0, seconds / 3)
        await asyncio.gather(*(one(i, warm, False) for i in range(streams)))
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, t0 + seconds, True) for i in range(streams)))
        wall = time.perf_counter() - t0
    return {
        **percentiles(latencies),
        "messages": len(latencies),
        "decisions_per_s": decided / wall,
        "errors": errors,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per scenario")
    p.add_argument("--rows", type=int, default=64, help="rows per message in (d)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.echo_server:  # the (c0) floor's server process
        asyncio.run(echo_server())
        return 0

    from predictor_service.training import SEED_CSV, TrainConfig, train_and_register

    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        name = "speckv-mlp16-same-step"
        print("training the seed's MLP-16 and exporting it to ONNX ...", flush=True)
        train_and_register(
            TrainConfig(
                repo=repo,
                name=name,
                window="same_step",
                version=1,
                heldout_runs=False,
                progress=False,
            )
        )
        x_row = np.array([0.9, 0.7, 2.1, 0.3, 1.0, 4.0])
        print("(a) sklearn ...", flush=True)
        results.append(bench_sklearn(x_row, SEED_CSV, args.seconds))
        print("(b) in-process onnxruntime ...", flush=True)
        results.extend(bench_onnx(repo, name, x_row, args.seconds))
        print("(c0) gRPC floor: echo server, same client ...", flush=True)
        echo, echo_address = start_echo_server()
        try:
            r = asyncio.run(bench_grpc(echo_address, 1, 1, args.seconds))
            results.append({"name": "(c0) gRPC floor: bare echo, 1 row/message, 1 stream", **r})
        finally:
            echo.terminate()
            echo.wait(timeout=30)
        proc, address = start_server(repo, name)
        try:
            for label, streams, rows in (
                ("(c) gRPC stream, 1 row/message, 1 stream", 1, 1),
                ("(c) gRPC stream, 1 row/message, 8 streams", 8, 1),
                (f"(d) gRPC stream, {args.rows} rows/message, 32 streams", 32, args.rows),
            ):
                print(f"{label} ...", flush=True)
                r = asyncio.run(bench_grpc(address, streams, rows, args.seconds))
                results.append({"name": label, **r})
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    base = results[0]["p50_us"]
    for r in results:
        r["speedup_vs_a_p50"] = base / r["p50_us"]
    load_after = os.getloadavg()
    print()
    print(
        f"cores: {os.cpu_count()}, load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f}"
    )
    print("| scenario | p50 | p99 | decisions/s | p50 vs (a) |")
    print("|---|---|---|---|---|")
    for r in results:
        dps = r.get("decisions_per_s")
        dps_text = f"{dps:,.0f}" if dps is not None else f"{1e6 / r['p50_us']:,.0f} (1/p50)"
        print(
            f"| {r['name']} | {r['p50_us']:.1f} µs | {r['p99_us']:.1f} µs | {dps_text} | "
            f"{r['speedup_vs_a_p50']:.1f}× |"
        )
    summary = {
        "cores": os.cpu_count(),
        "loadavg_before": load_before[0],
        "loadavg_after": load_after[0],
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
