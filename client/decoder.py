"""Typed sync client for `speckv.v1.DecoderService` (a decode worker).

`generate` yields events as the worker streams them. Closing the iterator (leaving a
`for` loop early, `gen.close()`, garbage collection) cancels the RPC, and the worker
stops that generation.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace

import grpc
from speckv.v1 import decoder_pb2, decoder_pb2_grpc
from speckv_client import convert
from speckv_client.channel import ChannelConfig, TlsConfig, open_channel
from speckv_client.errors import WorkerUnavailable, from_rpc_error
from speckv_client.types import (
    GenerateEvent,
    GenerationSummary,
    ModelSelector,
    Objective,
    TokenChunk,
    WorkerInfo,
)

SERVICE = "speckv.v1.DecoderService"
IDEMPOTENT_METHODS = ("GetInfo",)


class DecoderClient:
    """Client for one decode worker address."""

    def __init__(
        self,
        target: str,
        *,
        tls: TlsConfig | None = None,
        timeout_s: float = 5.0,
        generate_timeout_s: float = 600.0,
        channel_config: ChannelConfig | None = None,
    ) -> None:
        """`timeout_s` bounds GetInfo; `generate_timeout_s` bounds a whole generation."""
        if timeout_s <= 0 or generate_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        config = channel_config or ChannelConfig()
        if tls is not None:
            config = replace(config, tls=tls)
        self.target = target
        self.timeout_s = timeout_s
        self.generate_timeout_s = generate_timeout_s
        self._channel = open_channel(target, config, SERVICE, IDEMPOTENT_METHODS)
        self._stub = decoder_pb2_grpc.DecoderServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DecoderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> WorkerInfo:
        try:
            response = self._stub.GetInfo(decoder_pb2.GetInfoRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, service="worker", target=self.target) from None
        return convert.worker_info_from_pb(response)

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        stop: Sequence[str] = (),
        seed: int = 0,
        policy: str = "",
        request_id: str = "",
        predictor_model: ModelSelector | None = None,
        objective: Objective | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[GenerateEvent]:
        """Stream `TokenChunk`s as the worker decodes, then one `GenerationSummary`.

        `request_id` is the predictor's sticky routing key; a random one is made when
        empty so the caller can find this generation in logs. Zero/empty values mean
        the worker's defaults (DecoderService contract).
        """
        request = convert.generate_request_to_pb(
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            request_id=request_id or uuid.uuid4().hex,
            policy=policy,
            predictor_model=predictor_model,
            objective=objective,
        )
        return self._stream(request, timeout_s or self.generate_timeout_s)

    def _stream(
        self, request: decoder_pb2.GenerateRequest, timeout_s: float
    ) -> Iterator[GenerateEvent]:
        call = self._stub.Generate(request, timeout=timeout_s)
        try:
            for response in call:
                event = convert.generate_event_from_pb(response)
                if event is not None:
                    yield event
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, service="worker", target=self.target) from None
        finally:
            call.cancel()  # no-op after a finished call; stops the worker otherwise

    def generate_text(self, prompt: str, **kwargs: object) -> tuple[str, GenerationSummary]:
        """Run a generation to its end: (the text, the summary)."""
        parts: list[str] = []
        summary: GenerationSummary | None = None
        for event in self.generate(prompt, **kwargs):  # type: ignore[arg-type]
            if isinstance(event, TokenChunk):
                parts.append(event.text)
            else:
                summary = event
        if summary is None:
            raise WorkerUnavailable(f"worker at {self.target} ended the stream without a summary")
        text = summary.text or "".join(parts)
        return text, summary
