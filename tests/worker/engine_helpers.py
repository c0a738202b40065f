"""Small random-init Llama pairs for engine tests that need no trained weights.

The draft is a noisy copy of the target, so it agrees with the target often enough for
accepted and rejected drafts to both occur; greedy equality must hold for any pair.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 48


@dataclass
class RandomPair:
    tokenizer: Any
    draft: Any
    target: Any
    compression: str = "fp16"


def random_pair(seed: int = 0, noise: float = 0.3, vocab: int = VOCAB) -> RandomPair:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    target = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        # Sharper distributions than at init, so greedy choices are not near-ties.
        target.lm_head.weight.mul_(20.0)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * noise * p.std())
    for m in (target, draft):
        m.requires_grad_(False)
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = None
    return RandomPair(tokenizer=None, draft=draft, target=target)


def prompts(n: int, length: int = 6, vocab: int = VOCAB, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def target_greedy(target: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = target.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=0,
    )
    return [int(t) for t in out[0, len(prompt) :]]


class ForwardCounter:
    """Counts forward calls and positions fed to a model (a real forward pre-hook)."""

    def __init__(self, model: torch.nn.Module, delay_s: float = 0.0) -> None:
        self.calls: list[int] = []
        self._delay_s = delay_s
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append(int(ids.shape[1]))
        if self._delay_s:
            time.sleep(self._delay_s)  # a slower target, so a cancel lands mid-generation

    def remove(self) -> None:
        self._handle.remove()


CHARS = "abcdefghijklmnopqrstuvwxyz .,;:!?'-()0123456789\n"


def char_tokenizer() -> Any:
    """A character-level fast tokenizer over `CHARS` (one id per character, EOS last)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token=" ")


def text_pair(seed: int = 0, noise: float = 0.3) -> RandomPair:
    """A random pair with a real tokenizer, for the service (prompts are text)."""
    tokenizer = char_tokenizer()
    pair = random_pair(seed=seed, noise=noise, vocab=len(tokenizer))
    pair.tokenizer = tokenizer
    return pair


def wait_connected(stream: Any, limit_s: float = 15.0) -> None:
    """Wait until a DecisionStream has connected (fails the test after `limit_s`)."""
    deadline = time.monotonic() + limit_s
    while not stream.connected:
        assert time.monotonic() < deadline, "decision stream did not connect"
        time.sleep(0.05)


def wait_answering(stream: Any, limit_s: float = 30.0) -> None:
    """Wait until a DecisionStream answers a real Decide message (`connected` can be true
    for a stream that never answers; the stream's stall timeout replaces such a stream)."""
    from speckv_client.errors import PredictorUnavailable
    from speckv_client.types import (
        Compression,
        DecideBatch,
        DraftSignals,
        FeatureRow,
        Objective,
    )

    probe = DecideBatch(
        rows=(FeatureRow("probe", 1, DraftSignals(1.0, 0.5, 2.0, 0.2), Compression.FP16),),
        objective=Objective.TOKENS_PER_STEP,
    )
    deadline = time.monotonic() + limit_s
    while True:
        try:
            stream.decide(probe, timeout_s=1.0)
            return
        except PredictorUnavailable:
            assert time.monotonic() < deadline, "decision stream answered nothing"
            time.sleep(0.05)
