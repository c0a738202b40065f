"""The speculative decoding loop: draft with the draft's KV cache, verify in one target
forward, crop both caches after a rejection, ask the gamma policy at the right moments.

Cache invariants (batch 1, no padding), with `seq` = prompt + committed tokens:
- the target cache holds exactly seq[:-1]; a step feeds [seq[-1], d_1..d_γ] (γ+1 positions)
  and afterwards keeps seq + d_1..d_n for n accepted tokens (the rejected tail is cropped);
- the draft cache holds a prefix of seq[:-1]; a step first feeds whatever it lacks (one
  token, two after a fully accepted step, more after γ=0 steps), so the prompt is encoded
  once per model and never again.

`SpeculativeEngine.start` returns a `GenerationRun` that yields one `StepResult` per step;
`generate` runs it to the end. The proposer (`_draft`), verifier (`sampling.py`), policy
(`policies.py`) and statistics (`SpecStats`) are separate pieces the loop wires together.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from speckv_client.types import Compression, DraftSignals, FinishReason, StepOutcome
from transformers import DynamicCache

from decode_worker.config import EngineConfig
from decode_worker.features import (
    ContextIndex,
    SequenceHistory,
    TokenSignals,
    aggregate,
    token_features,
    token_signals,
)
from decode_worker.policies import (
    DecisionSource,
    GammaDecision,
    GammaPolicy,
    HeldOutcome,
    SequenceInfo,
    SequencePolicy,
)
from decode_worker.records import StepRecord, StepSink, TokenRecord, TokenRecorder
from decode_worker.sampling import (
    SamplingParams,
    Verdict,
    greedy_verify,
    make_generator,
    rejection_verify,
    sample,
    warp,
)
from decode_worker.timing import TimingModel


class RequestError(ValueError):
    """A request the engine refuses (the servicer maps it to INVALID_ARGUMENT)."""


class PairLike(Protocol):
    """What the engine needs of a loaded pair (decode_worker.pair.LoadedPair fits)."""

    tokenizer: Any
    draft: Any
    target: Any

    @property
    def compression(self) -> str: ...


@dataclass(frozen=True)
class StepResult:
    """One step of one sequence, as the service streams it."""

    step: int
    gamma: int  # tokens drafted and verified this step
    accepted: int  # drafted tokens the target kept
    token_ids: tuple[int, ...]  # tokens this step added ([accepted + 1], fewer at a stop)
    text: str  # text newly safe to emit (held back: partial UTF-8, a possible stop string)
    decision: GammaDecision
    signals: DraftSignals | None  # over the γ drafted tokens; None when γ = 0
    token_signals: tuple[TokenSignals, ...]  # [gamma]
    drafted: int  # draft forwards this step (> gamma when a stop rule cut the draft)
    draft_seconds: float
    verify_seconds: float
    draft_tokens_processed: int  # positions fed to the draft this step
    target_tokens_processed: int  # positions fed to the target this step (γ + 1)
    draft_cache_len: int
    target_cache_len: int


@dataclass
class SpecStats:
    """Speculation statistics of one generation (vLLM's SpecDecodingStats, plus decisions)."""

    num_steps: int = 0
    num_drafts: int = 0  # steps with γ > 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    new_tokens: int = 0
    remote_decisions: int = 0
    fallback_decisions: int = 0
    local_decisions: int = 0
    decision_wait_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    draft_forwards: int = 0
    # Drafted tokens a stop rule dropped before verification (their forwards were wasted).
    wasted_draft_tokens: int = 0
    target_forwards: int = 0
    draft_tokens_processed: int = 0
    target_tokens_processed: int = 0
    model_versions: dict[str, int] = field(default_factory=dict)

    def observe(self, r: StepResult) -> None:
        self.num_steps += 1
        self.new_tokens += len(r.token_ids)
        if r.gamma > 0:
            self.num_drafts += 1
            self.num_draft_tokens += r.gamma
            self.num_accepted_tokens += r.accepted
            while len(self.num_accepted_tokens_per_pos) < r.gamma:
                self.num_accepted_tokens_per_pos.append(0)
            for pos in range(r.accepted):
                self.num_accepted_tokens_per_pos[pos] += 1
        source = r.decision.source
        if source == DecisionSource.REMOTE:
            self.remote_decisions += 1
            key = r.decision.model_key
            self.model_versions[key] = self.model_versions.get(key, 0) + 1
        elif source == DecisionSource.FALLBACK:
            self.fallback_decisions += 1
        else:
            self.local_decisions += 1
        self.decision_wait_seconds += r.decision.wait_seconds
        self.draft_seconds += r.draft_seconds
        self.verify_seconds += r.verify_seconds
        self.target_forwards += 1
        self.target_tokens_processed += r.target_tokens_processed
        self.draft_forwards += max(r.drafted, len(r.token_signals))
        self.wasted_draft_tokens += max(r.drafted - r.gamma, 0)
        self.draft_tokens_processed += r.draft_tokens_processed

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.num_steps if self.num_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_gamma(self) -> float:
        return self.num_draft_tokens / self.num_steps if self.num_steps else 0.0


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # new tokens only
    text: str
    finish_reason: FinishReason
    steps: tuple[StepResult, ...]
    stats: SpecStats
    wall_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.wall_seconds if self.wall_seconds > 0 else 0.0


def cap_gamma(requested: int, max_gamma: int, remaining: int) -> int:
    """The draft length a step may use: what was asked, at most the engine's max_gamma,
    and short enough that the step's γ + 1 tokens fit in the `remaining` ones."""
    return max(0, min(requested, max_gamma, remaining - 1))


def step_outcome(
    request_id: str, compression: str, r: StepResult, finish: FinishReason | None
) -> StepOutcome:
    """The outcome a policy sees (and the remote policy reports) for one step."""
    d = r.decision
    remote = d.source == DecisionSource.REMOTE
    return StepOutcome(
        routing_key=request_id,
        step=r.step,
        source=d.source,
        drafted=r.gamma,
        accepted=r.accepted,
        tokens=len(r.token_ids),
        draft_seconds=r.draft_seconds,
        verify_seconds=r.verify_seconds,
        compression=Compression(compression),
        model_name=d.model_name if remote else "",
        model_version=d.model_version if remote else 0,
        arm=d.arm if remote else "",
        decision_step=d.decision_step if remote else 0,
        sequence_end=finish is not None,
    )


class SpeculativeEngine:
    """One loaded pair on one device. Many sequences may run at once: each has its own
    caches, and each step's model work holds `device_lock`, so sequences interleave step
    by step (no batching)."""

    concurrency = "per-step device lock: concurrent requests interleave step by step, unbatched"

    def __init__(
        self,
        pair: PairLike,
        config: EngineConfig | None = None,
        *,
        timing: TimingModel | None = None,
        recorder: StepSink | None = None,
        token_recorder: TokenRecorder | None = None,
    ) -> None:
        self.pair = pair
        self.config = config or EngineConfig()
        self.timing = timing or TimingModel(self.config.timing_ema_alpha)
        self.recorder = recorder
        self.token_recorder = token_recorder
        self.device_lock = threading.Lock()
        self.device = next(pair.target.parameters()).device
        self.draft_device = next(pair.draft.parameters()).device
        self.eos_token_ids = _eos_ids(pair)
        self.max_positions = min(
            _max_positions(pair.target.config), _max_positions(pair.draft.config)
        )
        # What the pair allows: a prompt needs at least one position.
        self.max_new_tokens_limit = max(
            1, min(self.config.max_new_tokens_limit, self.max_positions - 1)
        )
        self.default_max_new_tokens = min(
            self.config.default_max_new_tokens, self.max_new_tokens_limit
        )

    def encode(self, prompt: str) -> list[int]:
        ids = self.pair.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return [int(i) for i in ids]

    def start(
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
    ) -> GenerationRun:
        """Validate a request and return its (not yet started) run; `record=False` keeps
        it out of the step log (warm-up)."""
        if not prompt_ids:
            raise RequestError("the prompt is empty (no tokens); send some text")
        n = max_new_tokens or self.default_max_new_tokens
        if n < 0 or n > self.max_new_tokens_limit:
            raise RequestError(
                f"max_new_tokens {max_new_tokens} is outside [1, {self.max_new_tokens_limit}] "
                "(the worker's --max-new-tokens-limit, at most the pair's positions - 1)"
            )
        if len(prompt_ids) + n > self.max_positions:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({n}) exceeds the models' "
                f"{self.max_positions} positions; shorten the prompt or ask for fewer tokens"
            )
        if any(not s for s in stop):
            raise RequestError("stop strings must not be empty")
        if stop and self.pair.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this pair has none")
        return GenerationRun(
            self,
            list(prompt_ids),
            policy,
            sampling or SamplingParams(),
            n,
            tuple(stop),
            request_id or uuid.uuid4().hex,
            cancelled or (lambda: False),
            self.recorder if record else None,
            self.token_recorder if record else None,
        )

    def generate(
        self, prompt_ids: Sequence[int], policy: GammaPolicy, **kwargs: Any
    ) -> GenerationResult:
        """Run a whole generation in this thread (what evaluation scripts call)."""
        run = self.start(prompt_ids, policy, **kwargs)
        for _ in run:
            pass
        assert run.result is not None
        return run.result

    def warmup(self, gammas: Sequence[int] = (0, 4, 8), repeats: int = 3) -> None:
        """Measure draft and verify costs on a dummy sequence so the timing model (goodput)
        starts with real numbers, and the first request does not pay one-off setup."""
        from decode_worker.policies import FixedPolicy

        vocab = int(self.pair.target.config.vocab_size)
        prompt = [i % vocab for i in range(1, 17)]
        for g in gammas:
            for _ in range(repeats):
                self.generate(
                    prompt, FixedPolicy(g), max_new_tokens=g + 1, request_id="warmup", record=False
                )

    # Model calls. Both return logits of the last `keep` positions, [keep, vocab].
    def forward(
        self, model: Any, cache: DynamicCache, tokens: list[int], keep: int
    ) -> torch.Tensor:
        device = next(model.parameters()).device
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=keep)
        return out.logits[0, -keep:]


