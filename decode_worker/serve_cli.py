"""`speckv-worker serve`: load a pair once and serve DecoderService until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from types import FrameType

from speckv_client import flags
from speckv_client.types import ModelSelector, Objective, Window

from decode_worker.config import (
    FALLBACK_MODES,
    MAX_PROMPT_BYTES,
    MAX_ROUTING_KEY_BYTES,
    PROMPT_BYTES_PER_POSITION,
    ConfigError,
    EngineConfig,
    RecordConfig,
    RemotePolicyConfig,
    WorkerConfig,
)
from decode_worker.policies import POLICY_FORMS, PolicyError, parse_local_policy

# Every default below is read from the config dataclass the flag fills (one source); the
# exceptions are flags whose empty value means "decide at start": --policy (remote with
# --predictor, else heuristic), --window (the predictor's model's) and --objective ("model":
# the manifest's default, where RemotePolicyConfig's own default is goodput).
_RECORD_MAX_BYTES: int = flags.default_of(RecordConfig, "max_bytes")
_RECORD_MAX_SECONDS: float = flags.default_of(RecordConfig, "max_seconds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", required=True, help="draft model: local directory or hub name")
    parser.add_argument("--target", required=True, help="target model: local directory or hub name")
    parser.add_argument(
        "--compression",
        default=flags.default_of(WorkerConfig, "compression"),
        choices=("fp16", "int8", "nf4"),
    )
    parser.add_argument(
        "--device",
        default=flags.default_of(WorkerConfig, "device"),
        choices=("auto", "cpu", "cuda"),
    )
    parser.add_argument(
        "--predictor",
        default="",
        type=flags.target(required=False),
        help="predictor HOST:PORT (remote policy)",
    )
    parser.add_argument(
        "--policy",
        default="",
        help=f"default gamma policy: {POLICY_FORMS} (default: remote with --predictor, "
        "else heuristic)",
    )
    parser.add_argument(
        "--host", default=flags.default_of(WorkerConfig, "host"), type=flags.bind_host
    )
    parser.add_argument(
        "--port",
        type=flags.port(allow_zero=True),
        default=flags.default_of(WorkerConfig, "port"),
        help="0 picks a free port",
    )
    parser.add_argument(
        "--window",
        default="",
        choices=("", "previous_step", "prefix", "draft_plan"),
        help="remote decision window (default: the one the predictor's model declares; "
        "a given window must match it)",
    )
    parser.add_argument(
        "--objective",
        default="model",
        choices=("goodput", "tokens_per_step", "model"),
        help="default 'model': the model manifest's default objective",
    )
    parser.add_argument(
        "--fallback-gamma", type=int, default=flags.default_of(RemotePolicyConfig, "fallback_gamma")
    )
    parser.add_argument(
        "--fallback-mode",
        default=flags.default_of(RemotePolicyConfig, "fallback_mode"),
        choices=FALLBACK_MODES,
    )
    parser.add_argument(
        "--decision-timeout-ms",
        type=float,
        default=flags.default_of(RemotePolicyConfig, "decision_timeout_s") * 1000.0,
        help="how long a step waits for a late predictor answer before the fallback",
    )
    parser.add_argument(
        "--gamma-candidates",
        default=",".join(str(g) for g in flags.default_of(RemotePolicyConfig, "gamma_candidates")),
        help="comma-separated gammas the predictor chooses among (0 = plain target step)",
    )
    parser.add_argument("--predictor-model", default="", help="pin a predictor model name")
    parser.add_argument(
        "--no-report-outcomes",
        action="store_true",
        help="do not report step outcomes to the predictor (its A/B arm statistics then "
        "miss this worker's steps)",
    )
    parser.add_argument(
        "--max-new-tokens-limit",
        type=flags.int_range(1, flags.UINT32_MAX),
        default=flags.default_of(EngineConfig, "max_new_tokens_limit"),
    )
    parser.add_argument(
        "--default-max-new-tokens",
        type=flags.int_range(1, flags.UINT32_MAX),
        default=flags.default_of(EngineConfig, "default_max_new_tokens"),
    )
    parser.add_argument(
        "--max-gamma",
        type=flags.int_range(1, 64),
        default=flags.default_of(EngineConfig, "max_gamma"),
    )
    parser.add_argument(
        "--max-concurrent-requests",
        type=flags.int_range(1, flags.INT32_MAX),
        default=flags.default_of(WorkerConfig, "max_concurrent_requests"),
        help="Generate calls run at once; one more is refused with RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--max-prompt-bytes",
        type=flags.int_range(0, MAX_PROMPT_BYTES),
        default=flags.default_of(WorkerConfig, "max_prompt_bytes"),
        help="refuse longer prompts (UTF-8 bytes) before tokenizing; "
        f"0: {PROMPT_BYTES_PER_POSITION} x the pair's positions",
    )
    parser.add_argument(
        "--max-stop-strings",
        type=flags.int_range(0, 1024),
        default=flags.default_of(WorkerConfig, "max_stop_strings"),
        help="per request",
    )
    parser.add_argument(
        "--max-stop-string-bytes",
        type=flags.int_range(1, 65536),
        default=flags.default_of(WorkerConfig, "max_stop_string_bytes"),
        help="UTF-8 bytes per stop string",
    )
    parser.add_argument(
        "--max-request-id-bytes",
        type=flags.int_range(1, MAX_ROUTING_KEY_BYTES),
        default=flags.default_of(WorkerConfig, "max_request_id_bytes"),
        help="UTF-8 bytes of a request_id (it is the predictor's routing key)",
    )
    parser.add_argument(
        "--log-steps",
        default=flags.default_of(WorkerConfig, "log_steps"),
        help="append drafted steps' records to this one CSV (evaluation; see --record-steps)",
    )
    parser.add_argument(
        "--record-steps",
        default="",
        metavar="DIR",
        help="write every step's record to rotating CSV files in DIR, each complete or absent "
        "(speckv-predictor train --data DIR reads them)",
    )
    parser.add_argument(
        "--record-max-bytes",
        type=flags.int_range(4096, 1 << 40),
        default=_RECORD_MAX_BYTES,
        help="close a record file before it grows past this "
        f"(default {_RECORD_MAX_BYTES >> 20} MiB)",
    )
    parser.add_argument(
        "--record-max-seconds",
        type=flags.float_range(0.0, 86400.0, lo_open=True),
        default=_RECORD_MAX_SECONDS,
        help="close a record file this old, so its records become readable "
        f"(default {_RECORD_MAX_SECONDS:g})",
    )
    parser.add_argument(
        "--record-max-files",
        type=flags.int_range(1, 1_000_000),
        default=flags.default_of(RecordConfig, "max_files"),
        help="complete record files kept in DIR; the oldest are deleted beyond this",
    )
    parser.add_argument(
        "--metrics-port",
        type=flags.port(allow_zero=True),
        default=flags.default_of(WorkerConfig, "metrics_port"),
        help="serve Prometheus /metrics on this port (0: a free port; default: off)",
    )
    parser.add_argument(
        "--record-task",
        default=flags.default_of(EngineConfig, "record_task"),
        help="task label in step records",
    )
    parser.add_argument(
        "--shutdown-grace-s",
        type=flags.float_range(0.0, flags.MAX_SECONDS),
        default=flags.default_of(WorkerConfig, "shutdown_grace_s"),
    )
    parser.add_argument(
        "--threads",
        type=flags.int_range(0, flags.MAX_THREADS),
        default=0,
        help="torch CPU threads (0: default)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the timing warm-up")
    parser.add_argument(
        "--batching",
        default="on" if flags.default_of(WorkerConfig, "batching") else "off",
        choices=("on", "off"),
        help="on: one scheduler thread runs concurrent requests as one batch (batched draft "
        "and verify forwards; docs/worker.md, 'Batching'); off: they interleave step by step",
    )
    parser.add_argument(
        "--max-batch-size",
        type=flags.int_range(1, 1024),
        default=flags.default_of(WorkerConfig, "max_batch_size"),
        help="with --batching on: sequences in the running batch",
    )
    parser.add_argument(
        "--max-queue",
        type=flags.int_range(0, 65536),
        default=flags.default_of(WorkerConfig, "max_queue"),
        help="with --batching on: requests waiting to join; one more is refused with "
        "RESOURCE_EXHAUSTED",
    )


def build_config(args: argparse.Namespace) -> WorkerConfig:
    """Flags → WorkerConfig; raises ConfigError/PolicyError with the offending flag named."""
    policy = args.policy or ("remote" if args.predictor else "heuristic")
    if parse_local_policy(policy) is None and not args.predictor:
        raise ConfigError("--policy remote needs --predictor HOST:PORT")
    try:
        candidates = tuple(int(g) for g in args.gamma_candidates.split(",") if g.strip())
    except ValueError:
        raise ConfigError(
            f"--gamma-candidates {args.gamma_candidates!r}: give integers like 2,4,6,8"
        ) from None
    remote = RemotePolicyConfig(
        window=Window(args.window or "previous_step"),
        objective=None if args.objective == "model" else Objective(args.objective),
        gamma_candidates=candidates,
        fallback_gamma=args.fallback_gamma,
        fallback_mode=args.fallback_mode,
        decision_timeout_s=args.decision_timeout_ms / 1000.0,
        model=ModelSelector(name=args.predictor_model) if args.predictor_model else None,
        plan_max_gamma=args.max_gamma,
        report_outcomes=not args.no_report_outcomes,
    )
    engine = EngineConfig(
        default_max_new_tokens=min(args.default_max_new_tokens, args.max_new_tokens_limit),
        max_new_tokens_limit=args.max_new_tokens_limit,
        max_gamma=args.max_gamma,
        record_task=args.record_task,
    )
    return WorkerConfig(
        draft=args.draft,
        target=args.target,
        compression=args.compression,
        device=args.device,
        predictor=args.predictor,
        policy=policy,
        host=args.host,
        port=args.port,
        log_steps=args.log_steps,
        record=_record_config(args),
        metrics_port=args.metrics_port,
        engine=engine,
        remote=remote,
        shutdown_grace_s=args.shutdown_grace_s,
        max_concurrent_requests=args.max_concurrent_requests,
        max_prompt_bytes=args.max_prompt_bytes,
        max_stop_strings=args.max_stop_strings,
        max_stop_string_bytes=args.max_stop_string_bytes,
        max_request_id_bytes=args.max_request_id_bytes,
        warmup=not args.no_warmup,
        batching=args.batching == "on",
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        learn_window=bool(args.predictor) and not args.window,
        check_window=bool(args.predictor) and bool(args.window),
    )


def _record_config(args: argparse.Namespace) -> RecordConfig | None:
    if not args.record_steps:
        return None
    if args.log_steps:
        raise ConfigError(
            "--log-steps and --record-steps both record steps; give one (--record-steps DIR "
            "is the production one: rotating files, every step)"
        )
    return RecordConfig(
        directory=args.record_steps,
        max_bytes=args.record_max_bytes,
        max_seconds=args.record_max_seconds,
        max_files=args.record_max_files,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = build_config(args)
    except (ConfigError, PolicyError, ValueError) as err:
        print(f"speckv-worker serve: {err}", file=sys.stderr)
        return 2
    import torch

    from decode_worker.pair import PairConfig, PairLoadError, load_pair
    from decode_worker.server import WorkerServer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        pair = load_pair(
            PairConfig(
                draft=config.draft,
                target=config.target,
                compression=config.compression,
                device=config.device,
            )
        )
    except PairLoadError as err:
        print(f"speckv-worker serve: {err}", file=sys.stderr)
        return 2
    # Handlers before the server starts: a SIGTERM that arrives as soon as "listening on" is
    # printed (or during warm-up) must drain, not kill the process with the default action.
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server = WorkerServer(config, pair, describe=pair.describe()).start()
    except ConfigError as err:  # e.g. --window does not match the predictor's model
        print(f"speckv-worker serve: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"speckv-worker serve: {err}", file=sys.stderr)
        return 1
    print(f"listening on {server.address}", flush=True)
    if server.metrics_url:
        print(f"metrics on {server.metrics_url}", flush=True)
    stop.wait()
    logging.getLogger(__name__).info("shutting down (grace %.1f s)", config.shutdown_grace_s)
    server.stop()
    # Exempt every object alive now from the interpreter's collections at exit: with torch
    # and transformers loaded, that final garbage collection took 3-8 s after the server
    # had stopped (measured on a loaded 2-core machine; 0.6 s with the freeze).
    gc.freeze()
    return 0
