"""One inference request's account: opened by the request-context middleware
for every `POST /v1/*`, fed by the Generation as frames arrive, closed when
the last byte is sent. Closing it updates the metrics, publishes
`request_completed` and writes the `Completion request ...` log line.

The per-frame hook (`on_item`) is on the token hot path: it reads the clock
once, adds integers and bumps one bucket of a lock-free histogram;
everything else waits for `finish`."""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

from lmx_gateway.observability.events import EventBus
from lmx_gateway.observability.metrics import GapSeries, Metrics, Outcome
from lmx_protocol import Finished, Tokens

log = logging.getLogger("lmx.requests")

MAX_EVENT_MESSAGE = 300
# http.disconnect.ClientDisconnected's code (observability imports no http module).
CLIENT_DISCONNECTED = "client_disconnected"

current_record: ContextVar[InferenceRecord | None] = ContextVar(
    "lmx_inference_record", default=None)


class InferenceRecord:
    __slots__ = (
        "_client_trusted",
        "_discarded",
        "_events",
        "_inter",
        "_metrics",
        "client",
        "endpoint",
        "error_code",
        "error_message",
        "finished",
        "first_token_at",
        "last_token_at",
        "model",
        "request_id",
        "started",
        "status",
        "stream",
        "tags",
        "tokens",
    )

    def __init__(self, metrics: Metrics, events: EventBus, request_id: str,
                 client: str | None, endpoint: str) -> None:
        self._metrics = metrics
        self._events = events
        self.request_id = request_id
        self.client = client
        self.endpoint = endpoint
        self.started = time.monotonic()
        self.model: str | None = None
        self.stream = False
        self.status = 200
        self.error_code: str | None = None
        self.error_message: str | None = None
        self.finished: Finished | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.tokens = 0
        # Who the client says the request is for (OpenAI's user, metadata...).
        self.tags: dict[str, Any] = {}
        self._inter: GapSeries | None = None
        # The X-Client-ID is only believed once auth has let the request in;
        # a request auth refuses is not counted at all (discard), so keyless
        # junk cannot fill the per-client series or the error counters.
        self._client_trusted = False
        self._discarded = False

    def trust_client(self) -> None:
        """Auth let the request in: its X-Client-ID may label the metrics."""
        self._client_trusted = True

    def discard(self) -> None:
        """Auth refused the request: it leaves no metrics, event or log line."""
        self._discarded = True

    # --- fed by the generation ----------------------------------------------------

    def bind(self, model_id: str) -> None:
        """The request now runs on `model_id` (called when its Generation starts)."""
        if self.model is None:
            self._metrics.active_requests += 1
            self._metrics.activity.set()
        self.model = model_id
        self._inter = self._metrics.inter_token.child(model_id)

    def on_item(self, item: Tokens | Finished) -> None:
        now = time.monotonic()
        if isinstance(item, Tokens):
            last = self.last_token_at
            if last is None:
                self.first_token_at = now
            elif self._inter is not None:
                self._inter.observe(now - last)
            self.last_token_at = now
            n = len(item.token_ids)
            self.tokens += n
            self._metrics.tokens_generated += n
            return
        self.finished = item
        if self.first_token_at is None:
            self.first_token_at = now
        # Tokens the worker counted but did not stream one by one.
        extra = item.completion_tokens - self.tokens
        if extra > 0:
            self._metrics.tokens_generated += extra

    def on_error(self, code: str, message: str) -> None:
        if self.error_code is None:
            self.error_code, self.error_message = code, message[:MAX_EVENT_MESSAGE]

    # --- closed by the middleware -----------------------------------------------

    def outcome_status(self) -> str:
        if self.error_code == CLIENT_DISCONNECTED:
            return "cancelled"  # a whole answer whose client left before it was ready
        if self.status >= 400 or self.error_code is not None:
            return "error"
        if self.model is not None and self.finished is None:
            return "cancelled"  # the client left before the end
        return "ok"

    def finish(self) -> None:
        end = time.monotonic()
        if self.model is not None:
            self._metrics.active_requests -= 1
        if self._discarded:
            return
        client = self.client if self._client_trusted else None
        status = self.outcome_status()
        fin = self.finished
        prompt = fin.prompt_tokens if fin else 0
        completion = fin.completion_tokens if fin else self.tokens
        duration = end - self.started
        ttft = (self.first_token_at - self.started) if self.first_token_at is not None else None
        # Decode speed: tokens after the first over the time they took.
        speed = 0.0
        if (completion > 1 and self.first_token_at is not None and self.last_token_at
                and self.last_token_at > self.first_token_at):
            speed = (completion - 1) / (self.last_token_at - self.first_token_at)
        elif completion and duration > 0:
            speed = completion / duration
        self._metrics.record(Outcome(
            model=self.model, client=self._metrics.client_label(client),
            stream=self.stream, error=status == "error", duration_sec=duration,
            ttft_sec=ttft, prompt_tokens=prompt, completion_tokens=completion))
        if ttft is not None and self.model is not None:
            self._metrics.ttft.labels(self.model).observe(ttft)
        data: dict[str, Any] = {
            "request_id": self.request_id, "endpoint": self.endpoint, "model": self.model,
            "status": status, "http_status": self.status, "stream": self.stream,
            "prompt_tokens": prompt, "completion_tokens": completion,
            "finish_reason": str(fin.finish_reason) if fin else None,
            "tokens_per_second": round(speed, 2),
            "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None,
            "duration_ms": round(duration * 1000, 1),
        }
        if client is not None:
            data["client"] = client
        data.update(self.tags)
        if status == "error":
            data["error"] = {"code": self.error_code, "message": self.error_message}
        self._events.publish("request_completed", data)
        fields = {"event": "request_completed", **data}
        # The client (a named key's name, else X-Client-ID) in text logs too.
        who = f" client={self.client}" if self.client is not None else ""
        if status == "error":
            log.warning("Completion request failed model=%s status=%d code=%s duration=%.2fs%s",
                        self.model, self.status, self.error_code, duration, who, extra=fields)
        else:
            log.info("Completion request model=%s tokens=%d speed=%.1ftok/s ttft=%s "
                     "duration=%.2fs%s%s", self.model, completion, speed,
                     f"{ttft * 1000:.0f}ms" if ttft is not None else "-", duration,
                     " (cancelled)" if status == "cancelled" else "", who, extra=fields)
