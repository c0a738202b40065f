"""`speckv-eval log-steps`: the worker's records from a real pair train a previous_step
model, and evaluation prompts are refused as training prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from speckv_eval.log_steps import (
    DEFAULT_EXCLUDE,
    DEFAULT_TRAIN_PROMPTS,
    LogConfig,
    check_disjoint,
    corpus_snippets,
    log_steps,
)
from speckv_eval.replay_run import load_prompts


def test_shipped_training_prompts_are_not_evaluation_prompts() -> None:
    train = load_prompts(DEFAULT_TRAIN_PROMPTS)
    check_disjoint(train, (DEFAULT_EXCLUDE,))
    assert {p.task for p in train} == {"code", "math", "chat", "summarization"}


def test_evaluation_prompt_is_refused() -> None:
    leaked = load_prompts(DEFAULT_EXCLUDE, limit=1)
    with pytest.raises(ValueError, match="evaluation prompts"):
        check_disjoint(load_prompts(DEFAULT_TRAIN_PROMPTS) + leaked, (DEFAULT_EXCLUDE,))


def test_corpus_snippets_come_from_heldout_documents() -> None:
    from speckv_tinypair.corpus import load_corpus

    heldout = {d.name for d in load_corpus(400_000).heldout}
    snippets = corpus_snippets(4, 400_000)
    assert len(snippets) == 4 and all(p.prompt for p in snippets)
    assert all(p.id.split("-", 2)[2] in heldout for p in snippets)


def test_logged_steps_train_a_model(tiny_pair_dir: Path, tmp_path: Path) -> None:
    from predictor_service.training import TrainConfig, train_and_register

    prompts = tmp_path / "p.jsonl"
    rows = [
        {"id": f"t{i}", "task": task, "prompt": text}
        for i, (task, text) in enumerate(
            [
                ("code", "def add(a, b):\n    return"),
                ("code", "import os\n\n\ndef main():\n"),
                ("prose", "The for statement is used to iterate"),
                ("prose", "A module is a file containing definitions"),
                ("code", "class Node:\n    def __init__(self):\n"),
                ("prose", "Exceptions are raised when"),
            ]
        )
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "steps.csv"
    summary = log_steps(
        LogConfig(
            draft=str(tiny_pair_dir / "draft"),
            target=str(tiny_pair_dir / "target"),
            out=out,
            prompts=prompts,
            gammas=(2, 4),
            compressions=("fp16",),
            max_new_tokens=24,
            threads=1,
            progress=False,
        )
    )
    df = pd.read_csv(out)
    assert summary["runs"] == 12 and len(df) == summary["drafted_steps"]
    assert set(df["gamma"]) <= {1, 2, 3, 4}  # capped near max_new_tokens
    assert set(df["task"]) == {"code", "prose"}
    assert df["sequence_id"].nunique() == 12
    # Every sequence's first drafted step has no previous signals, the others do.
    first = df.groupby("sequence_id").head(1)
    assert first["prev_mean_draft_entropy"].isna().all()
    assert df.drop(first.index)["prev_mean_draft_entropy"].notna().all()
    version = train_and_register(
        TrainConfig(
            repo=tmp_path / "repo",
            name="own",
            data=out,
            window="previous_step",
            heldout_runs=False,
            progress=False,
        )
    )
    assert (tmp_path / "repo" / "own" / "1" / "manifest.json").is_file()
    assert version is not None
