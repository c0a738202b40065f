"""`make loop`: record → retrain → canary → A/B verdict → promote or roll back, as a user runs it.

On the embedded tiny pair, with the real commands (README, "The A/B loop"):

1. `speckv-predictor serve` serves version 1 of `speckv-mlp16` (trained on the seed paper's
   data, previous_step window);
2. `speckv-worker serve --policy remote --record-steps DIR` decodes the training prompts and
   writes every step's record; SIGTERM flushes the last file. Each prompt is decoded with the
   served policy and, as exploration, with every fixed γ candidate (`--record-policies`):
   records of the stable policy alone say nothing about the draft lengths it avoids, and a
   model trained on them extrapolates there (measured: docs/results.md, "The A/B loop");
3. `speckv-predictor train --data DIR` trains version 2 on those records; it is published next
   to the running server, loaded, and routed as a canary (20 % by default, sticky per
   sequence);
4. a fresh worker (not recording) decodes the evaluation prompts through the split; every
   step's outcome reaches the predictor on the Decide stream;
5. `speckv ab speckv-mlp16 --json` gives the per-arm statistics and the verdict; the script
   checks that the predictor's per-arm counts equal what the client saw streamed back;
6. `speckv promote speckv-mlp16 2` when the verdict says v2 is faster, else `speckv rollback`
   (slower, or cannot tell yet: the stable version keeps the traffic); the routing now in
   force is printed.

`--canary max-gamma` replaces step 3's model with a deliberately extreme one: trained on the
records with every drafted step's acceptance overwritten to 1.0, it always drafts the largest
γ — bad where the draft often disagrees (the demo pair: the verdict says slower and the loop
rolls back). `--canary min-gamma` overwrites it to 0.0 and always drafts the smallest γ.
Exit code 0 when every generation succeeded and the predictor's per-arm counts matched the
client's; 1 otherwise (a "slower" verdict is a result, not a failure).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "speckv-mlp16"
PROMPTS_DIR = REPO / "benchmarks" / "prompts"


def log(msg: str) -> None:
    print(f"[loop] {msg}", flush=True)


def run(cmd: Sequence[str | Path | int], *, capture: bool = False) -> str:
    log("$ " + " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], check=False, text=True, capture_output=capture)
    if proc.returncode != 0:
        if capture:
            sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"command failed with exit {proc.returncode}: {cmd[0]} {cmd[1]}")
    return proc.stdout if capture else ""


def load_prompts(path: Path, limit: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if limit:
        rows = rows[:limit]
    return [(r["id"], r["prompt"]) for r in rows]


@dataclass
class ArmSeen:
    """What the client saw streamed back for the steps one arm decided."""

    sequences: set[str] = field(default_factory=set)
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0


@dataclass
class Traffic:
    arms: dict[tuple[int, str], ArmSeen] = field(default_factory=dict)
    sequences: int = 0
    failed: list[str] = field(default_factory=list)
    fallback_steps: int = 0


def drive(
    worker_address: str,
    prompts: list[tuple[str, str]],
    *,
    reps: int,
    max_new_tokens: int,
    tag: str,
    policies: Sequence[str] = ("remote",),
) -> Traffic:
    """Generate every prompt `reps` times under each policy through the worker; tally the
    remote steps per arm."""
    from speckv_client.decoder import DecoderClient
    from speckv_client.types import DecisionSource, GenerationSummary, TokenChunk

    traffic = Traffic()
    client = DecoderClient(worker_address, timeout_s=120.0)
    try:
        for rep in range(reps):
            for (pid, prompt), policy in itertools.product(prompts, policies):
                key = f"{tag}:{pid}:{rep}" + ("" if policy == "remote" else f":{policy}")
                try:
                    summary = None
                    for event in client.generate(
                        prompt, max_new_tokens=max_new_tokens, policy=policy, request_id=key
                    ):
                        if isinstance(event, TokenChunk) and event.step is not None:
                            st = event.step
                            if st.source != DecisionSource.REMOTE:
                                traffic.fallback_steps += 1
                                continue
                            seen = traffic.arms.setdefault((st.model_version, st.arm), ArmSeen())
                            seen.sequences.add(key)
                            seen.steps += 1
                            seen.drafted += st.gamma
                            seen.accepted += st.accepted
                            seen.tokens += st.tokens_produced
                        elif isinstance(event, GenerationSummary):
                            summary = event
                    if summary is None:
                        traffic.failed.append(f"{key}: no summary")
                except Exception as exc:  # counted and reported, never swallowed
                    traffic.failed.append(f"{key}: {exc}")
                traffic.sequences += 1
            log(f"{tag}: {traffic.sequences} sequences done ({len(traffic.failed)} failed)")
    finally:
        client.close()
    return traffic


def overwrite_acceptance(records: Path, out: Path, acceptance: float) -> int:
    """A bad canary's data: every drafted step's acceptance set to 1.0 (all accepted) or 0.0
    (none accepted); returns the rows written."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for src in sorted(records.glob("*.csv")):
        with src.open(newline="") as f_in, (out / src.name).open("w", newline="") as f_out:
            reader = csv.DictReader(f_in)
            assert reader.fieldnames is not None
            writer = csv.DictWriter(f_out, fieldnames=reader.fieldnames)
            writer.writeheader()
            for row in reader:
                gamma = int(row["gamma"] or 0)
                if gamma > 0:
                    accepted = round(gamma * acceptance)
                    row["accepted"] = str(accepted)
                    row["acceptance_rate"] = repr(float(acceptance))
                    row["tokens_produced"] = str(accepted + 1)
                writer.writerow(row)
                n += 1
    return n


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".cache")
    parser.add_argument("--pair-size", default="demo", choices=("test", "demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pair",
        type=Path,
        help="an already built pair folder (default: built or reused in --cache)",
    )
    parser.add_argument("--compression", default="fp16", choices=("fp16", "int8", "nf4"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--train-prompts", type=int, default=0, help="0: all training prompts")
    parser.add_argument("--train-reps", type=int, default=1)
    parser.add_argument(
        "--record-policies",
        default="remote,fixed:2,fixed:4,fixed:6,fixed:8",
        help="policies each training prompt is decoded with while recording: the served one "
        "plus exploration over every γ candidate, so the new version sees the acceptance of "
        "draft lengths the stable version rarely picks (records of the stable policy alone "
        "teach nothing about the γ it avoids)",
    )
    parser.add_argument("--eval-prompts", type=int, default=0, help="0: all evaluation prompts")
    parser.add_argument("--eval-reps", type=int, default=3)
    parser.add_argument("--canary-weight", type=float, default=20.0)
    parser.add_argument(
        "--canary",
        choices=("retrained", "max-gamma", "min-gamma"),
        default="retrained",
        help="retrained: v2 trained on the recorded steps; max-gamma / min-gamma: a model that "
        "always drafts the largest / smallest γ (trained on the records with every acceptance "
        "overwritten to 1.0 / 0.0), to see a decisive verdict",
    )
    parser.add_argument("--json-out", type=Path, help="write the loop's outcome here")
    args = parser.parse_args(argv)

    started = time.monotonic()
    cache = args.cache.resolve()
    work = cache / "loop" / args.canary
    if work.exists():
        shutil.rmtree(work)
    repo, staging, records, logs = (work / d for d in ("repo", "staging", "records", "logs"))
    for d in (repo, staging, records, logs):
        d.mkdir(parents=True)

    if args.pair is not None:
        pair = args.pair.resolve()
    else:
        pair = cache / "tiny-pair" / f"{args.pair_size}-seed{args.seed}"
        run(
            [BIN / "speckv-tiny-pair", "--out", pair, "--size", args.pair_size, "--seed", args.seed]
        )
    seed_model = cache / "loop" / "seed-model"
    if not (seed_model / MODEL / "1" / "manifest.json").exists():
        run(
            [
                BIN / "speckv-predictor",
                "train",
                "--repo",
                seed_model,
                "--name",
                MODEL,
                "--window",
                "previous_step",
                "--version",
                "1",
            ]
        )
    shutil.copytree(seed_model / MODEL / "1", repo / MODEL / "1")

    from speckv_client.predictor import PredictorClient
    from speckv_client.types import RouteWeight, Routing
    from speckv_eval.services import (
        exit_status,
        publish_version,
        start_predictor,
        start_worker,
        stop_services,
    )

    train_prompts = load_prompts(PROMPTS_DIR / "train_prompts.jsonl", args.train_prompts)
    eval_prompts = load_prompts(PROMPTS_DIR / "prompts.jsonl", args.eval_prompts)
    failures: list[str] = []
    outcome: dict[str, object] = {"canary": args.canary, "pair": str(pair)}
    predictor = start_predictor(
        repo,
        default_model=MODEL,
        extra_args=["--grace-seconds", "2"],
        log_path=logs / "predictor.log",
    )
    speckv = [BIN / "speckv"]
    try:
        pc = PredictorClient(predictor.address, timeout_s=10.0)
        # --- 1-2. serve v1, record steps on the training prompts ----------------------------
        log(f"predictor on {predictor.address} serving {MODEL} v1 (seed data)")
        recorder = start_worker(
            pair,
            predictor.address,
            compression=args.compression,
            threads=args.threads,
            extra_args=["--record-steps", records],
            log_path=logs / "worker-record.log",
        )
        t0 = time.monotonic()
        rec_traffic = drive(
            recorder.address,
            train_prompts,
            reps=args.train_reps,
            max_new_tokens=args.max_new_tokens,
            tag="train",
            policies=[p.strip() for p in args.record_policies.split(",") if p.strip()],
        )
        code = recorder.stop()
        log(f"recording worker stopped (exit {code}) after {time.monotonic() - t0:.0f}s")
        failures += rec_traffic.failed
        files = sorted(records.glob("*.csv"))
        n_records = sum(max(0, len(f.read_text().splitlines()) - 1) for f in files)
        log(f"{len(files)} complete record file(s), {n_records} step records in {records}")
        outcome["records"] = n_records

        # --- 3. train v2 on our own records, publish, canary ---------------------------------
        data = records
        if args.canary != "retrained":
            acceptance = 1.0 if args.canary == "max-gamma" else 0.0
            data = work / f"records-acceptance-{acceptance:g}"
            overwrite_acceptance(records, data, acceptance)
            log(f"{args.canary} canary: the records with every acceptance set to {acceptance:g}")
        run(
            [
                BIN / "speckv-predictor",
                "train",
                "--data",
                data,
                "--repo",
                staging,
                "--name",
                MODEL,
                "--window",
                "previous_step",
                "--version",
                "2",
            ]
        )
        publish_version(staging / MODEL / "2", repo, MODEL)
        loaded = pc.load_model(MODEL, 2)
        log(f"published and loaded {MODEL} v{loaded.version}: {loaded.state.value}")
        w = args.canary_weight
        routing = pc.set_routing(
            MODEL,
            Routing(
                weights=(RouteWeight("stable", 100.0 - w), RouteWeight("canary", w)),
                salt=f"loop-{random.Random(args.seed).randrange(1 << 30)}",
                aliases={"stable": 1, "canary": 2},
            ),
        )
        log("routing: " + ", ".join(f"{r.target}={r.weight:g}" for r in routing.weights))
        pc.reset_arm_stats(MODEL)

        # --- 4. traffic on the evaluation prompts ---------------------------------------------
        worker = start_worker(
            pair,
            predictor.address,
            compression=args.compression,
            threads=args.threads,
            log_path=logs / "worker-serve.log",
        )
        try:
            traffic = drive(
                worker.address,
                eval_prompts,
                reps=args.eval_reps,
                max_new_tokens=args.max_new_tokens,
                tag="eval",
            )
            failures += traffic.failed
        finally:
            code = worker.stop()  # SIGTERM: the worker flushes its last outcomes first
            log(f"serving worker stopped (exit {code})")

        # --- 5. the verdict ------------------------------------------------------------------
        report = json.loads(
            run([*speckv, "ab", MODEL, "--predictor", predictor.address, "--json"], capture=True)
        )
        print(run([*speckv, "ab", MODEL, "--predictor", predictor.address], capture=True))
        outcome["ab"] = report
        mismatches = []
        for arm in report["arms"]:
            seen = traffic.arms.get((int(arm["version"]), arm["arm"]), ArmSeen())
            mine = (len(seen.sequences), seen.steps, seen.drafted, seen.accepted, seen.tokens)
            theirs = tuple(
                int(arm[k]) for k in ("sequences", "steps", "drafted", "accepted", "tokens")
            )
            if mine != theirs:
                mismatches.append(
                    f"{arm['arm']} v{arm['version']}: predictor {theirs}, client {mine}"
                )
        for key in traffic.arms:
            if not any((int(a["version"]), a["arm"]) == key for a in report["arms"]):
                mismatches.append(f"arm {key} decided steps the predictor did not count")
        if mismatches:
            failures += [f"per-arm counts differ: {m}" for m in mismatches]
        else:
            log(
                "per-arm (sequences, steps, drafted, accepted, tokens): the predictor's counts "
                "equal the client's streamed step stats exactly"
            )
        verdict = str(report["verdict"])
        faster = verdict.startswith("v2 is faster")
        # --- 6. promote or roll back ----------------------------------------------------------
        if faster:
            print(
                run(
                    [*speckv, "promote", MODEL, "2", "--predictor", predictor.address], capture=True
                )
            )
            action = "promoted v2"
        else:
            print(run([*speckv, "rollback", MODEL, "--predictor", predictor.address], capture=True))
            why = "slower" if "slower" in verdict else "not shown to be faster"
            action = f"rolled back: v2 {why}; stable v1 keeps the traffic"
        log(f"verdict: {verdict} → {action}")
        outcome["verdict"] = verdict
        outcome["action"] = action
        after = pc.get_routing(MODEL)
        outcome["routing_after"] = {
            "weights": {r.target: r.weight for r in after.weights},
            "aliases": dict(after.aliases),
        }
        log(
            "routing now: "
            + ", ".join(f"{r.target}={r.weight:g}" for r in after.weights)
            + f" (aliases {dict(after.aliases)})"
        )
        pc.close()
    finally:
        stop_services([predictor], log)
    outcome["failures"] = failures
    outcome["seconds"] = round(time.monotonic() - started, 1)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(outcome, indent=2) + "\n")
    return exit_status(failures, log, f"done in {outcome['seconds']}s: {len(failures)} failure(s)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