class GenerationRun:
    """One sequence's generation; iterate it for `StepResult`s, then read `result`."""

    def __init__(
        self,
        engine: SpeculativeEngine,
        prompt_ids: list[int],
        policy: GammaPolicy,
        sampling: SamplingParams,
        max_new_tokens: int,
        stop: tuple[str, ...],
        request_id: str,
        cancelled: Callable[[], bool],
        recorder: StepSink | None,
        token_recorder: TokenRecorder | None = None,
    ) -> None:
        self.engine = engine
        self.recorder = recorder
        self.token_recorder = token_recorder
        self.prompt_ids = prompt_ids
        self.policy = policy
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.request_id = request_id
        self.cancelled = cancelled
        self.stats = SpecStats()
        self.result: GenerationResult | None = None
        self._text = _TextTracker(engine.pair.tokenizer, stop)

    def __iter__(self) -> Iterator[StepResult]:
        return self._run()

    def _run(self) -> Iterator[StepResult]:
        eng = self.engine
        pair = eng.pair
        started = time.perf_counter()
        seq_policy = self.policy.start(SequenceInfo(self.request_id, pair.compression))
        generator = None if self.sampling.greedy else make_generator(self.sampling.seed)
        seq = list(self.prompt_ids)
        new: list[int] = []
        steps: list[StepResult] = []
        t_cache = DynamicCache(config=pair.target.config)
        d_cache = DynamicCache(config=pair.draft.config)
        d_len = 0
        prev_signals: DraftSignals | None = None
        finish: FinishReason | None = None
        # Per-sequence history and context n-grams (docs/design.md, "Draft plans"); the
        # n-gram index is kept only when a policy or the token log reads it.
        history = SequenceHistory()
        history_before = history.values()  # what the step about to run knows (step records)
        context = ContextIndex() if seq_policy.in_step or self.token_recorder is not None else None
        if context is not None:
            context.add(seq)
        held = HeldOutcome(seq_policy)
        try:
            with eng.device_lock, torch.inference_mode():
                t0 = time.perf_counter()
                if len(seq) > 1:
                    eng.forward(pair.target, t_cache, seq[:-1], 1)
                    eng.forward(pair.draft, d_cache, seq[:-1], 1)
                    d_len = len(seq) - 1
                self.stats.prefill_seconds = time.perf_counter() - t0
                self.stats.target_tokens_processed += len(seq) - 1
                self.stats.draft_tokens_processed += len(seq) - 1
            step = 0
            while finish is None:
                if self.cancelled():
                    finish = FinishReason.CANCELLED
                    break
                held.next_step()
                remaining = self.max_new_tokens - len(new)
                decision: GammaDecision | None = None
                if seq_policy.prefix_tokens == 0:
                    decision = seq_policy.decide(step, None)
                with torch.inference_mode():
                    # --- propose: draft up to the chosen gamma (prefix first if asked) ---
                    drafts: list[int] = []
                    draft_logits: list[torch.Tensor] = []
                    draft_probs: list[torch.Tensor] = []
                    draft_fed = 0
                    draft_seconds = 0.0
                    if decision is None:
                        k = cap_gamma(seq_policy.prefix_tokens, eng.config.max_gamma, remaining)
                        with eng.device_lock:
                            t0 = time.perf_counter()
                            d_len, draft_fed = self._draft(
                                d_cache, d_len, seq, k, drafts, draft_logits, draft_probs, generator
                            )
                            draft_seconds += time.perf_counter() - t0
                        prefix = (
                            aggregate(token_signals(torch.stack(draft_logits))) if drafts else None
                        )
                        decision = seq_policy.decide(step, prefix)
                    gamma = cap_gamma(decision.gamma, eng.config.max_gamma, remaining)
                    step_signals: list[TokenSignals] | None = None
                    with eng.device_lock:
                        t0 = time.perf_counter()
                        if seq_policy.in_step and gamma > len(drafts):
                            assert context is not None
                            gamma, fed, d_len, step_signals = self._draft_in_step(
                                step,
                                seq_policy,
                                gamma,
                                d_cache,
                                d_len,
                                seq,
                                drafts,
                                draft_logits,
                                draft_probs,
                                generator,
                                context,
                                history,
                            )
                            draft_fed += fed
                        elif gamma > len(drafts):
                            d_len, fed = self._draft(
                                d_cache,
                                d_len,
                                seq,
                                gamma - len(drafts),
                                drafts,
                                draft_logits,
                                draft_probs,
                                generator,
                            )
                            draft_fed += fed
                        draft_seconds += time.perf_counter() - t0
                        drafted_count = len(drafts)
                        all_drafts = drafts
                        drafts = drafts[:gamma]
                        if step_signals is not None:
                            tok_signals = step_signals[:gamma]
                        else:
                            tok_signals = (
                                token_signals(torch.stack(draft_logits[:gamma])) if gamma else []
                            )
                        signals = aggregate(tok_signals) if tok_signals else None
                        seq_policy.drafted(step, gamma, signals)

                        # --- verify: one target forward over γ + 1 positions ---
                        t0 = time.perf_counter()
                        fed_target = [seq[-1], *drafts]
                        logits = eng.forward(pair.target, t_cache, fed_target, gamma + 1)
                        verdict = self._verify(drafts, logits, draft_probs[:gamma], generator)
                        n = verdict.accepted
                        if gamma > n:
                            t_cache.crop(-(gamma - n))
                        # The draft cache holds seq + d_1..d_(k-1) for k drafted; keep what
                        # the target accepted.
                        valid = len(seq) + min(n, max(drafted_count - 1, 0))
                        if d_len > valid:
                            d_cache.crop(-(d_len - valid))
                            d_len = valid
                        verify_seconds = time.perf_counter() - t0
                    if drafted_count:
                        eng.timing.add_draft(drafted_count, draft_seconds)
                    eng.timing.add_verify(gamma, verify_seconds)
                    if self.token_recorder is not None and drafted_count:
                        self._record_tokens(
                            step,
                            all_drafts,
                            step_signals,
                            draft_logits,
                            gamma,
                            n,
                            verdict.next_token,
                            context,
                            history,
                        )
                    history.observe(all_drafts, gamma, n, verdict.next_token)
                    seq_policy.verified(step, gamma, n)

                produced = [*drafts[:n], verdict.next_token]
                seq.extend(produced)
                if context is not None:
                    context.add(produced)
                kept, finish = self._finish(new, produced)
                before = len(new)
                new.extend(kept)
                text = self._text.update(new, final=finish is not None)
                if self._text.stopped_at is not None:
                    # A stop string ended the text; drop tokens after the one completing it.
                    del new[max(self._text.stopped_at, before) :]
                    kept = new[before:]
                    finish = FinishReason.STOP_STRING
                result = StepResult(
                    step=step,
                    gamma=gamma,
                    accepted=n,
                    token_ids=tuple(kept),
                    text=text,
                    decision=decision,
                    signals=signals,
                    token_signals=tuple(tok_signals),
                    drafted=drafted_count,
                    draft_seconds=draft_seconds,
                    verify_seconds=verify_seconds,
                    draft_tokens_processed=draft_fed,
                    target_tokens_processed=len(fed_target),
                    draft_cache_len=d_len,
                    target_cache_len=t_cache.get_seq_length(),
                )
                self.stats.observe(result)
                held.step_done(step_outcome(self.request_id, pair.compression, result, finish))
                if self.recorder is not None:
                    self.recorder.write(
                        StepRecord(
                            sequence_id=self.request_id,
                            task=eng.config.record_task,
                            compression=pair.compression,
                            result=result,
                            prev_signals=prev_signals,
                            prev_full=history_before["prev_full"],
                            accept_ema=history_before["accept_ema"],
                        )
                    )
                    history_before = history.values()
                if signals is not None:
                    prev_signals = signals
                steps.append(result)
                yield result
                step += 1
        finally:
            try:
                held.cut()
            finally:
                seq_policy.close()
        self.result = GenerationResult(
            request_id=self.request_id,
            prompt_ids=tuple(self.prompt_ids),
            token_ids=tuple(new),
            text=self._text.final_text(new),
            finish_reason=finish,
            steps=tuple(steps),
            stats=self.stats,
            wall_seconds=time.perf_counter() - started,
        )

    def _draft(
        self,
        cache: DynamicCache,
        cache_len: int,
        seq: list[int],
        count: int,
        drafts: list[int],
        logits_out: list[torch.Tensor],
        probs_out: list[torch.Tensor],
        generator: torch.Generator | None,
    ) -> tuple[int, int]:
        """Draft `count` more tokens after seq + drafts; return (cache length, positions fed)."""
        eng = self.engine
        fed = 0
        for _ in range(count):
            context = seq + drafts
            feed = context[cache_len:]
            logits = eng.forward(eng.pair.draft, cache, feed, 1)[0].float()  # [vocab]
            cache_len += len(feed)
            fed += len(feed)
            logits_out.append(logits)
            if generator is None:
                token = int(logits.argmax().item())
            else:
                q = warp(logits.unsqueeze(0), self.sampling)[0]
                probs_out.append(q)
                token = sample(q, generator)
            drafts.append(token)
        return cache_len, fed

    def _draft_in_step(
        self,
        step: int,
        policy: SequencePolicy,
        limit: int,
        cache: DynamicCache,
        cache_len: int,
        seq: list[int],
        drafts: list[int],
        logits_out: list[torch.Tensor],
        probs_out: list[torch.Tensor],
        generator: torch.Generator | None,
        context: ContextIndex,
        history: SequenceHistory,
    ) -> tuple[int, int, int, list[TokenSignals]]:
        """Draft one token at a time and let the policy stop after each (an in-step
        decision); returns (γ to verify, positions fed, cache length, token signals)."""
        fed = 0
        signals: list[TokenSignals] = []
        hist = history.values()
        while True:
            cache_len, n = self._draft(
                cache, cache_len, seq, 1, drafts, logits_out, probs_out, generator
            )
            fed += n
            sig = token_signals(logits_out[-1].unsqueeze(0))[0]
            signals.append(sig)
            j = len(drafts)
            features = token_features(context, drafts[:-1], drafts[-1], sig, hist)
            keep = policy.after_token(step, j, features, limit)
            if keep is not None:
                return max(0, min(keep, j)), fed, cache_len, signals
            if j >= limit:
                return j, fed, cache_len, signals

    def _record_tokens(
        self,
        step: int,
        drafts: list[int],
        signals: list[TokenSignals] | None,
        draft_logits: list[torch.Tensor],
        gamma: int,
        accepted: int,
        next_token: int,
        context: ContextIndex | None,
        history: SequenceHistory,
    ) -> None:
        """One token record per drafted token whose agreement is known (docs/design.md)."""
        assert self.token_recorder is not None and context is not None
        if signals is None or len(signals) < len(drafts):
            signals = token_signals(torch.stack(draft_logits[: len(drafts)]))
        eng = self.engine
        for i, tok in enumerate(drafts):
            if i < accepted:
                label = 1
            elif i == accepted and i < gamma:
                label = 0
            elif i == gamma and accepted == gamma:
                label = 1 if tok == next_token else 0
            else:
                break
            self.token_recorder.write(
                TokenRecord(
                    sequence_id=self.request_id,
                    task=eng.config.record_task,
                    compression=eng.pair.compression,
                    step=step,
                    position=i + 1,
                    gamma=gamma,
                    drafted=len(drafts),
                    match_length=context.match_length(drafts[:i], tok),
                    draft_confidence=signals[i].confidence,
                    draft_entropy=signals[i].entropy_bits,
                    prev_full=history.prev_full,
                    accept_ema=history.accept_ema,
                    agreed=label,
                )
            )

    def _verify(
        self,
        drafts: list[int],
        target_logits: torch.Tensor,
        draft_probs: list[torch.Tensor],
        generator: torch.Generator | None,
    ) -> Verdict:
        if generator is None:
            return greedy_verify(drafts, target_logits)
        p = warp(target_logits, self.sampling)  # [gamma + 1, vocab]
        q = (
            torch.stack(draft_probs).to(p.device)
            if draft_probs
            else torch.empty((0, p.shape[-1]), device=p.device)
        )
        return rejection_verify(drafts, q, p, generator)

    def _finish(self, new: list[int], produced: list[int]) -> tuple[list[int], FinishReason | None]:
        """Cut a step's tokens at EOS and at max_new_tokens; say why generation ends."""
        eos = self.engine.eos_token_ids
        for i, tok in enumerate(produced):
            if tok in eos:
                return produced[: i + 1], FinishReason.EOS
        if len(new) + len(produced) >= self.max_new_tokens:
            return produced[: self.max_new_tokens - len(new)], FinishReason.LENGTH
        if self.cancelled():
            return produced, FinishReason.CANCELLED
        return produced, None


