"""`speckv-predictor train`: train a model and register it as a new immutable version.

`--model-kind mlp16` (default): SpecKV-MLP16 on step records (the seed's schema), window
same_step or previous_step. `--model-kind instep`: a `draft_plan` model on token records
(`speckv-eval log-steps --tokens-out`), the in-step selector (docs/design.md, "Draft plans").

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    # numpy-level modules (the training libraries load in run()); the flags' defaults are
    # the two configurations' own.
    from speckv_client.flags import default_of

    from predictor_service.manifest import WINDOWS
    from predictor_service.plan_training import PlanTrainConfig
    from predictor_service.training import TrainConfig

    parser.add_argument(
        "--data",
        type=Path,
        default=default_of(TrainConfig, "data"),
        help="mlp16: a step CSV in the seed's schema (default: the project's copy of the "
        "seed's phase2_step_results.csv; a sequence_id column, if present, defines the runs) "
        "or a directory of them, e.g. a worker's --record-steps DIR (every complete *.csv, "
        "sorted, as one data set); instep: a token CSV or a folder of them",
    )
    parser.add_argument("--repo", type=Path, required=True, help="model repository folder")
    parser.add_argument("--name", required=True, help="model name (folder under --repo)")
    parser.add_argument(
        "--model-kind",
        choices=("mlp16", "instep"),
        default="mlp16",
        help="mlp16: SpecKV-MLP16 on step records (needs --window); instep: a draft_plan "
        "model on token records (--data is a token CSV or a folder of them)",
    )
    parser.add_argument(
        "--window",
        choices=WINDOWS,
        default=None,
        help="mlp16 only: same_step: the seed's features; previous_step: the previous "
        "step's draft signals decide this step's gamma",
    )
    parser.add_argument(
        "--max-gamma",
        type=_positive_int,
        default=default_of(PlanTrainConfig, "max_gamma"),
        help="instep: largest draft per step",
    )
    parser.add_argument(
        "--refresh-steps",
        type=_positive_int,
        default=default_of(PlanTrainConfig, "refresh_steps"),
        help="instep: a worker asks for a new plan after this many steps",
    )
    parser.add_argument(
        "--first-scale",
        type=float,
        default=default_of(PlanTrainConfig, "first_scale"),
        help="instep: multiplies the first-token stop threshold (speckv-eval tune-plan)",
    )
    parser.add_argument(
        "--continue-scale",
        type=float,
        default=default_of(PlanTrainConfig, "continue_scale"),
        help="instep: multiplies the continue threshold (speckv-eval tune-plan)",
    )
    parser.add_argument(
        "--version",
        type=_positive_int,
        default=None,
        help="version to register (default: the next free integer); existing versions are "
        "never overwritten",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=default_of(TrainConfig, "seed"),
        help="the MLP's random_state (splits always use 42)",
    )
    parser.add_argument(
        "--skip-heldout-runs",
        action="store_true",
        help="skip the held-out-runs evaluation (its metrics are then null)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from predictor_service.dataset import DataError
    from predictor_service.training import TrainError, VersionExistsError

    try:
        train = _instep(args) if args.model_kind == "instep" else _mlp16(args)
    except ValueError as e:
        print(f"speckv-predictor train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        path, summary = train()
    except (DataError, VersionExistsError) as e:
        print(f"speckv-predictor train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainError as e:
        print(f"speckv-predictor train: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"registered {path}", file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return EXIT_OK


_Train = Callable[[], tuple[Path, dict[str, Any]]]


def _mlp16(args: argparse.Namespace) -> _Train:
    """SpecKV-MLP16 from the flags; ValueError names a bad flag."""
    from predictor_service.training import TrainConfig, train_and_register

    if args.window is None:
        raise ValueError("--window is required for --model-kind mlp16 (same_step or previous_step)")
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

    def train() -> tuple[Path, dict[str, Any]]:
        result = train_and_register(config)
        return result.path, result.summary()

    return train


def _instep(args: argparse.Namespace) -> _Train:
    """A draft_plan model from the flags; ValueError names a bad flag."""
    from predictor_service.plan_training import PlanTrainConfig, train_plan_model

    if args.window not in (None, "draft_plan"):
        raise ValueError(
            f"--window {args.window} does not apply to --model-kind instep (its window is "
            "draft_plan)"
        )
    config = PlanTrainConfig(
        repo=args.repo,
        name=args.name,
        data=args.data,
        version=args.version,
        seed=args.seed,
        max_gamma=args.max_gamma,
        refresh_steps=args.refresh_steps,
        first_scale=args.first_scale,
        continue_scale=args.continue_scale,
        progress=not args.quiet,
    )

    def train() -> tuple[Path, dict[str, Any]]:
        result, extra = train_plan_model(config)
        return result.path, {**result.summary(), **extra}

    return train
