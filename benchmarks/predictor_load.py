"""Load figure of the predictor: many concurrent Decide streams, one row per message.

    .venv/bin/python benchmarks/predictor_load.py [--streams 200] [--seconds 20]
        [--interval-ms 100] [--channels 20] [--repo REPO --model NAME] [--json out.json]

Starts the real `speckv-predictor serve` as a subprocess on 127.0.0.1 (port 0), opens
`--streams` Decide streams at once over `--channels` connections, and on each stream sends
one single-row message, waits for its answer, and sends the next one `--interval-ms` after
the previous send (at once when it is late), for `--seconds`. Reports p50/p99 latency per
message, first-answer latency per stream (stream opened -> first answer, all streams
opening together), errors (per-message errors and broken streams), answers/s, the server's
RSS before and after, the server's CPU seconds, and the load average. Every loop is
bounded by the deadline; every wait has a timeout. Without `--repo` it trains the seed's
MLP-16 into a temporary repository first (about 5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from speckv_eval.services import start_predictor

WAIT_S = 10.0  # the longest any single answer may take before it counts as an error


@dataclass
class StreamResult:
    first_answer_s: float | None = None
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_serving(address: str, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"predictor at {address} was not SERVING within {timeout_s} s")


async def run_load(
    address: str, model: str, streams: int, channels: int, seconds: float, interval_s: float
) -> list[StreamResult]:
    import grpc
    from speckv.v1 import common_pb2 as cpb
    from speckv.v1 import predictor_pb2 as pb
    from speckv.v1 import predictor_pb2_grpc as pb_grpc

    chans = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    for ch in chans:
        await asyncio.wait_for(ch.channel_ready(), timeout=WAIT_S)
    stubs = [pb_grpc.PredictorServiceStub(ch) for ch in chans]
    start = asyncio.Event()
    results = [StreamResult() for _ in range(streams)]

    def message(stream: int, i: int) -> pb.DecideRequest:
        f = ((stream * 7 + i) % 17) / 17.0
        return pb.DecideRequest(
            request_id=i + 1,
            rows=[
                pb.FeatureRow(
                    routing_key=f"load-{stream}",
                    step=i,
                    signals=cpb.DraftSignals(
                        mean_draft_entropy=0.3 + 2 * f,
                        mean_draft_confidence=0.9 - 0.5 * f,
                        max_draft_entropy=1.0 + 3 * f,
                        min_draft_confidence=0.5 - 0.4 * f,
                    ),
                    compression=cpb.COMPRESSION_INT8,
                )
            ],
            window=cpb.DECISION_WINDOW_SAME_STEP,
            gamma_candidates=[0, 2, 4, 6, 8],
            objective=cpb.OBJECTIVE_TOKENS_PER_STEP,
            model=cpb.ModelSelector(name=model),
        )

    async def one(k: int, end: float) -> None:
        res = results[k]
        await start.wait()
        opened = time.perf_counter()
        call = stubs[k % len(stubs)].Decide()
        i = 0
        next_send = opened
        try:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await asyncio.wait_for(call.write(message(k, i)), timeout=WAIT_S)
                resp = await asyncio.wait_for(call.read(), timeout=WAIT_S)
                t1 = time.perf_counter()
                if resp is grpc.aio.EOF:
                    res.errors.append("stream ended")
                    return
                if resp.HasField("error"):
                    res.errors.append(f"{resp.error.field}: {resp.error.message}")
                elif res.first_answer_s is None:
                    res.first_answer_s = t1 - opened
                res.latencies_s.append(t1 - t0)
                i += 1
                next_send = max(next_send + interval_s, t1) if interval_s > 0 else t1
                delay = next_send - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.wait_for(call.done_writing(), timeout=WAIT_S)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError) as e:
            res.errors.append(repr(e)[:200])
        finally:
            call.cancel()

    end = time.perf_counter() + seconds
    tasks = [asyncio.create_task(one(k, end)) for k in range(streams)]
    await asyncio.sleep(0.1)  # every task is waiting on `start`
    start.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 4 * WAIT_S)
    for ch in chans:
        await ch.close()
    return results


def summarise(results: list[StreamResult], seconds: float) -> dict[str, Any]:
    lat = np.array([x for r in results for x in r.latencies_s]) * 1e3
    first = np.array([r.first_answer_s for r in results if r.first_answer_s is not None]) * 1e3
    errors = [e for r in results for e in r.errors]
    return {
        "messages": int(lat.size),
        "answers_per_s": float(lat.size / seconds),
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "max_ms": float(lat.max()) if lat.size else None,
        "first_answer_p50_ms": float(np.percentile(first, 50)) if first.size else None,
        "first_answer_max_ms": float(first.max()) if first.size else None,
        "streams_without_answer": int(sum(r.first_answer_s is None for r in results)),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--interval-ms", type=float, default=100.0, help="per stream; 0 = closed loop")
    p.add_argument("--channels", type=int, default=20, help="connections the streams share")
    p.add_argument("--repo", type=Path, default=None, help="model repository to serve")
    p.add_argument("--model", default="speckv-mlp16-same-step", help="a same_step model")
    p.add_argument("--server-arg", action="append", default=[], help="extra serve flag")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if not (1 <= args.streams <= 10_000 and 0 < args.seconds <= 600 and args.channels >= 1):
        p.error("--streams in [1, 10000], --seconds in (0, 600], --channels >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        repo = args.repo
        if repo is None:
            from predictor_service.training import TrainConfig, train_and_register

            repo = Path(tmp)
            print("training the seed's MLP-16 (same_step) into a temporary repository ...")
            train_and_register(
                TrainConfig(
                    repo=repo,
                    name=args.model,
                    window="same_step",
                    version=1,
                    heldout_runs=False,
                    progress=False,
                )
            )
        extra = ["--log-level", "WARNING", "--max-decide-streams", str(max(1024, args.streams))]
        with start_predictor(
            repo, default_model=args.model, extra_args=extra + args.server_arg
        ) as server:
            asyncio.run(wait_serving(server.address, 60))
            rss_before = rss_kib(server.pid)
            cpu_before = cpu_seconds(server.pid)
            load_before = os.getloadavg()
            print(
                f"{args.streams} streams over {args.channels} connections, 1 row/message, "
                f"every {args.interval_ms:g} ms per stream, {args.seconds:g} s ...",
                flush=True,
            )
            t0 = time.perf_counter()
            results = asyncio.run(
                run_load(
                    server.address,
                    args.model,
                    args.streams,
                    args.channels,
                    args.seconds,
                    args.interval_ms / 1e3,
                )
            )
            wall = time.perf_counter() - t0
            load_after = os.getloadavg()
            time.sleep(0.5)  # let the server close the streams
            rss_after = rss_kib(server.pid)
            cpu = cpu_seconds(server.pid) - cpu_before
    out = {
        "streams": args.streams,
        "channels": args.channels,
        "seconds": args.seconds,
        "interval_ms": args.interval_ms,
        **summarise(results, args.seconds),
        "server_rss_before_mib": round(rss_before / 1024, 1),
        "server_rss_after_mib": round(rss_after / 1024, 1),
        "server_cpu_seconds": round(cpu, 2),
        "server_cpu_share": round(cpu / wall, 2),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
