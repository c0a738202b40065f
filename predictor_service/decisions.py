"""Choosing γ: feature batches for every candidate and the objectives that score them.

Pure numpy so the decider and the benchmark share one code path and nothing here knows gRPC.
All rows and all candidates of one message become one `[rows * candidates, 6]` batch, so
the model runs once per message whatever the number of sequences it carries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from speckv.costs import CostModel
from speckv.costs import StepTiming as StepTiming  # defined once, beside the cost model
from speckv.vocabulary import Objective as Objective  # defined once, in the vocabulary


@dataclass(frozen=True)
class CandidateSet:
    """Validated γ candidates with the arrays the scorer needs, built once per message."""

    gammas: tuple[int, ...]
    gamma_array: np.ndarray  # [G] float64
    gamma_ints: np.ndarray  # [G] int64
    drafted: np.ndarray  # [G1] float32: the candidates > 0 (the model is not run for γ = 0)
    drafted_columns: np.ndarray  # [G1] int: where each drafted candidate sits in `gammas`
    template: np.ndarray  # [G1, 6] float32 with the gamma column filled in

    @classmethod
    def of(cls, gammas: Sequence[int]) -> CandidateSet:
        g = tuple(int(x) for x in gammas)
        cols = np.asarray([i for i, x in enumerate(g) if x > 0], dtype=np.intp)
        arr = np.asarray(g, dtype=np.float64)
        drafted = arr[cols].astype(np.float32)
        template = np.zeros((drafted.shape[0], 6), dtype=np.float32)
        template[:, 5] = drafted
        return cls(g, arr, np.asarray(g, dtype=np.int64), drafted, cols, template)

    @property
    def all_drafted(self) -> bool:
        return self.drafted.shape[0] == len(self.gammas)


def build_features(signals: np.ndarray, comp_enc: np.ndarray, drafted: np.ndarray) -> np.ndarray:
    """Rows × drafted candidates → the model input, row-major: `[R * G1, 6]` float32.

    Column order is the seed's (4 signals, comp_enc, gamma); a `previous_step` model takes
    the previous step's signals in the same four columns.
    """
    r, g1 = signals.shape[0], drafted.shape[0]
    x = np.empty((r, g1, 6), dtype=np.float32)
    x[:, :, :4] = signals[:, None, :]
    x[:, :, 4] = comp_enc[:, None]
    x[:, :, 5] = drafted
    return x.reshape(r * g1, 6)


def _features(signals: np.ndarray, comp_enc: np.ndarray, c: CandidateSet) -> np.ndarray:
    if signals.shape[0] == 1:  # the common single-sequence message: fewer array operations
        x = c.template.copy()
        x[:, :4] = signals[0]
        x[:, 4] = comp_enc[0]
        return x
    return build_features(signals, comp_enc, c.drafted)


def scores(
    acceptance: np.ndarray,
    gamma_array: np.ndarray,
    objective: Objective,
    timing: StepTiming | None,
) -> np.ndarray:
    """Objective value of every candidate: `[R, G]` from acceptance `[R, G]`."""
    tokens = acceptance * gamma_array
    tokens += 1.0
    if objective is Objective.TOKENS_PER_STEP:
        return tokens
    if timing is None:
        raise ValueError("the goodput objective needs the worker's StepTiming")
    return CostModel.of(timing).goodput(tokens, gamma_array)


@dataclass(frozen=True)
class Choice:
    """γ per row with the numbers that justified it."""

    gamma: np.ndarray  # [R] int64, the chosen candidate value
    acceptance: np.ndarray  # [R, G] float32 or float64 in [0, 1]; 0 for γ = 0
    score: np.ndarray  # [R, G] float64


def choose_gamma(
    predict: Callable[[np.ndarray], np.ndarray],
    signals: np.ndarray,
    comp_enc: np.ndarray,
    candidates: CandidateSet,
    objective: Objective,
    timing: StepTiming | None,
) -> Choice:
    """One model run for every row and candidate, then the best candidate per row.

    `predict` maps `[N, 6]` float32 to clipped acceptance `[N]`. Ties go to the candidate
    listed first, so a client can order candidates by preference.
    """
    r = signals.shape[0]
    g1 = candidates.drafted.shape[0]
    if candidates.all_drafted:
        acceptance = predict(_features(signals, comp_enc, candidates)).reshape(r, g1)
    else:
        acceptance = np.zeros((r, len(candidates.gammas)), dtype=np.float64)
        if g1:
            pred = predict(_features(signals, comp_enc, candidates)).reshape(r, g1)
            acceptance[:, candidates.drafted_columns] = pred
    s = scores(acceptance, candidates.gamma_array, objective, timing)
    return Choice(candidates.gamma_ints[s.argmax(axis=1)], acceptance, s)
