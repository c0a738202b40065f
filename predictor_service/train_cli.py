"""`speckv-predictor train`: train SpecKV-MLP16 and register it as a new immutable version.

Progress goes to stderr; the last stdout line is one JSON object (name, version, window,
test_mse, test_corr, heldout_runs_mse, heldout_runs_corr, onnx_max_abs_diff) for scripts.
Exit codes: 0 registered; 2 bad input (data, arguments, existing version), nothing written;
1 training or export failed, nothing registered. Training libraries are imported inside
`run()` so that a predictor-only install can still build the CLI parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from predictor_service.manifest import WINDOWS

    default_data = Path(__file__).parent / "data" / "speckv-paper" / "phase2_step_results.csv"
    parser.add_argument(
        "--data",
        type=Path,
        default=default_data,
        help="step CSV in the seed's schema (default: the project's copy of the seed's "
        "phase2_step_results.csv); a sequence_id column, if present, defines the runs",
    )
    parser.add_argument("--repo", type=Path, required=True, help="model repository folder")
    parser.add_argument("--name", required=True, help="model name (folder under --repo)")
    parser.add_argument(
        "--window",
        choices=WINDOWS,
        required=True,
        help="same_step: the seed's features; previous_step: the previous step's draft "
        "signals decide this step's gamma (the serving default)",
    )
    parser.add_argument(
        "--version",
        type=_positive_int,
        default=None,
        help="version to register (default: the next free integer); existing versions are "
        "never overwritten",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="the MLP's random_state (splits always use 42)"
    )
    parser.add_argument(
        "--skip-heldout-runs",
        action="store_true",
        help="skip the held-out-runs evaluation (its metrics are then null)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from predictor_service.seed_data import DataError
    from predictor_service.training import (
        TrainConfig,
        TrainError,
        VersionExistsError,
        train_and_register,
    )

    try:
        config = TrainConfig(
            repo=args.repo,
            name=args.name,
            window=args.window,
            data=args.data,
            version=args.version,
            seed=args.seed,
            heldout_runs=not args.skip_heldout_runs,
            progress=not args.quiet,
        )
    except ValueError as e:
        print(f"speckv-predictor train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = train_and_register(config)
    except (DataError, VersionExistsError) as e:
        print(f"speckv-predictor train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainError as e:
        print(f"speckv-predictor train: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"registered {result.path}", file=sys.stderr)
    print(json.dumps(result.summary()), flush=True)
    return EXIT_OK
