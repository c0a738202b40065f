"""Worker step logs: extra columns are tolerated and `sequence_id` defines the runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from predictor_service.dataset import read_step_records, window_data

HEADER = (
    "sequence_id,compression,gamma,task,step,accepted,acceptance_rate,tokens_produced,"
    "mean_draft_entropy,mean_draft_confidence,max_draft_entropy,min_draft_confidence,"
    "prev_mean_draft_entropy,draft_ms"
)


def test_interleaved_sequences_pair_each_step_with_its_own_previous_step(tmp_path: Path) -> None:
    rows = [
        # sequence a and b interleaved, as a worker serving two requests logs them
        "a,int8,4,chat,0,2,0.5,3,1.0,0.10,1.5,0.05,,1.2",
        "b,nf4,2,code,0,1,0.5,2,2.0,0.20,2.5,0.15,,1.1",
        "a,int8,6,chat,1,6,1.0,7,3.0,0.30,3.5,0.25,1.0,1.3",
        "b,nf4,8,code,1,0,0.0,1,4.0,0.40,4.5,0.35,2.0,1.0",
        "a,int8,2,chat,2,1,0.5,2,5.0,0.50,5.5,0.45,3.0,1.4",
    ]
    p = tmp_path / "log.csv"
    p.write_text("\n".join([HEADER, *rows]) + "\n")
    records = read_step_records(p)
    assert records.runs_from == "sequence_id" and records.n_runs == 2
    data = window_data(records, "previous_step")
    # steps with a previous step: a/1 (line 4), b/1 (line 5), a/2 (line 6)
    assert records.csv_line[data.record_index].tolist() == [4, 5, 6]
    np.testing.assert_array_equal(
        data.x,
        [
            [1.0, 0.10, 1.5, 0.05, 1, 6],  # a/0's signals, a/1's int8 and gamma
            [2.0, 0.20, 2.5, 0.15, 2, 8],  # b/0's signals, b/1's nf4 and gamma
            [3.0, 0.30, 3.5, 0.25, 1, 2],
        ],
    )
    np.testing.assert_array_equal(data.y, [1.0, 0.0, 0.5])
    same = window_data(records, "same_step")
    assert same.x.shape == (5, 6) and same.feature_names[0] == "mean_draft_entropy"
