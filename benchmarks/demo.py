"""`make demo`: the whole SpecKV split on the embedded tiny pair, on loopback, in about a minute.

1. builds (or reuses) the demo tiny pair and trains/registers the predictor if absent;
2. starts `speckv-predictor serve` and `speckv-worker serve` on free loopback ports;
3. generates from a handful of prompts through the client with the `remote` policy and with
   `fixed:4`, and prints a comparison table;
4. while a generation runs, registers a second predictor version, routes 50/50 to it and back,
   and shows which version decided each sequence and that no decision failed;
5. stops both services with SIGTERM.

Everything it runs is a real command a user could type; see README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "speckv-mlp16"

PROMPTS: tuple[tuple[str, str], ...] = (
    ("code", "    def __init__(self, name, value):\n"),
    ("math", "The sum of the first ten odd numbers is"),
    ("chat", "Q: How do I read a file line by line in Python?\nA:"),
    ("summarization", "Summarize: The os module provides a portable way of using"),
)


@dataclass(frozen=True)
class DemoConfig:
    cache: Path
    pair_size: str
    seed: int
    max_new_tokens: int
    compression: str
    keep_running: bool


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run(cmd: Sequence[str | Path | int]) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True)


def prepare(config: DemoConfig) -> tuple[Path, Path, Path]:
    """Pair, served repository and the staged second version, built once and cached."""
    pair = config.cache / "tiny-pair" / f"{config.pair_size}-seed{config.seed}"
    run(
        [
            BIN / "speckv-tiny-pair",
            "--out",
            pair,
            "--size",
            config.pair_size,
            "--seed",
            config.seed,
        ]
    )
    repo = config.cache / "demo" / "model_repo"
    if not (repo / MODEL / "1" / "manifest.json").exists():
        run(
            [
                BIN / "speckv-predictor",
                "train",
                "--repo",
                repo,
                "--name",
                MODEL,
                "--window",
                "previous_step",
                "--version",
                "1",
            ]
        )
    # Version 2 is trained into a staging repository and copied in during the live swap,
    # exactly as a CI job would publish a new version next to a running server.
    staging = config.cache / "demo" / "staging"
    if not (staging / MODEL / "2" / "manifest.json").exists():
        run(
            [
                BIN / "speckv-predictor",
                "train",
                "--repo",
                staging,
                "--name",
                MODEL,
                "--window",
                "previous_step",
                "--version",
                "2",
                "--seed",
                "7",
            ]
        )
    stale = repo / MODEL / "2"
    if stale.exists():  # left by an interrupted earlier demo
        shutil.rmtree(stale)
    return pair, repo, staging / MODEL / "2"


def table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".cache")
    parser.add_argument("--pair-size", default="demo", choices=("test", "demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--compression", default="fp16", choices=("fp16", "int8", "nf4"))
    parser.add_argument("--keep-running", action="store_true", help="leave services up (Ctrl-C)")
    args = parser.parse_args(argv)
    config = DemoConfig(
        cache=args.cache.resolve(),
        pair_size=args.pair_size,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        compression=args.compression,
        keep_running=args.keep_running,
    )
    started = time.monotonic()
    pair, repo, staged_v2 = prepare(config)

    from speckv_client.decoder import DecoderClient
    from speckv_client.predictor import PredictorClient
    from speckv_client.types import GenerationSummary, Objective, RouteWeight, Routing
    from speckv_eval.services import (
        ServiceProcess,
        exit_status,
        format_pair_fingerprint,
        pair_fingerprint,
        publish_version,
        start_predictor,
        start_worker,
        stop_services,
    )

    log(format_pair_fingerprint(pair_fingerprint(pair / "draft", pair / "target")))

    # (label, policy, objective): the predictor under both objectives against fixed γ=4.
    arms = (
        ("remote goodput", "remote", Objective.GOODPUT),
        ("remote tokens/step", "remote", Objective.TOKENS_PER_STEP),
        ("fixed:4", "fixed:4", None),
    )

    logs = config.cache / "demo" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_services = time.monotonic()
    log("starting speckv-predictor serve and speckv-worker serve on free loopback ports")
    predictor = start_predictor(
        repo,
        default_model=MODEL,
        extra_args=["--grace-seconds", "2"],
        log_path=logs / "predictor.log",
    )
    worker: ServiceProcess | None = None
    failures: list[str] = []
    try:
        worker = start_worker(
            pair,
            predictor.address,
            compression=config.compression,
            shutdown_grace_s=2.0,
            log_path=logs / "worker.log",
        )
        log(
            f"predictor on {predictor.address}, worker on {worker.address} "
            f"(ready in {time.monotonic() - t_services:.1f}s; logs in {logs})"
        )
        dc = DecoderClient(worker.address, timeout_s=10.0)
        pc = PredictorClient(predictor.address, timeout_s=10.0)
        info = dc.info()
        log(
            f"worker: target {info.target_dtype} on {info.device}, policy {info.policy}, "
            f"window {info.window.value if info.window else '?'}, "
            f"objective {info.objective.value if info.objective else '?'}, "
            f"concurrency: {info.concurrency}"
        )

        # --- 1. remote vs fixed:4 on the same prompts -------------------------------------
        results: dict[str, list[GenerationSummary]] = {label: [] for label, _, _ in arms}
        print()
        for task, prompt in PROMPTS:
            for label, policy, objective in arms:
                text, summary = dc.generate_text(
                    prompt,
                    max_new_tokens=config.max_new_tokens,
                    policy=policy,
                    objective=objective,
                    request_id=f"demo-{task}-{label.replace(' ', '-')}",
                )
                results[label].append(summary)
            print(f"--- {task}: {prompt!r}\n{text!r}\n")
        rows = []
        for policy, summaries in results.items():
            tokens = sum(s.new_tokens for s in summaries)
            steps = sum(s.steps for s in summaries)
            wall = sum(s.wall_seconds for s in summaries)
            drafted = sum(s.mean_gamma * s.steps for s in summaries)
            accepted = sum(s.acceptance_rate * s.mean_gamma * s.steps for s in summaries)
            rows.append(
                (
                    policy,
                    f"{tokens / wall:.1f}",
                    f"{tokens / steps:.2f}",
                    f"{drafted / steps:.2f}",
                    f"{accepted / drafted if drafted else 0:.2f}",
                    str(sum(s.remote_decisions for s in summaries)),
                    str(sum(s.fallback_decisions for s in summaries)),
                )
            )
        header = ("policy", "tokens/s", "tokens/step", "mean γ", "acceptance", "remote", "fallback")
        print(table(rows, header))
        print(
            "(tiny CPU pair, greedy, same prompts; one run each — for honest numbers see "
            "docs/results.md and benchmarks/e2e.py)\n"
        )

        # --- 2. live swap while a generation runs ------------------------------------------
        long_result: dict[str, object] = {}

        def long_generation() -> None:
            try:
                _, s = dc.generate_text(
                    PROMPTS[0][1],
                    max_new_tokens=config.max_new_tokens * 4,
                    policy="remote",
                    request_id="demo-long",
                )
                long_result["summary"] = s
            except Exception as exc:  # reported below, never swallowed
                long_result["error"] = exc

        runner = threading.Thread(target=long_generation)
        runner.start()
        published = publish_version(staged_v2, repo, MODEL)
        log(f"published {published.relative_to(config.cache)}; loading it")
        loaded = pc.load_model(MODEL, 2)
        log(f"{MODEL} v{loaded.version}: {loaded.state.value}")
        routing = pc.set_routing(
            MODEL,
            Routing(
                weights=(RouteWeight("stable", 50.0), RouteWeight("canary", 50.0)),
                salt="demo",
                aliases={"stable": 1, "canary": 2},
            ),
        )
        log(f"routing: {', '.join(f'{w.target}={w.weight:g}' for w in routing.weights)}")
        by_key: dict[str, Counter[str]] = {}
        swap_summaries: list[GenerationSummary] = []
        for i in range(6):
            key = f"demo-ab-{i}"
            _, s = dc.generate_text(
                PROMPTS[i % len(PROMPTS)][1], max_new_tokens=16, policy="remote", request_id=key
            )
            by_key[key] = Counter(s.model_versions)
            swap_summaries.append(s)
        routing = pc.rollback(MODEL)
        log(f"rolled back: {', '.join(f'{w.target}={w.weight:g}' for w in routing.weights)}")
        _, after = dc.generate_text(
            PROMPTS[1][1], max_new_tokens=16, policy="remote", request_id="demo-after"
        )
        by_key["demo-after (after rollback)"] = Counter(after.model_versions)
        swap_summaries.append(after)
        runner.join(timeout=300)
        if "error" in long_result:
            failures.append(f"long generation failed: {long_result['error']}")
        long_summary = long_result.get("summary")
        if isinstance(long_summary, GenerationSummary):
            by_key["demo-long (ran through the swap)"] = Counter(long_summary.model_versions)
            swap_summaries.append(long_summary)
        # A version an alias still points at cannot be unloaded: retire the alias first.
        pc.set_routing(
            MODEL,
            Routing(weights=(RouteWeight("stable", 100.0),), salt="demo", aliases={"stable": 1}),
        )
        pc.unload_model(MODEL, 2)
        shutil.rmtree(published)
        log(f"retired alias canary, unloaded {MODEL} v2 and removed it from the repository")

        print("\nwhich predictor version decided each sequence (sticky by sequence id):")
        for key, counts in by_key.items():
            decided = ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())) or "none"
            print(f"  {key:<34} {decided}")
        remote_runs = [s for (label, p, _) in arms if p == "remote" for s in results[label]]
        remote_runs += swap_summaries
        fallback = sum(s.fallback_decisions for s in remote_runs)
        remote = sum(s.remote_decisions for s in remote_runs)
        # The first step of a sequence has no features yet and always uses the fallback γ.
        unexpected = fallback - len(remote_runs)
        print(
            f"\nremote-policy sequences: {len(remote_runs)}; decisions: {remote} remote, "
            f"{fallback} fallback ({len(remote_runs)} of them first steps, {unexpected} failed "
            f"or late); failed generations: {len(failures)}"
        )
        if unexpected > 0:
            failures.append(f"{unexpected} decisions fell back after the first step")
        dc.close()
        pc.close()
        if config.keep_running:
            log("services are up; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        stop_services([worker, predictor], log)
    return exit_status(failures, log, f"done in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
