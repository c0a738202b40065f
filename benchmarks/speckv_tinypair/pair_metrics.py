"""Measure what decides whether speculation pays on a pair: greedy agreement and cost ratio.

Agreement is the share of positions where the draft's greedy token equals the target's
(teacher-forced, so one forward of each model scores every position). The cost ratio is
the draft's per-token time over the target's, both as KV-cached single-token forwards,
which is what drafting and plain decoding actually run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass(frozen=True)
class CostMeasurement:
    draft_ms_per_token: float  # median of KV-cached 1-token draft forwards
    target_ms_per_token: float  # same for the target
    target_ms_verify: float  # one target forward over `verify_tokens` new positions
    verify_tokens: int

    @property
    def ratio(self) -> float:
        return self.draft_ms_per_token / self.target_ms_per_token


def _greedy(model: PreTrainedModel, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    logits = model(input_ids=ids).logits  # [batch, seq, vocab']
    return logits[..., :vocab_size].float().argmax(-1)  # [batch, seq]


@torch.inference_mode()
def teacher_forced_agreement(
    draft: PreTrainedModel,
    target: PreTrainedModel,
    windows: torch.Tensor,  # [n, seq] token ids
    vocab_size: int,
    start: int = 0,
    batch_size: int = 8,
) -> float:
    """Share of positions >= `start` where both models predict the same next token."""
    same = total = 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(target.device)
        d = _greedy(draft, ids, vocab_size)[:, start:]
        t = _greedy(target, ids, vocab_size)[:, start:]
        same += int((d == t).sum())
        total += d.numel()
    return same / max(total, 1)


@torch.inference_mode()
def generated_agreement(
    draft: PreTrainedModel,
    target: PreTrainedModel,
    prompts: torch.Tensor,  # [n, prompt_len] token ids
    new_tokens: int,
    vocab_size: int,
) -> float:
    """Agreement on text the target generated greedily: what a greedy speculative run sees."""
    out = target.generate(  # type: ignore[operator]
        input_ids=prompts.to(target.device),
        attention_mask=torch.ones_like(prompts).to(target.device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    # Positions prompt_len-1 ... end-1 predict the generated tokens.
    return teacher_forced_agreement(
        draft, target, out[:, :-1], vocab_size, start=prompts.shape[1] - 1
    )


def _per_token_ms(
    model: PreTrainedModel, context: torch.Tensor, steps: int, chunk: int = 1
) -> float:
    cache = DynamicCache()
    out = model(input_ids=context, cache=cache, use_cache=True)
    next_ids = out.logits[:, -1:].argmax(-1).repeat(1, chunk)
    times: list[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(input_ids=next_ids, cache=cache, use_cache=True)
        times.append(time.perf_counter() - t0)
        cache.crop(-chunk)  # keep the context length fixed so every call costs the same
    return 1000.0 * statistics.median(times)


@torch.inference_mode()
def measure_cost(
    draft: PreTrainedModel,
    target: PreTrainedModel,
    context: torch.Tensor,  # [1, ctx] token ids already in both caches
    steps: int = 60,
    verify_tokens: int = 5,
) -> CostMeasurement:
    """Median wall time per cached forward; warm-up calls are discarded."""
    ctx = context.to(target.device)
    for m in (draft, target):
        _per_token_ms(m, ctx, 5)
    return CostMeasurement(
        draft_ms_per_token=_per_token_ms(draft, ctx, steps),
        target_ms_per_token=_per_token_ms(target, ctx, steps),
        target_ms_verify=_per_token_ms(target, ctx, max(steps // 2, 5), chunk=verify_tokens),
        verify_tokens=verify_tokens,
    )
