"""Continuous batching: one scheduler thread owns the device and runs every admitted
sequence's speculative step in the same batched draft and verify forwards.

Requests join and leave the running batch at step boundaries (a bounded admission queue in
front, `QueueFull` beyond it). Each row keeps its own `SequencePolicy` and calls its hooks
in the order `GenerationRun` does (decide, after_token, drafted, verified, finished, close);
its output is its own solo output (docs/worker.md, "Batching").

KV layout (`BatchedKV`): one DynamicCache per model with batch dimension B; row i is
LEFT-ALIGNED and owns columns [0, L_i). A forward feeds k positions to every row (rows that
need fewer get dummy tokens); the model appends them at columns [W, W + k), W the current
width, each row attends to [0, L_i) ∪ its new columns (2-D attention mask, per-row
position ids L_i + j, so RoPE sees each row's own positions). Afterwards row i keeps the
first m_i new columns (accepted tokens): they are moved down to [L_i, L_i + m_i) by one
gather over the columns [min L_i, max L_i') only, and the cache is cropped to max L_i'.
Rejected positions therefore never accumulate; a row shorter than the widest one has a
masked hole after its end, never inside it.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from speckv.costs import CostModel
from speckv_client.types import DecideBatch, Decision, Window
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from decode_worker.engine import (
    FinishReason,
    GenerationResult,
    GenerationRun,
    SpeculativeEngine,
    StepResult,
    step_outcome,
)
from decode_worker.features import (
    ContextIndex,
    SequenceHistory,
    TokenSignals,
    aggregate,
    token_features,
    token_signals,
)
from decode_worker.match_replay import MatchTrack, ReplayYield
from decode_worker.policies import (
    DecisionSource,
    GammaDecision,
    GammaPolicy,
    HeldOutcome,
    SequenceInfo,
    SequencePolicy,
)
from decode_worker.records import StepRecord
from decode_worker.sampling import SamplingParams, make_generator, sample, warp

log = logging.getLogger(__name__)

# The retry hint sent with a refusal for a full queue (gRPC's retry-pushback trailer).
QUEUE_RETRY_MS = 500


class QueueFull(RuntimeError):
    """The batch and the admission queue are full (or the scheduler is draining)."""

    def __init__(self, message: str, retry_ms: int = QUEUE_RETRY_MS) -> None:
        super().__init__(message)
        self.retry_ms = retry_ms


# ---------------------------------------------------------------------------- KV cache


class _BufferLayer(DynamicLayer):
    """A cache layer over preallocated buffers [rows, H, capacity, D]: `update` writes the
    new positions in place and returns views, so a forward copies no cached positions (the
    stock DynamicLayer concatenates, copying the whole cache on every forward). `bk`/`bv`
    are the first `rows` rows of the allocation `ck`/`cv`, which may hold more: rows that
    left free their place for rows that join, without rebuilding the buffers."""

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, width: int, rows: int | None = None
    ) -> None:
        super().__init__()
        self.ck, self.cv, self.width = keys, values, width
        self.device = keys.device
        self.is_initialized = True
        self.set_rows(keys.shape[0] if rows is None else rows)

    def set_rows(self, rows: int) -> None:
        self.bk, self.bv = self.ck[:rows], self.cv[:rows]
        self._sync()

    def _sync(self) -> None:
        self.keys = self.bk[:, :, : self.width]
        self.values = self.bv[:, :, : self.width]

    def reserve(self, need: int) -> None:
        cap = self.ck.shape[2]
        if need <= cap:
            return
        cap = max(need, 2 * cap)
        shape = (self.ck.shape[0], self.ck.shape[1], cap, self.ck.shape[3])
        ck, cv = self.ck.new_zeros(shape), self.cv.new_zeros(shape)
        rows = self.bk.shape[0]
        ck[:rows, :, : self.width] = self.bk[:, :, : self.width]
        cv[:rows, :, : self.width] = self.bv[:, :, : self.width]
        self.ck, self.cv = ck, cv
        self.set_rows(rows)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.width + key_states.shape[-2]
        self.reserve(need)
        self.bk[:, :, self.width : need] = key_states
        self.bv[:, :, self.width : need] = value_states
        self.width = need
        self._sync()
        return self.bk[:, :, :need], self.bv[:, :, :need]

    def get_seq_length(self) -> int:
        return self.width


def _buffers(tensors: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> list[_BufferLayer]:
    out = []
    for k, v in tensors:
        shape = (k.shape[0], k.shape[1], width + _HEADROOM, k.shape[3])
        bk, bv = k.new_zeros(shape), v.new_zeros(shape)
        n = min(width, k.shape[2])
        bk[:, :, :n] = k[:, :, :n]
        bv[:, :, :n] = v[:, :, :n]
        out.append(_BufferLayer(bk, bv, width))
    return out


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """A stock DynamicCache's (keys, values) per layer; None while it holds nothing."""
    layers = cache.layers
    if not layers or not layers[0].is_initialized or layers[0].keys.numel() == 0:
        return None
    return [(layer.keys, layer.values) for layer in layers]


# Spare positions allocated beyond the widest row when buffers are (re)built.
_HEADROOM = 64


def fill_order(keep: Sequence[int], size: int) -> list[int]:
    """The new row order after dropping the rows of a batch of `size` not in `keep`: kept
    rows inside the new size stay where they are, and the holes are filled by the kept rows
    beyond it — so `BatchedKV.keep_rows` moves as few rows as possible."""
    n = len(keep)
    kept = set(keep)
    movers = iter(i for i in keep if i >= n)
    return [i if i in kept else next(movers) for i in range(n)]


