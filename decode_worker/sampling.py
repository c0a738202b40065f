"""Verification of drafted tokens: greedy matching and speculative rejection sampling.

Rejection sampling is Leviathan et al. 2023 (arXiv 2211.17192), Algorithm 1: accept the
drafted token x with probability min(1, p(x)/q(x)); on the first rejection resample from
norm(max(0, p − q)); when every drafted token is accepted, sample a bonus token from the
target's next distribution. The output is distributed exactly as sampling from p, the
target's distribution after temperature and top-p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_p 0 or 1 switches nucleus sampling off."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and ≥ 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Verdict:
    """How many drafted tokens the target accepted and the token it adds after them."""

    accepted: int
    next_token: int


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling distribution [n, vocab] (fp32) after temperature and top-p.

    Stable for any positive temperature and top_p: the logits are shifted so that the
    largest is 0 before dividing (a tiny temperature then sends the others to -inf, never
    the maximum to inf or 0/0, which made softmax NaN), and top-p always keeps the most
    likely token (a top_p below every probability leaves that one token, not none).
    """
    x = logits.to(torch.float32)
    shifted = x - x.amax(dim=-1, keepdim=True)  # [n, vocab], max 0 (−inf stays −inf)
    # A temperature below float32's range divides by 0.0 here: −inf for every token but the
    # maximum, which `where` keeps at 0 (its 0/0 is never selected).
    scaled = torch.where(shifted < 0, shifted / params.temperature, torch.zeros_like(shifted))
    probs = torch.softmax(scaled, dim=-1)
    if 0.0 < params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the token crossing it included).
        cum_before = sorted_p.cumsum(dim=-1) - sorted_p
        keep_sorted = cum_before < params.top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def greedy_verify(draft_tokens: list[int], target_logits: torch.Tensor) -> Verdict:
    """Accept the longest prefix equal to the target's argmax; add the target's own token.

    `target_logits` [len(draft_tokens) + 1, vocab]: row i predicts the token after
    draft position i (row 0 follows the last committed token).
    """
    target_tokens = target_logits.argmax(dim=-1).tolist()  # [gamma + 1]
    accepted = 0
    for drafted, wanted in zip(draft_tokens, target_tokens, strict=False):
        if drafted != wanted:
            break
        accepted += 1
    return Verdict(accepted=accepted, next_token=int(target_tokens[accepted]))


def rejection_verify(
    draft_tokens: list[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> Verdict:
    """Leviathan et al.'s accept/resample rule.

    `draft_probs` [gamma, vocab]: q_i, the distribution token i was sampled from.
    `target_probs` [gamma + 1, vocab]: p_i after the same warping.
    """
    gamma = len(draft_tokens)
    if gamma:
        idx = torch.tensor(draft_tokens, dtype=torch.long, device=draft_probs.device)
        rows = torch.arange(gamma, device=draft_probs.device)
        q = draft_probs[rows, idx].to("cpu", torch.float64)  # [gamma]
        p = target_probs[:gamma][rows, idx].to("cpu", torch.float64)  # [gamma]
        u = torch.rand(gamma, generator=generator, dtype=torch.float64)  # [gamma]
        ratio = torch.where(q > 0, p / q, torch.ones_like(p))
        rejected = (u >= ratio).tolist()  # accept iff u < min(1, p/q)
        for i in range(gamma):
            if rejected[i]:
                residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)
                total = residual.sum()
                # p == q exactly leaves nothing to resample from; then p itself is right.
                dist = residual / total if total > 0 else target_probs[i]
                return Verdict(accepted=i, next_token=sample(dist, generator))
    return Verdict(accepted=gamma, next_token=sample(target_probs[gamma], generator))


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a probability vector [vocab], reproducible for a seeded generator."""
    cpu = probs.detach().to("cpu", torch.float64)
    return int(torch.multinomial(cpu, 1, generator=generator).item())


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator: seed 0 means unseeded (fresh entropy)."""
    gen = torch.Generator(device="cpu")
    if seed:
        gen.manual_seed(seed)
    else:
        gen.seed()
    return gen
