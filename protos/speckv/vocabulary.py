"""The words every SpecKV component shares, defined once (docs/design.md, "Vocabulary").

Compressions and their encodings, decision windows and which model window serves which
request window, objectives, the default γ candidates, and the feature names each window's
model takes. The predictor, the worker, the client and the evaluation import these instead
of restating them. Stdlib and numpy only (no protobuf): the wire enum values below are the
contract's (common.proto), checked against the generated stubs by
tests/contract/test_vocabulary.py; mapping messages stays at the edges
(`speckv_client.convert`).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType

import numpy as np

# --- Compression of the target model ---------------------------------------------------

FP16 = "fp16"
INT8 = "int8"
NF4 = "nf4"
COMPRESSIONS: tuple[str, ...] = (FP16, INT8, NF4)
# common.proto Compression values (0 = COMPRESSION_UNSPECIFIED, refused).
COMPRESSION_WIRE: Mapping[str, int] = MappingProxyType({FP16: 1, INT8: 2, NF4: 3})
COMPRESSION_FROM_WIRE: Mapping[int, str] = MappingProxyType(
    {v: k for k, v in COMPRESSION_WIRE.items()}
)
WIRE_COMPRESSION_MIN = min(COMPRESSION_WIRE.values())
WIRE_COMPRESSION_MAX = max(COMPRESSION_WIRE.values())
# The seed's `comp_enc` feature is the wire value minus one: 0 fp16, 1 int8, 2 nf4.
COMP_ENC_FEATURE = "comp_enc"
COMP_ENC: Mapping[str, int] = MappingProxyType({k: v - 1 for k, v in COMPRESSION_WIRE.items()})
# comp_enc by wire value, for a predictor that receives the enum.
COMP_ENC_BY_WIRE: Mapping[int, int] = MappingProxyType(
    {v: COMP_ENC[k] for k, v in COMPRESSION_WIRE.items()}
)


def comp_enc_from_wire(compression: np.ndarray) -> np.ndarray:
    """`comp_enc` (float32, the model's input units) of an array of valid wire values."""
    return (np.asarray(compression) - 1).astype(np.float32)


# --- Decision windows ------------------------------------------------------------------

WINDOW_SAME_STEP = "same_step"
WINDOW_PREVIOUS_STEP = "previous_step"
WINDOW_PREFIX = "prefix"
WINDOW_DRAFT_PLAN = "draft_plan"
# Windows a model (its manifest) is trained for.
MODEL_WINDOWS: tuple[str, ...] = (WINDOW_SAME_STEP, WINDOW_PREVIOUS_STEP, WINDOW_DRAFT_PLAN)
# Windows a Decide request may ask for (common.proto DecisionWindow values).
WINDOW_WIRE: Mapping[str, int] = MappingProxyType(
    {WINDOW_SAME_STEP: 1, WINDOW_PREVIOUS_STEP: 2, WINDOW_PREFIX: 3, WINDOW_DRAFT_PLAN: 4}
)
WINDOW_FROM_WIRE: Mapping[int, str] = MappingProxyType({v: k for k, v in WINDOW_WIRE.items()})
REQUEST_WINDOWS: tuple[str, ...] = tuple(WINDOW_WIRE)
# Request window -> the model window whose models answer it.
WINDOW_SERVED_BY: Mapping[str, str] = MappingProxyType(
    {
        WINDOW_SAME_STEP: WINDOW_SAME_STEP,
        WINDOW_PREFIX: WINDOW_SAME_STEP,
        WINDOW_PREVIOUS_STEP: WINDOW_PREVIOUS_STEP,
        WINDOW_DRAFT_PLAN: WINDOW_DRAFT_PLAN,
    }
)
# Model window -> the request window a decoding worker sends to use it causally
# (same_step's features are not causal for a decoder; its prefix variant is).
WORKER_REQUEST_WINDOW: Mapping[str, str] = MappingProxyType(
    {
        WINDOW_PREVIOUS_STEP: WINDOW_PREVIOUS_STEP,
        WINDOW_SAME_STEP: WINDOW_PREFIX,
        WINDOW_DRAFT_PLAN: WINDOW_DRAFT_PLAN,
    }
)

# --- Objectives ------------------------------------------------------------------------

OBJECTIVE_TOKENS_PER_STEP = "tokens_per_step"
OBJECTIVE_GOODPUT = "goodput"
OBJECTIVES: tuple[str, ...] = (OBJECTIVE_TOKENS_PER_STEP, OBJECTIVE_GOODPUT)
DEFAULT_OBJECTIVE = OBJECTIVE_GOODPUT


class Objective(str, Enum):
    """What the chosen γ maximises (docs/design.md, "Objectives"); one enum for the client,
    the worker and the predictor."""

    TOKENS_PER_STEP = OBJECTIVE_TOKENS_PER_STEP
    GOODPUT = OBJECTIVE_GOODPUT


# common.proto Objective values (0 = OBJECTIVE_UNSPECIFIED: the model's default).
OBJECTIVE_WIRE: Mapping[str, int] = MappingProxyType(
    {OBJECTIVE_TOKENS_PER_STEP: 1, OBJECTIVE_GOODPUT: 2}
)
OBJECTIVE_FROM_WIRE: Mapping[int, str] = MappingProxyType({v: k for k, v in OBJECTIVE_WIRE.items()})

# --- γ candidates ----------------------------------------------------------------------

# The seed's draft lengths: the default candidates of a decision, a manifest and the CLIs.
DEFAULT_GAMMA_CANDIDATES: tuple[int, ...] = (2, 4, 6, 8)

# --- Feature names ---------------------------------------------------------------------

# The seed's four per-step draft signals (common.proto DraftSignals, in field order).
DRAFT_SIGNALS: tuple[str, ...] = (
    "mean_draft_entropy",
    "mean_draft_confidence",
    "max_draft_entropy",
    "min_draft_confidence",
)
# The seed's feature order; a same_step model's input columns are exactly these.
SEED_FEATURES: tuple[str, ...] = (*DRAFT_SIGNALS, COMP_ENC_FEATURE, "gamma")
PREVIOUS_STEP_FEATURES: tuple[str, ...] = (
    *(f"prev_{s}" for s in DRAFT_SIGNALS),
    COMP_ENC_FEATURE,
    "gamma",
)
# The input columns of the windows whose models take a fixed row.
FEATURES_BY_WINDOW: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {WINDOW_SAME_STEP: SEED_FEATURES, WINDOW_PREVIOUS_STEP: PREVIOUS_STEP_FEATURES}
)

# Draft-plan features a worker computes, by where they come from (docs/design.md,
# "Features"; speckv.draft_plan uses them).
TOKEN_FEATURES: tuple[str, ...] = ("match_length", "draft_confidence", "draft_entropy")
HISTORY_FEATURES: tuple[str, ...] = ("prev_full", "accept_ema")
PLAN_FEATURES: tuple[str, ...] = TOKEN_FEATURES + HISTORY_FEATURES

# Every feature a model of each window may take (a draft_plan model takes some of the
# plan features plus comp_enc): what a worker can compute for that window.
FEATURES_ALLOWED_BY_WINDOW: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        **{w: frozenset(f) for w, f in FEATURES_BY_WINDOW.items()},
        WINDOW_DRAFT_PLAN: frozenset({*PLAN_FEATURES, COMP_ENC_FEATURE}),
    }
)