class _TextTracker:
    """Incremental detokenization with stop strings.

    Emits only text that can no longer change: a trailing U+FFFD (an incomplete UTF-8
    sequence of a byte-level tokenizer) and any tail that could begin a stop string are
    held back until the next step or the end.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self._tok = tokenizer
        self._stop = stop
        self._emitted = 0
        self.stopped_at: int | None = None  # tokens kept when a stop string matched
        self._stop_text: str | None = None

    def decode(self, ids: Sequence[int]) -> str:
        if self._tok is None:
            return ""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def update(self, new: list[int], *, final: bool) -> str:
        text = self.decode(new)
        if self._stop:
            hit = _first_stop(text, self._stop, max(0, self._emitted - _longest(self._stop)))
            if hit is not None:
                self._stop_text = text[:hit]
                self.stopped_at = self._tokens_for_stop(new)
                return self._emit(self._stop_text)
        if final:
            return self._emit(text)
        safe = len(text)
        while safe > self._emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self._stop:
            for k in range(min(len(s) - 1, safe - self._emitted), 0, -1):
                if text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        return self._emit(text[:safe])

    def final_text(self, new: list[int]) -> str:
        return self._stop_text if self._stop_text is not None else self.decode(new)

    def _emit(self, text: str) -> str:
        if len(text) <= self._emitted:
            return ""
        chunk = text[self._emitted :]
        self._emitted = len(text)
        return chunk

    def _tokens_for_stop(self, new: list[int]) -> int:
        """The fewest tokens whose text contains a stop string."""
        for n in range(1, len(new) + 1):
            if _first_stop(self.decode(new[:n]), self._stop, 0) is not None:
                return n
        return len(new)


def _first_stop(text: str, stop: tuple[str, ...], start: int) -> int | None:
    hits = [i for s in stop if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _longest(stop: tuple[str, ...]) -> int:
    return max((len(s) for s in stop), default=0)


def _eos_ids(pair: PairLike) -> frozenset[int]:
    gen_cfg = getattr(pair.target, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None and pair.tokenizer is not None:
        eos = pair.tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos])


def _max_positions(config: Any) -> int:
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else 1 << 30