class BatchedKV:
    """A model's KV cache for the rows of a batch (left-aligned rows, per-row lengths)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.layers: list[_BufferLayer] | None = None
        self.lengths: list[int] = []
        self._pending: tuple[int, int] | None = None  # (width, k) of the last forward

    @property
    def width(self) -> int:
        return self.layers[0].width if self.layers else 0

    def _tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if not self.layers:
            return None
        return [
            (layer.bk[:, :, : layer.width], layer.bv[:, :, : layer.width]) for layer in self.layers
        ]

    def extend(self, other: BatchedKV) -> None:
        """Append `other`'s rows after this batch's, at step boundaries. When the buffers'
        allocation has room for them (rows that left freed it), their positions are copied
        into it and nothing else moves; otherwise both batches are copied into buffers with
        room for twice the rows."""
        with torch.inference_mode():  # the buffers are inference tensors
            self._extend(other)

    def _extend(self, other: BatchedKV) -> None:
        b_old, n = len(self.lengths), len(other.lengths)
        width = max(self.width, other.width)
        if self.layers is not None and all(
            layer.ck.shape[0] >= b_old + n and layer.ck.shape[2] >= width for layer in self.layers
        ):
            for li, layer in enumerate(self.layers):
                if other.layers is not None:
                    theirs = other.layers[li]
                    w = theirs.width
                    layer.ck[b_old : b_old + n, :, :w] = theirs.bk[:, :, :w]
                    layer.cv[b_old : b_old + n, :, :w] = theirs.bv[:, :, :w]
                layer.width = width
                layer.set_rows(b_old + n)
            self.lengths += other.lengths
            return
        mine = self._tensors()
        rows = other._tensors()
        self.lengths += other.lengths
        if rows is None and mine is None:
            return  # nothing cached anywhere yet (one-token prompts): the forward creates it
        ref = mine if mine is not None else rows
        assert ref is not None
        out = []
        for li, (k_ref, _) in enumerate(ref):
            heads, dim = k_ref.shape[1], k_ref.shape[3]
            shape = (2 * (b_old + n), heads, width + _HEADROOM, dim)
            bk, bv = k_ref.new_zeros(shape), k_ref.new_zeros(shape)
            if mine is not None:
                w = mine[li][0].shape[2]
                bk[:b_old, :, :w] = mine[li][0]
                bv[:b_old, :, :w] = mine[li][1]
            if rows is not None:
                w = rows[li][0].shape[2]
                bk[b_old : b_old + n, :, :w] = rows[li][0]
                bv[b_old : b_old + n, :, :w] = rows[li][1]
            out.append(_BufferLayer(bk, bv, width, b_old + n))
        self.layers = out

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Keep the rows `keep` (old indices, in their new order) and drop the rest. Rows
        whose place does not change are not touched; when every moved row comes from beyond
        the new size (the order `fill_order` gives), each is one copy of its own positions
        into a freed place — the buffers are not rebuilt. A row leaving used to rebuild every
        layer's buffers for all rows (9 % of a serving worker's scheduler thread at 8
        clients, py-spy)."""
        with torch.inference_mode():  # the buffers are inference tensors
            self._keep_rows(keep)

    def _keep_rows(self, keep: Sequence[int]) -> None:
        old_lengths = self.lengths
        self.lengths = [old_lengths[i] for i in keep]
        if not self.layers:
            return
        if not keep:
            self.layers = None
            return
        n = len(keep)
        moves = [(p, i) for p, i in enumerate(keep) if p != i]
        direct = all(i >= n for _, i in moves)
        idx = None if direct else torch.tensor(list(keep), device=self.layers[0].bk.device)
        for layer in self.layers:
            w = layer.width
            if direct:
                for p, i in moves:
                    layer.bk[p, :, :w] = layer.bk[i, :, :w]
                    layer.bv[p, :, :w] = layer.bv[i, :, :w]
            elif idx is not None and moves:
                layer.bk[:n, :, :w] = layer.bk[idx, :, :w]  # advanced indexing gathers first
                layer.bv[:n, :, :w] = layer.bv[idx, :, :w]
            layer.set_rows(n)
        self.trim()

    def forward(
        self, model: Any, feeds: Sequence[Sequence[int]], pad_id: int, keep_logits: int = 0
    ) -> torch.Tensor:
        """Feed row i its tokens `feeds[i]` (may be empty) in one forward; return the logits
        [B, k, vocab] of every fed position (k = the longest feed). Call `commit` next."""
        assert len(feeds) == len(self.lengths) and self._pending is None
        device = next(model.parameters()).device
        k = max(1, max(len(f) for f in feeds))
        width = self.width
        ids = torch.full((len(feeds), k), pad_id, dtype=torch.long)
        mask = torch.zeros((len(feeds), width + k), dtype=torch.long)
        mask[:, width:] = 1
        for i, f in enumerate(feeds):
            if f:
                ids[i, : len(f)] = torch.tensor(list(f), dtype=torch.long)
            mask[i, : self.lengths[i]] = 1
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        positions = lengths.unsqueeze(1) + torch.arange(k).unsqueeze(0)
        cache = DynamicCache()
        if self.layers is not None:
            cache.layers = list(self.layers)
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            cache=cache,
            use_cache=True,
            logits_to_keep=keep_logits or k,
        )
        if self.layers is None:  # the first forward of rows with nothing cached
            first = _cache_tensors(cache)
            assert first is not None
            self.layers = _buffers(first, k)
        self._pending = (width, k)
        return out.logits

    def commit(self, keep: Sequence[int]) -> None:
        """Row i keeps the first keep[i] positions of the last forward's feed: they move
        down to the end of the row (a copy of those positions only), the rest is cut."""
        assert self._pending is not None and self.layers is not None
        width = self._pending[0]
        self._pending = None
        old = list(self.lengths)
        self.lengths = [n + m for n, m in zip(old, keep, strict=True)]
        rows: list[int] = []
        src: list[int] = []
        dst: list[int] = []
        for i, (n, m) in enumerate(zip(old, keep, strict=True)):
            if m and n < width:
                rows += [i] * m
                src += range(width, width + m)
                dst += range(n, n + m)
        if rows:
            dev = self.layers[0].bk.device
            r = torch.tensor(rows, device=dev)
            s = torch.tensor(src, device=dev)
            d = torch.tensor(dst, device=dev)
            for layer in self.layers:  # advanced indexing copies: [positions, H, D]
                layer.bk[r, :, d] = layer.bk[r, :, s]
                layer.bv[r, :, d] = layer.bv[r, :, s]
        self.trim()

    def truncate(self, row: int, length: int) -> None:
        """Forget row `row`'s positions from `length` on (its columns beyond become a hole)."""
        self.lengths[row] = min(self.lengths[row], length)

    def trim(self) -> None:
        """Crop columns that no row uses (no copy: the buffers stay)."""
        if self.layers is None:
            return
        target = max(self.lengths) if self.lengths else 0
        for layer in self.layers:
            layer.width = target
            layer._sync()


# ------------------------------------------------------------------- remote coalescing


class DecisionCoalescer:
    """Wraps the worker's DecisionStream: while the scheduler thread holds it, rows'
    `submit` calls are collected and `flush` sends them as one Decide message per group
    of equal (window, candidates, objective, timing, model) — in practice one per batch
    step. Other threads, the prefix window (which waits for its answer at once) and an
    unheld coalescer pass straight through."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._holder: int | None = None
        self._held: list[tuple[DecideBatch, Future[list[Decision]]]] = []
        self.messages = 0  # Decide messages sent through flush
        self.rows = 0

    @property
    def connected(self) -> bool:
        return bool(self.stream.connected)

    def __getattr__(self, name: str) -> Any:  # close(), stats ... of the real stream
        return getattr(self.stream, name)

    def hold(self) -> None:
        self._holder = threading.get_ident()

    def release(self) -> None:
        self.flush()
        self._holder = None

    def submit(self, batch: DecideBatch) -> Future[list[Decision]]:
        if self._holder != threading.get_ident() or batch.window == Window.PREFIX:
            return self.stream.submit(batch)  # type: ignore[no-any-return]
        future: Future[list[Decision]] = Future()
        self._held.append((batch, future))
        return future

    def flush(self) -> int:
        """Send what was held; returns the number of messages sent."""
        held, self._held = self._held, []
        groups: dict[tuple[Any, ...], list[tuple[DecideBatch, Future[list[Decision]]]]] = {}
        for batch, fut in held:
            key = (batch.window, batch.gamma_candidates, batch.objective, batch.timing, batch.model)
            groups.setdefault(key, []).append((batch, fut))
        for parts in groups.values():
            rows = tuple(r for b, _ in parts for r in b.rows)
            outcomes = tuple(o for b, _ in parts for o in getattr(b, "outcomes", ()))
            merged = replace(parts[0][0], rows=rows)
            if outcomes:
                merged = replace(merged, outcomes=outcomes)
            try:
                combined = self.stream.submit(merged)
            except Exception as err:  # the stream refused: every part fails alike
                for _, fut in parts:
                    fut.set_exception(err)
                continue
            self.messages += 1
            self.rows += len(rows)
            spans, start = [], 0
            for b, fut in parts:
                spans.append((start, start + len(b.rows), fut))
                start += len(b.rows)
            combined.add_done_callback(_splitter(spans, len(rows)))
        return len(groups)


def _splitter(
    spans: list[tuple[int, int, Future[list[Decision]]]], total: int
) -> Callable[[Future[list[Decision]]], None]:
    def done(combined: Future[list[Decision]]) -> None:
        err = combined.exception()
        if err is not None:
            for _, _, fut in spans:
                fut.set_exception(err)
            return
        decisions = combined.result()
        for lo, hi, fut in spans:
            # One decision per row, in row order; otherwise give every part the whole answer
            # (the policy picks its row by routing key and step).
            fut.set_result(decisions[lo:hi] if len(decisions) == total else list(decisions))

    return done


# ------------------------------------------------------------------ batch-aware γ


class BatchCosts:
    """Measured wall seconds of batch steps, per batch size b, as one `speckv.costs.CostModel`
    per size (docs/design.md, "Cost model"); this class only measures and interpolates.
    A plain step (G = 0) is its measured whole step. A drafting step at verify width G
    (the longest draft; every row drafts and verifies G + 1 positions) is
    T(b, G) = rest_b + G·draft_b + verify_b(G):

    - draft_b, the seconds of one batched draft forward — measured on every drafting step
      whatever its width, so it stays current while the batch sits at one width;
    - verify_b(G), a line fitted through the measured verify forward at each width (one
      moving average per (b, width): a width not run lately keeps its last value rather
      than being dragged by others);
    - rest_b, the rest of the step (sampling, signals, hooks, streaming, per row).

    A whole-step line moved by each chosen width (the first design) kept its slope from the
    warm-up on dummy prompts and overestimated it by up to a third at 8 rows, so longer
    drafts looked dearer than they were. Moving averages as in timing.py; the first step at
    each (b, width) is dropped (one-off buffer growth). Sizes not measured are interpolated
    between measured neighbours (scaled by b above the largest)."""

    def __init__(self, alpha: float = 0.1) -> None:
        self._alpha = alpha
        self._lock = threading.Lock()
        self._plain: dict[int, float] = {}
        self._draft: dict[int, float] = {}
        self._rest: dict[int, float] = {}
        self._verify: dict[int, dict[int, float]] = {}  # b -> width -> verify seconds
        self._counts: dict[tuple[str, int], int] = {}
        self._seen: set[tuple[int, int]] = set()

    def _ewm(self, table: dict[int, float], key: int, value: float) -> None:
        prev = table.get(key)
        a = self._alpha
        table[key] = value if prev is None else (1 - a) * prev + a * value

    def add(
        self,
        b: int,
        width: int,
        seconds: float,
        draft_seconds: float = 0.0,
        draft_forwards: int = 0,
        verify_seconds: float | None = None,
    ) -> None:
        """One batch step of `b` rows at verify width `width` took `seconds` in all, of
        which `draft_seconds` in `draft_forwards` draft forwards and `verify_seconds` in the
        verify forward (left out: the whole step counts as the verify, no separate rest).
        The first step at each (b, width) is dropped: it pays one-off work (buffers growing
        to a new shape), and as the first sample of a moving average it would weigh on the
        estimate for many steps."""
        with self._lock:
            if (b, width) not in self._seen:
                self._seen.add((b, width))
                return
            if width <= 0:
                self._ewm(self._plain, b, seconds)
                key = ("plain", b)
            else:
                verify = seconds - draft_seconds if verify_seconds is None else verify_seconds
                if draft_forwards > 0:
                    self._ewm(self._draft, b, draft_seconds / draft_forwards)
                self._ewm(self._verify.setdefault(b, {}), width, verify)
                self._ewm(self._rest, b, max(seconds - draft_seconds - verify, 0.0))
                key = ("spec", b)
            self._counts[key] = self._counts.get(key, 0) + 1

    def _model(self, b: int) -> CostModel | None:
        """The cost model (speckv.costs) of a batch step at size `b` — draft forward, verify
        line with the rest of the step in its base, the plain step — or None while the
        verify line is not identified (fewer than two widths measured, or too few steps)."""
        line = self._line(b)
        if line is None:
            return None
        base, slope = line
        rest = self._rest.get(b, 0.0)
        return CostModel(self._draft.get(b, 0.0), base + rest, slope, self._plain.get(b, 0.0))

    def _line(self, b: int) -> tuple[float, float] | None:
        cells = self._verify.get(b)
        if not cells or len(cells) < 2 or self._counts.get(("spec", b), 0) < MIN_SAMPLES:
            return None
        gs = list(cells)
        mean_g = sum(gs) / len(gs)
        mean_t = sum(cells.values()) / len(gs)
        var_g = sum((g - mean_g) ** 2 for g in gs)
        slope = max(sum((g - mean_g) * (cells[g] - mean_t) for g in gs) / var_g, 0.0)
        return max(mean_t - slope * mean_g, 1e-9), slope

    @staticmethod
    def _at(values: dict[int, float], b: int) -> float | None:
        if not values:
            return None
        if b in values:
            return values[b]
        lower = [s for s in values if s < b]
        upper = [s for s in values if s > b]
        if lower and upper:
            lo, hi = max(lower), min(upper)
            w = (b - lo) / (hi - lo)
            return (1 - w) * values[lo] + w * values[hi]
        if lower:
            lo = max(lower)
            return values[lo] * b / lo
        return values[min(upper)]

    def _models_near(self, b: int) -> dict[int, CostModel]:
        """The models `_at` needs for size b: b's own, else the nearest measured size below
        and above it (fitting every size's line before every step cost 0.2 ms)."""
        sizes = sorted(self._verify)
        if b in self._verify and (m := self._model(b)) is not None:
            return {b: m}
        out: dict[int, CostModel] = {}
        for side in ([s for s in reversed(sizes) if s < b], [s for s in sizes if s > b]):
            for size in side:
                if (m := self._model(size)) is not None:
                    out[size] = m
                    break
        return out

    def step_table(self, b: int, widths: Sequence[int]) -> dict[int, float]:
        """Expected wall seconds of a batch step of `b` rows at each verify width G in
        `widths` that has an estimate, fitting the lines it needs once (the scheduler asks
        for every candidate before each step)."""
        with self._lock:
            plain = {s: v for s, v in self._plain.items()
                     if self._counts.get(("plain", s), 0) >= MIN_SAMPLES}  # fmt: skip
            models = self._models_near(b) if any(w > 0 for w in widths) else {}
        out: dict[int, float] = {}
        for w in widths:
            if w <= 0:
                v = self._at(plain, b)
            else:
                v = self._at({s: m.step_seconds(w) for s, m in models.items()}, b)
            if v is not None:
                out[w] = v
        return out

    def snapshot(self) -> dict[str, dict[int, float]]:
        with self._lock:
            lines = {b: ln for b in self._verify if (ln := self._line(b)) is not None}
            return {
                "plain_step_s": dict(self._plain),
                "draft_forward_s": dict(self._draft),
                "rest_of_step_s": dict(self._rest),
                "verify_base_s": {b: ln[0] for b, ln in lines.items()},
                "verify_per_gamma_s": {b: ln[1] for b, ln in lines.items()},
            }


BATCH_GAMMAS = (0, 1, 2, 3, 4, 6, 8)
# Steps a batch size needs before its costs are used.
MIN_SAMPLES = 3
# batch-goodput: at G = 0, one step in this many drafts one token (acceptance keeps learning).
PROBE_EVERY = 16
# batch-goodput's replayed tokens per step (`match_replay.ReplayYield`): each replayed step's
# weight decays by this per later replayed step of the same γ — a memory of about 1000
# replayed steps, some 50 requests of 48 tokens. It prices γ for the workload's prompt mix,
# as a fixed γ would be judged; with 0.995 (about 10 requests) the estimates followed the
# last few prompts and one row switched between G = 1 and G = 2 with them.
REPLAY_DECAY = 0.999
# batch-goodput prices each greedy row by the replay over its own text, shrunk towards the
# pooled replay by this many pseudo-steps (`ReplayYield.row_expected`).
ROW_PRIOR_STEPS = 4.0
# batch-goodput: the rows' own prices choose among G = 0 and the candidate widths at most this
# many places from the pooled estimate's choice (`BATCH_GAMMAS` order).
ROW_REACH = 1
# batch-goodput's yield model (`StepYield`): counts decay by POOL_DECAY per drafted row-step;
# each position's rate is shrunk by PRIOR_EVENTS pseudo-tries towards the rate of the
# position before it (the first towards ACCEPT_PRIOR); the first is read with OPTIMISM
# standard errors added, so that drafting measured on few tries gets tried (G = 0 measures
# nothing).
ACCEPT_PRIOR = 0.5
PRIOR_EVENTS = 4.0
POOL_DECAY = 0.995
OPTIMISM = 1.0


def position_expected_table(survive: Sequence[float], up_to: int) -> list[float]:
    """Tokens a step of draft length γ produces, for γ = 0 … up_to (index γ), when drafted
    token j is accepted with probability survive[j-1] given the ones before it were:
    E(γ) = 1 + Σ_{j≤γ} Π_{k≤j} p_k."""
    out, alive = [1.0], 1.0
    for p in survive[:up_to]:
        alive *= p
        out.append(out[-1] + alive)
    return out


def position_expected_tokens(survive: Sequence[float], gamma: int) -> float:
    """E(γ) of `position_expected_table` for one γ."""
    return position_expected_table(survive, gamma)[-1]


class StepYield:
    """Expected tokens a row-step yields at each draft length γ — the prior of
    `batch-goodput`'s estimate, which `match_replay.ReplayYield` replaces as greedy rows are
    replayed, and the only estimate for sampled rows (docs/design.md, "The batch's draft
    length"): per drafted position k, the rate at which it is accepted
    given positions < k were, pooled over the worker's recent rows (warm-up rows left out),
    slowly forgotten. Every drafted step informs every position it reached, so one model
    predicts every γ from the same steps — a γ is not judged on other prompts than its
    neighbours. One geometric rate per row was used first and dropped (the positions' rates
    on the demo pair, 0.88, 0.32, 0.39 on fp16, fit no single rate); so was a per-row scale
    (see `BatchScheduler._plan_batch`) and so was judging a γ by the tokens its own recent
    steps produced (steps at different γ ran on different prompts, and the comparison
    followed the prompts)."""

    def __init__(self, max_gamma: int) -> None:
        self.max_gamma = max_gamma
        # Counts are stored multiplied by self._scale, which grows by 1/POOL_DECAY per
        # observation: decaying every count is then one multiplication, not one per count.
        self._scale = 1.0
        self._pos_ok = [0.0] * max_gamma
        self._pos_try = [0.0] * max_gamma

    def observe(self, gamma: int, accepted: int) -> None:
        """One row-step drafted `gamma` tokens and the target accepted `accepted`."""
        if gamma <= 0:
            return
        self._scale /= POOL_DECAY
        if self._scale > 1e100:
            self._rescale()
        w = self._scale
        for j in range(min(gamma, accepted + 1, self.max_gamma)):  # positions reached
            self._pos_try[j] += w
            if j < accepted:
                self._pos_ok[j] += w

    def _rescale(self) -> None:
        s = self._scale
        self._pos_ok = [x / s for x in self._pos_ok]
        self._pos_try = [x / s for x in self._pos_try]
        self._scale = 1.0

    def position_rates(self, optimism: float = 0.0) -> list[float]:
        """Per drafted position, the rate it is accepted given the ones before were (capped at
        0.99); the first position's plus `optimism` standard errors — the one that decides
        between drafting and G = 0, which measures nothing (optimism on later positions made
        the batch try long drafts again and again). Each position's counts are
        shrunk by PRIOR_EVENTS pseudo-tries towards the rate of the position before it (the
        first towards ACCEPT_PRIOR): positions a short policy never reaches inherit the last
        measured rate instead of a fixed guess that made long drafts look worth trying."""
        out: list[float] = []
        prior = ACCEPT_PRIOR
        for ok, tried in zip(self._pos_ok, self._pos_try, strict=True):
            n = tried / self._scale + PRIOR_EVENTS
            p = (ok / self._scale + PRIOR_EVENTS * prior) / n
            prior = p
            if not out:
                p += optimism * math.sqrt(max(p * (1.0 - p), 0.0) / n)
            out.append(min(p, 0.99))
        return out

    def expected(self, up_to: int | None = None) -> list[float]:
        """Expected tokens of a row-step at γ = 0 … up_to (default max_gamma; index = γ)."""
        limit = self.max_gamma if up_to is None else up_to
        return position_expected_table(self.position_rates(OPTIMISM), limit)


def choose_batch_gamma(
    tokens: Sequence[Sequence[float]],
    caps: Sequence[int],
    b: int,
    costs: BatchCosts,
    candidates: Sequence[int] = BATCH_GAMMAS,
) -> int | None:
    """The verify width G maximising the batch's expected tokens per second,
    Σ_i E_i(min(G, cap_i)) / step_seconds(b, G), where tokens[i][γ] = E_i(γ); None before
    costs are measured. Rows draft G each (capped by their remaining tokens): in a padded
    batched forward a shorter draft saves nothing, so per-row γ below G would only lose
    tokens."""
    return _best_width(tokens, caps, costs.step_table(b, candidates), candidates)


def _best_width(
    tokens: Sequence[Sequence[float]],
    caps: Sequence[int],
    table: Mapping[int, float],
    candidates: Sequence[int],
) -> int | None:
    best, best_rate = None, -1.0
    for g in candidates:
        seconds = table.get(g)
        if seconds is None or seconds <= 0:
            continue
        total = sum(e[max(0, min(g, c, len(e) - 1))] for e, c in zip(tokens, caps, strict=True))
        rate = total / seconds
        if rate > best_rate:
            best, best_rate = g, rate
    return best


def choose_within_reach(
    tokens: Sequence[Sequence[float]],
    pooled: Sequence[float],
    caps: Sequence[int],
    b: int,
    costs: BatchCosts,
    candidates: Sequence[int] = BATCH_GAMMAS,
    reach: int | None = ROW_REACH,
) -> int | None:
    """`choose_batch_gamma` over the rows' own prices `tokens`, among G = 0 and the
    candidates at most `reach` places (in `candidates` order) from the width the pooled
    prices `pooled` choose for the same rows; `reach` None: among all candidates. Widths
    far from the pooled choice are ones the batch has not run lately at this size, priced
    by a cost line fitted mostly through other widths: at 16 rows the line put G = 4 at
    1.18× G = 2 where such steps took 1.37–1.40×, and the rows' prices chose it on up to
    15 % of steps (docs/design.md, "The batch's draft length")."""
    cands = list(candidates)
    # The table once for both choices: it fits the cost lines.
    return choose_in_table(tokens, pooled, caps, costs.step_table(b, cands), cands, reach)


def choose_in_table(
    tokens: Sequence[Sequence[float]],
    pooled: Sequence[float],
    caps: Sequence[int],
    table: Mapping[int, float],
    candidates: Sequence[int] = BATCH_GAMMAS,
    reach: int | None = ROW_REACH,
) -> int | None:
    """`choose_within_reach` with the step seconds per width given (`table`), as an
    offline evaluation that has measured them does."""
    cands = list(candidates)
    if reach is not None:
        centre = _best_width([pooled] * len(tokens), caps, table, cands)
        if centre is not None:
            at = cands.index(centre)
            cands = [g for i, g in enumerate(cands) if g == 0 or abs(i - at) <= reach]
    return _best_width(tokens, caps, table, cands)


class _BatchGoodputSequence(SequencePolicy):
    batch_aware = True

    def __init__(self, fallback: int) -> None:
        self.fallback = fallback
        self.batch_gamma: int | None = None  # set by the scheduler before every decide

    def decide(self, step: int, prefix_signals: Any) -> GammaDecision:
        gamma = self.batch_gamma if self.batch_gamma is not None else self.fallback
        return GammaDecision(gamma, DecisionSource.LOCAL)


class BatchGoodputPolicy(GammaPolicy):
    """`batch-goodput`: the scheduler chooses one verify width for the batch's rows from
    their acceptance estimates (each row's accepted/rejected counts) and the measured costs at
    the current batch size — γ = 0 for the whole batch when speculation no longer pays.
    Outside a batching worker (or before costs are measured) it drafts `fallback`."""

    def __init__(self, fallback: int = 4) -> None:
        self.fallback = fallback
        self.spec = "batch-goodput"

    def start(self, seq: SequenceInfo) -> SequencePolicy:
        return _BatchGoodputSequence(self.fallback)


# ------------------------------------------------------------------------- rows


_PREFIX, _MAIN, _DONE = 0, 1, 2


@dataclass
class _Row:
    """One sequence in the batch: the validated GenerationRun (its fields, stats and text
    tracker) plus the loop state `GenerationRun._run` keeps in locals."""

    run: GenerationRun
    handle: BatchedRun
    policy: SequencePolicy
    generator: torch.Generator | None
    seq: list[int]
    started: float
    context: ContextIndex | None
    history: SequenceHistory = field(default_factory=SequenceHistory)
    new: list[int] = field(default_factory=list)
    steps: list[StepResult] = field(default_factory=list)
    step: int = 0
    prev_signals: Any = None
    finish: FinishReason | None = None
    # per-step state
    phase: int = _DONE
    want: int = 0
    cap: int = 0
    gamma: int = 0
    decision: GammaDecision | None = None
    drafts: list[int] = field(default_factory=list)
    draft_logits: list[torch.Tensor] = field(default_factory=list)
    draft_probs: list[torch.Tensor] = field(default_factory=list)
    step_signals: list[TokenSignals] | None = None
    hist: dict[str, float] | None = None
    draft_fed: int = 0
    pooled: bool = True  # counts into the worker's pooled acceptance (not warm-up rows)
    # Greedy pooled rows: the draft/target agreement batch-goodput replays (match_replay).
    track: MatchTrack | None = None
    tent: dict[int, int] = field(default_factory=dict)  # this step's draft argmaxes by position
    held: HeldOutcome = field(init=False)  # the last step's outcome (as GenerationRun)

    def __post_init__(self) -> None:
        self.held = HeldOutcome(self.policy)

    def reset_step(self) -> None:
        self.phase, self.want, self.gamma, self.decision = _DONE, 0, 0, None
        self.drafts, self.draft_logits, self.draft_probs = [], [], []
        self.step_signals, self.hist, self.draft_fed = None, None, 0
        self.tent = {}


_END = object()


class BatchedRun:
    """A request in the batch: iterate it for its `StepResult`s (as they are produced by
    the scheduler thread), then read `result`. Leaving the loop early cancels the row."""

    def __init__(self, run: GenerationRun, scheduler: BatchScheduler) -> None:
        self.run = run
        self.request_id = run.request_id
        self.result: GenerationResult | None = None
        self._scheduler = scheduler
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.abandoned = threading.Event()

    def cancelled(self) -> bool:
        return self.abandoned.is_set() or self.run.cancelled()

    def cancel(self) -> None:
        self.abandoned.set()
        self._scheduler.wake()

    def _put(self, item: Any) -> None:
        self._events.put(item)

    def __iter__(self) -> Iterator[StepResult]:
        try:
            while True:
                item = self._events.get()
                if isinstance(item, StepResult):
                    yield item
                elif isinstance(item, GenerationResult):
                    self.result = item
                    return
                elif isinstance(item, BaseException):
                    raise item
                else:
                    return
        finally:
            if self.result is None:
                self.cancel()


# --------------------------------------------------------------------- scheduler


@dataclass
class BatchStats:
    """What the scheduler did (for GetInfo, benchmarks and tests)."""

    steps: int = 0
    row_steps: int = 0  # sum over steps of the batch size
    max_batch: int = 0
    joined: int = 0
    left: int = 0
    decide_messages: int = 0  # Decide messages sent by the coalescer
    decide_rows: int = 0
    draft_forwards: int = 0
    verify_forwards: int = 0
    step_seconds: float = 0.0  # wall of the steps (decisions, forwards, bookkeeping)
    forward_seconds: float = 0.0  # of which draft and verify forwards (with KV commits)
    joins: int = 0  # prefill forwards of joining rows (one per join, all its rows at once)
    join_seconds: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # batch size -> steps
    gammas: dict[int, dict[int, int]] = field(default_factory=dict)  # batch size -> γ -> rows
    shapes: dict[tuple[int, int], int] = field(default_factory=dict)  # (b, verify width) -> steps
    chosen: dict[int, dict[int, int]] = field(
        default_factory=dict
    )  # batch-goodput: b -> G -> steps

    @property
    def mean_batch(self) -> float:
        return self.row_steps / self.steps if self.steps else 0.0


class BatchScheduler:
    """Owns the device: one thread runs the continuous batch (docs/worker.md, "Batching")."""

    def __init__(
        self,
        engine: SpeculativeEngine,
        *,
        max_batch_size: int = 8,
        max_queue: int = 16,
        coalescer: DecisionCoalescer | None = None,
        row_prior_steps: float | None = ROW_PRIOR_STEPS,
        row_reach: int | None = ROW_REACH,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be ≥ 1 and max_queue ≥ 0")
        if row_prior_steps is not None and row_prior_steps <= 0:
            raise ValueError(f"row_prior_steps must be > 0 or None, got {row_prior_steps}")
        if row_reach is not None and row_reach < 0:
            raise ValueError(f"row_reach must be ≥ 0 or None, got {row_reach}")
        self.engine = engine
        # batch-goodput: how many candidate widths away from the pooled estimate's choice
        # the rows' own pricing may move the batch (G = 0 always allowed); None: anywhere.
        self.row_reach = row_reach
        # batch-goodput: how many pseudo-steps of the pooled estimate a row's own replay is
        # shrunk towards; None prices every row with the pooled estimate alone.
        self.row_prior_steps = row_prior_steps
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.coalescer = coalescer
        self.stats = BatchStats()
        self.costs = BatchCosts()
        # What a row-step yields at each draft length (batch-goodput), from recent rows.
        self.yields = StepYield(self.engine.config.max_gamma)
        # ... and what each fixed draft length would have made on the same rows' text.
        max_gamma = self.engine.config.max_gamma
        self.replay = ReplayYield(
            [g for g in BATCH_GAMMAS if 0 < g <= max_gamma] or [1], decay=REPLAY_DECAY
        )
        self._warming = False
        self.concurrency = (
            f"continuous batching: up to {max_batch_size} sequences per batched draft/verify "
            f"forward, {max_queue} more queued"
        )
        pair = engine.pair
        self._tkv = BatchedKV(pair.target.config)
        self._dkv = BatchedKV(pair.draft.config)
        pad = getattr(pair.target.config, "pad_token_id", None)
        self._pad = int(pad) if isinstance(pad, int) else 0
        self._rows: list[_Row] = []
        self._waiting: list[BatchedRun] = []
        # Requests taken off the queue and being prefilled, not yet rows: they still hold
        # their place (counted by submit, or a join's prefill would admit past capacity).
        self._joining = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="speckv-batch", daemon=True)
        self._thread.start()

    # -- admission

    def submit(
        self,
        prompt_ids: Sequence[int],
        policy: GammaPolicy,
        *,
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 0,
        stop: Sequence[str] = (),
        request_id: str = "",
        cancelled: Callable[[], bool] | None = None,
        record: bool = True,
    ) -> BatchedRun:
        """Validate (RequestError as `engine.start`) and queue a request; QueueFull when the
        batch and the queue are full or the worker drains."""
        run = self.engine.start(
            prompt_ids,
            policy,
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            stop=stop,
            request_id=request_id,
            cancelled=cancelled,
            record=record,
        )
        handle = BatchedRun(run, self)
        with self._cond:
            if self._closing:
                raise QueueFull("worker is draining (shutting down); use another worker")
            places = len(self._rows) + self._joining + len(self._waiting)
            if places >= self.max_batch_size + self.max_queue:
                raise QueueFull(
                    f"worker busy: {self.max_batch_size} sequences in the batch "
                    f"(--max-batch-size) and {self.max_queue} queued (--max-queue); retry "
                    f"after about {QUEUE_RETRY_MS} ms with backoff, or use another worker"
                )
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Drain: admit nothing new, finish the batch and the queue (rows whose clients
        went away cancel at their next step), then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            for row in list(self._rows):
                row.handle.abandoned.set()
            for handle in list(self._waiting):
                handle.abandoned.set()
            self.wake()
            self._thread.join(5.0)

    # -- the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._rows and not self._waiting and not self._closing:
                    self._cond.wait()
                if self._closing and not self._rows and not self._waiting:
                    return
                room = self.max_batch_size - len(self._rows)
                joining, self._waiting = self._waiting[:room], self._waiting[room:]
                self._joining = len(joining)
            try:
                held = self._hold()
                if joining:
                    try:
                        self._join(joining)
                    finally:
                        with self._cond:
                            self._joining = 0
                if held:
                    self._flush()
                if self._rows:
                    self._step()
            except Exception as err:  # a batched forward failed: every row fails alike
                log.exception("batch step failed; failing %d rows", len(self._rows))
                for row in self._rows:
                    self._end(row, err)
                self._rows = []
                self._tkv = BatchedKV(self.engine.pair.target.config)
                self._dkv = BatchedKV(self.engine.pair.draft.config)
            finally:
                self._release()

    def _hold(self) -> bool:
        if self.coalescer is None:
            return False
        self.coalescer.hold()
        return True

    def _flush(self) -> None:
        if self.coalescer is not None:
            sent = self.coalescer.flush()
            self.stats.decide_messages += sent
            self.stats.decide_rows = self.coalescer.rows

    def _release(self) -> None:
        if self.coalescer is not None:
            self._flush()
            self.coalescer._holder = None

    def _join(self, handles: list[BatchedRun]) -> None:
        """Start the joiners' policies and prefill their prompts in one batched forward per
        model (prompts padded after their end), then append them to the batch."""
        eng = self.engine
        pair = eng.pair
        rows: list[_Row] = []
        for handle in handles:
            run = handle.run
            if handle.cancelled():
                handle._put(_END)
                continue
            try:
                policy = run.policy.start(SequenceInfo(run.request_id, pair.compression))
            except Exception as err:
                handle._put(err)
                continue
            seq = list(run.prompt_ids)
            context = ContextIndex() if policy.in_step or run.token_recorder is not None else None
            if context is not None:
                context.add(seq)
            generator = None if run.sampling.greedy else make_generator(run.sampling.seed)
            row = _Row(run, handle, policy, generator, seq, time.perf_counter(), context)
            row.pooled = not self._warming
            if row.pooled and generator is None:
                row.track = self.replay.track(len(seq))
            rows.append(row)
        if not rows:
            return
        feeds = [r.seq[:-1] for r in rows]
        tkv, dkv = BatchedKV(pair.target.config), BatchedKV(pair.draft.config)
        tkv.lengths = [0] * len(rows)
        dkv.lengths = [0] * len(rows)
        with eng.device_lock, torch.inference_mode():
            t0 = time.perf_counter()
            if any(feeds):
                for kv, model in ((tkv, pair.target), (dkv, pair.draft)):
                    kv.forward(model, feeds, self._pad, keep_logits=1)
                    kv.commit([len(f) for f in feeds])
            seconds = time.perf_counter() - t0
        self.stats.joins += 1
        self.stats.join_seconds += seconds
        for r in rows:
            r.run.stats.prefill_seconds = seconds
            r.run.stats.target_tokens_processed += len(r.seq) - 1
            r.run.stats.draft_tokens_processed += len(r.seq) - 1
        self._tkv.extend(tkv)
        self._dkv.extend(dkv)
        self._rows += rows
        self.stats.joined += len(rows)

    def _step(self) -> None:
        started = time.perf_counter()
        eng = self.engine
        pair = eng.pair
        rows = self._rows
        # Rows cancelled before the step leave without one (as GenerationRun does).
        for row in rows:
            if row.run.cancelled():
                row.finish = FinishReason.CANCELLED
        if any(r.finish is not None for r in rows):
            self._remove_finished()
            rows = self._rows
            if not rows:
                return
        b = len(rows)
        failed: dict[int, BaseException] = {}
        for i, row in enumerate(rows):
            try:
                row.held.next_step()
            except Exception as err:
                failed[i] = err
        self._plan_batch(rows)
        # --- decide (rows without a prefix window decide before drafting)
        for i, row in enumerate(rows):
            row.reset_step()
            if i in failed:
                continue
            remaining = row.run.max_new_tokens - len(row.new)
            row.cap = min(eng.config.max_gamma, remaining - 1)
            try:
                if row.policy.prefix_tokens == 0:
                    row.decision = row.policy.decide(row.step, None)
                    self._enter_main(row, row.decision.gamma)
                else:
                    row.phase, row.want = _PREFIX, min(row.policy.prefix_tokens, row.cap)
            except Exception as err:
                failed[i] = err
                row.phase = _DONE
        self._flush()
        with eng.device_lock, torch.inference_mode():
            # --- draft: batched forwards until every row has drafted what it wants
            draft_seconds = 0.0
            draft_forwards = 0
            catch_up = 0  # longest draft feed of the first forward (> 2: the draft lagged)
            while True:
                for i, row in enumerate(rows):
                    if i in failed:
                        row.phase = _DONE
                        continue
                    try:
                        self._advance(row)
                    except Exception as err:
                        failed[i] = err
                        row.phase = _DONE
                active = [i for i, r in enumerate(rows) if r.phase != _DONE]
                if not active:
                    break
                t0 = time.perf_counter()
                feeds: list[list[int]] = [[] for _ in rows]
                for i in active:
                    r = rows[i]
                    feeds[i] = (r.seq + r.drafts)[self._dkv.lengths[i] :]
                if not draft_forwards:
                    catch_up = max(len(f) for f in feeds)
                bases = list(self._dkv.lengths)
                logits = self._dkv.forward(pair.draft, feeds, self._pad)
                self._dkv.commit([len(f) for f in feeds])
                # Greedy rows: one argmax over every fed position of the batch, for their next
                # draft and for the replay (the draft's argmax after each true prefix).
                greedy = any(rows[i].generator is None for i in active)
                argmax = logits.argmax(-1).tolist() if greedy else []
                for i in active:
                    r = rows[i]
                    r.draft_fed += len(feeds[i])
                    last = logits[i, len(feeds[i]) - 1].float()
                    r.draft_logits.append(last)
                    if r.track is not None:
                        for j in range(len(feeds[i])):
                            r.tent[bases[i] + j] = argmax[i][j]
                    if r.generator is None:
                        token = argmax[i][len(feeds[i]) - 1]
                    else:
                        q = warp(last.unsqueeze(0), r.run.sampling)[0]
                        r.draft_probs.append(q)
                        token = sample(q, r.generator)
                    r.drafts.append(token)
                draft_seconds += time.perf_counter() - t0
                draft_forwards += 1
                for i in active:
                    r = rows[i]
                    if r.phase == _MAIN and r.step_signals is not None:
                        try:
                            self._after_token(r)
                        except Exception as err:
                            failed[i] = err
                            r.phase = _DONE
            # --- the drafted hook (submissions coalesce into one message, sent before verify)
            sigs: list[Any] = [None] * b
            for i, r in enumerate(rows):
                if i in failed:
                    continue
                try:
                    sigs[i] = self._drafted(r)
                except Exception as err:
                    failed[i] = err
            self._flush()
            # --- verify: one batched target forward over every row's γ_i + 1 positions
            t0 = time.perf_counter()
            fed = [[r.seq[-1], *r.drafts[: r.gamma]] if i not in failed else []
                   for i, r in enumerate(rows)]  # fmt: skip
            logits = self._tkv.forward(pair.target, fed, self._pad)
            verdicts: list[Any] = [None] * b
            keep = [0] * b
            for i, r in enumerate(rows):
                if i in failed:
                    continue
                g = r.gamma
                try:
                    verdicts[i] = r.run._verify(
                        r.drafts[:g], logits[i, : g + 1], r.draft_probs[:g], r.generator
                    )
                except Exception as err:
                    failed[i] = err
                    continue
                keep[i] = verdicts[i].accepted + 1
            self._tkv.commit(keep)
            for i, r in enumerate(rows):
                if verdicts[i] is None:
                    continue
                n = verdicts[i].accepted
                valid = len(r.seq) + min(n, max(len(r.drafts) - 1, 0))
                self._dkv.truncate(i, valid)
            self._dkv.trim()
            verify_seconds = time.perf_counter() - t0
        width = max((r.gamma for i, r in enumerate(rows) if i not in failed), default=0)
        drafted_max = max((len(r.drafts) for i, r in enumerate(rows) if i not in failed), default=0)
        if drafted_max:
            eng.timing.add_draft(drafted_max, draft_seconds)
        eng.timing.add_verify(width, verify_seconds)
        st = self.stats
        st.steps += 1
        st.row_steps += b
        st.max_batch = max(st.max_batch, b)
        st.batch_sizes[b] = st.batch_sizes.get(b, 0) + 1
        st.shapes[(b, width)] = st.shapes.get((b, width), 0) + 1
        st.draft_forwards += draft_forwards
        st.verify_forwards += 1
        per_size = st.gammas.setdefault(b, {})
        # --- per-row bookkeeping and the remaining hooks, in GenerationRun's order
        for i, r in enumerate(rows):
            if i in failed:
                continue
            per_size[r.gamma] = per_size.get(r.gamma, 0) + 1
            try:
                self._finish_step(
                    r, verdicts[i], sigs[i], draft_seconds, verify_seconds, len(fed[i])
                )
            except Exception as err:
                failed[i] = err
        for i, error in failed.items():
            rows[i].finish = FinishReason.CANCELLED
            rows[i].handle._put(error)
            rows[i].handle.abandoned.set()
        self._flush()
        self._remove_finished(errors=set(failed))
        # A step whose draft first caught up on tokens from G = 0 steps (more than the ≤ 2
        # a drafting step leaves behind) is not a sample of a drafting step's cost: counted,
        # the probes after G = 0 runs made drafting look dearer than it is and kept the
        # batch at G = 0. The catch-up is a deferred cost of the plain steps, small next to
        # them (one longer draft forward per run of plain steps); it is left out.
        elapsed = time.perf_counter() - started
        # Both timing sums at one point, so a reader never sees a step's forwards without
        # its whole step (finished rows have their results before this line runs).
        st.forward_seconds += draft_seconds + verify_seconds
        st.step_seconds += elapsed
        if catch_up <= 2:
            self.costs.add(
                b,
                width,
                elapsed,
                draft_seconds=draft_seconds,
                draft_forwards=draft_forwards,
                verify_seconds=verify_seconds,
            )

    def _plan_batch(self, rows: list[_Row]) -> None:
        """batch-goodput rows: one verify width for the batch (docs/worker.md, "Batching";
        docs/design.md, "The batch's draft length"). A greedy row is priced by the replay
        over its own text, shrunk towards the pooled replay (`row_prior_steps`); a sampled
        row by the pooled estimate. (A per-row *acceptance scale* on the position model was
        tried first and dropped: over rows of 48 tokens its noise made the batch pick G = 0
        or 1 where G = 2 paid, in-process at 8 rows 414 vs 497 tokens/s.)"""
        aware = [r for r in rows if getattr(r.policy, "batch_aware", False)]
        if not aware:
            return
        max_gamma = self.engine.config.max_gamma
        caps = [min(max_gamma, r.run.max_new_tokens - len(r.new) - 1) for r in aware]
        cands = [g for g in BATCH_GAMMAS if g <= max_gamma]
        expected = self.replay.expected(self.yields.expected(max(cands)))
        k = self.row_prior_steps
        tokens = [
            expected
            if r.track is None or k is None
            else ReplayYield.row_expected(r.track, expected, k)
            for r in aware
        ]
        reach = self.row_reach if k is not None else None
        g = choose_within_reach(tokens, expected, caps, len(rows), self.costs, cands, reach)
        # The draft does not run at G = 0, so neither estimate learns: while the batch sits
        # at G = 0, every PROBE_EVERY-th step drafts one token (its catch-up feed also gives
        # the replay the draft's argmax after every skipped position).
        if g == 0 and max(caps) > 0 and self.stats.steps % PROBE_EVERY == PROBE_EVERY - 1:
            g = 1
        for r in aware:
            r.policy.batch_gamma = g  # type: ignore[attr-defined]
        if g is not None:
            per = self.stats.chosen.setdefault(len(rows), {})
            per[g] = per.get(g, 0) + 1

    def warmup(
        self,
        sizes: Sequence[int] = (1, 2, 4, 8, 16),
        gammas: Sequence[int] = (0, 2, 4, 8),
        steps: int = 4,
    ) -> None:
        """Measure batched step costs at each batch size and verify width (dummy prompts,
        not recorded) so `batch-goodput` starts from real numbers."""
        from decode_worker.policies import FixedPolicy

        vocab = int(self.engine.pair.target.config.vocab_size)
        self._warming = True
        try:
            self._warm(sizes, gammas, steps, vocab, FixedPolicy)
        finally:
            self._warming = False

    def _warm(
        self, sizes: Sequence[int], gammas: Sequence[int], steps: int, vocab: int, fixed: Any
    ) -> None:
        for b in sizes:
            if b > self.max_batch_size:
                continue
            for g in gammas:
                g = min(g, self.engine.config.max_gamma)
                handles = [
                    self.submit(
                        [(7 * i + j) % (vocab - 1) + 1 for j in range(16)],
                        fixed(g),
                        max_new_tokens=steps * (g + 1),
                        request_id=f"warmup-{b}-{g}-{i}",
                        record=False,
                    )
                    for i in range(b)
                ]
                for h in handles:
                    for _ in h:
                        pass

    # -- per-row pieces of a step

    def _enter_main(self, row: _Row, gamma: int) -> None:
        row.gamma = max(0, min(gamma, row.cap))
        row.phase, row.want = _MAIN, row.gamma
        if row.policy.in_step and row.gamma > len(row.drafts):
            assert row.context is not None
            row.step_signals = []
            row.hist = row.history.values()

    def _advance(self, row: _Row) -> None:
        """Move a row's drafting phase on when it has drafted what the phase wants."""
        if row.phase == _PREFIX and len(row.drafts) >= row.want:
            prefix = aggregate(token_signals(torch.stack(row.draft_logits))) if row.drafts else None
            row.decision = row.policy.decide(row.step, prefix)
            self._enter_main(row, row.decision.gamma)
        if row.phase == _MAIN and len(row.drafts) >= row.want:
            row.phase = _DONE

    def _after_token(self, row: _Row) -> None:
        """The in-step hook after a drafted token (GenerationRun._draft_in_step)."""
        assert row.step_signals is not None and row.context is not None and row.hist is not None
        sig = token_signals(row.draft_logits[-1].unsqueeze(0))[0]
        row.step_signals.append(sig)
        j = len(row.drafts)
        features = token_features(row.context, row.drafts[:-1], row.drafts[-1], sig, row.hist)
        keep = row.policy.after_token(row.step, j, features, row.gamma)
        if keep is not None:
            row.gamma = max(0, min(keep, j))
            row.phase = _DONE
        elif j >= row.gamma:
            row.gamma = j
            row.phase = _DONE

    def _drafted(self, row: _Row) -> Any:
        g = row.gamma
        if row.step_signals is not None:
            tok = row.step_signals[:g]
        else:
            tok = token_signals(torch.stack(row.draft_logits[:g])) if g else []
        signals = aggregate(tok) if tok else None
        row.policy.drafted(row.step, g, signals)
        return (tuple(tok), signals)

    def _finish_step(
        self,
        row: _Row,
        verdict: Any,
        sig: Any,
        draft_seconds: float,
        verify_seconds: float,
        target_fed: int,
    ) -> None:
        run = row.run
        pair = self.engine.pair
        tok_signals, signals = sig
        g, n = row.gamma, verdict.accepted
        drafted_count = len(row.drafts)
        if run.token_recorder is not None and drafted_count:
            run._record_tokens(
                row.step,
                row.drafts,
                row.step_signals,
                row.draft_logits,
                g,
                n,
                verdict.next_token,
                row.context,
                row.history,
            )
        history_before = row.history.values()  # what this step knew (step records)
        row.history.observe(row.drafts, g, n, verdict.next_token)
        if row.pooled:  # warm-up rows (dummy prompts) would drag the rates down
            self.yields.observe(g, n)
        row.policy.verified(row.step, g, n)
        produced = [*row.drafts[:n], verdict.next_token]
        track = row.track
        if track is not None:  # argmaxes after a true prefix: positions < len(seq) + n
            valid = len(row.seq) + n
            for q, token in row.tent.items():
                if q < valid:
                    track.predict(q, token)
        row.seq.extend(produced)
        if track is not None:
            track.resolve(row.seq)
            self.replay.advance(track)
        if row.context is not None:
            row.context.add(produced)
        kept, finish = run._finish(row.new, produced)
        before = len(row.new)
        row.new.extend(kept)
        text = run._text.update(row.new, final=finish is not None)
        if run._text.stopped_at is not None:
            del row.new[max(run._text.stopped_at, before) :]
            kept = row.new[before:]
            finish = FinishReason.STOP_STRING
        i = self._rows.index(row)
        result = StepResult(
            step=row.step,
            gamma=g,
            accepted=n,
            token_ids=tuple(kept),
            text=text,
            decision=row.decision
            if row.decision is not None
            else GammaDecision(0, DecisionSource.LOCAL),
            signals=signals,
            token_signals=tok_signals,
            drafted=drafted_count,
            draft_seconds=draft_seconds,
            verify_seconds=verify_seconds,
            draft_tokens_processed=row.draft_fed,
            target_tokens_processed=target_fed,
            draft_cache_len=self._dkv.lengths[i],
            target_cache_len=self._tkv.lengths[i],
        )
        run.stats.observe(result)
        row.held.step_done(step_outcome(run.request_id, pair.compression, result, finish))
        if run.recorder is not None:
            run.recorder.write(
                StepRecord(
                    sequence_id=run.request_id,
                    task=self.engine.config.record_task,
                    compression=pair.compression,
                    result=result,
                    prev_signals=row.prev_signals,
                    prev_full=history_before["prev_full"],
                    accept_ema=history_before["accept_ema"],
                )
            )
        if signals is not None:
            row.prev_signals = signals
        row.steps.append(result)
        row.handle._put(result)
        row.step += 1
        row.finish = finish

    def _remove_finished(self, errors: set[int] | None = None) -> None:
        keep = []
        for i, row in enumerate(self._rows):
            if row.finish is None:
                keep.append(i)
                continue
            if errors is None or i not in errors:
                self._end(row, None)
            else:
                _close(row)
            self.stats.left += 1
        if len(keep) != len(self._rows):
            order = fill_order(keep, len(self._rows))
            self._rows = [self._rows[i] for i in order]
            self._tkv.keep_rows(order)
            self._dkv.keep_rows(order)

    def _end(self, row: _Row, err: BaseException | None) -> None:
        _close(row)
        if err is not None:
            row.handle._put(err)
            return
        run = row.run
        assert row.finish is not None
        run.result = GenerationResult(
            request_id=run.request_id,
            prompt_ids=tuple(run.prompt_ids),
            token_ids=tuple(row.new),
            text=run._text.final_text(row.new),
            finish_reason=row.finish,
            steps=tuple(row.steps),
            stats=run.stats,
            wall_seconds=time.perf_counter() - row.started,
        )
        row.handle._put(run.result)


def _close(row: _Row) -> None:
    try:
        row.held.cut()  # cut between steps: its last outcome ends it
        row.policy.close()
    except Exception:  # a policy that fails to close must not stop the batch
        log.exception("policy close failed for %s", row.run.request_id)
