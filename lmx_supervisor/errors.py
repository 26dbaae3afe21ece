"""Every failure LMX reports to a client, with its HTTP status and the
runbook's error code. The supervisor raises these; the gateway renders them
in OpenAI's error shape. One table, so a code means one thing everywhere."""

from __future__ import annotations


class LMXError(Exception):
    status = 500
    code = "internal_error"
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code


class BadRequest(LMXError):
    status = 400
    code = "invalid_value"
    type = "invalid_request_error"


class ModelNotFound(LMXError):
    status = 404
    code = "model-not-found"
    type = "invalid_request_error"


class RequestTooLarge(LMXError):
    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class NoModelLoaded(LMXError):
    status = 503
    code = "no-model-loaded"


class ModelUnavailable(LMXError):
    """The model exists but cannot take this request now (stopping, restarting
    past the wait budget, quarantined)."""

    status = 503
    code = "model_unavailable"


class WorkerCrashed(LMXError):
    """The worker serving the request died before the response completed."""

    status = 503
    code = "worker_crashed"


class RateLimited(LMXError):
    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"


class InferenceTimeout(LMXError):
    status = 504
    code = "lmx-timeout"
    type = "timeout_error"


class LoadConflict(LMXError):
    """Load refused or failed: quarantined, loader crashed, load timeout,
    canary failed (runbook §3.1)."""

    status = 409
    code = "model_loader_crashed"
    type = "invalid_request_error"


class UnsupportedModel(LMXError):
    status = 422
    code = "model_unsupported_backend"
    type = "invalid_request_error"


class WorkerError(LMXError):
    """The worker refused or failed one request but is itself fine."""

    status = 500
    code = "worker_internal_error"


class InsufficientMemory(LMXError):
    """A load the memory guard refuses: the model's estimate does not fit
    under memory.max_memory_percent, even after any eviction allowed."""

    status = 507
    code = "insufficient_memory"


class InsufficientStorage(LMXError):
    """Not enough free disk for a download (checked before any byte is written)."""

    status = 507
    code = "storage-full"


class HubUnavailable(LMXError):
    """The model hub (HF_ENDPOINT) could not be reached or answered with an error."""

    status = 502
    code = "hub_unreachable"


class NotFound(LMXError):
    """A resource other than a model (e.g. a download id) does not exist."""

    status = 404
    code = "not_found"
    type = "invalid_request_error"


class Conflict(LMXError):
    """The request conflicts with the resource's current state (e.g. cancelling
    a download that already ended)."""

    status = 409
    code = "conflict"
    type = "invalid_request_error"


class WorkerUnresponsive(LMXError):
    """The worker serving the request stopped answering its heartbeat (or made
    no progress for too long); it is killed and restarted."""

    status = 503
    code = "worker_unresponsive"


class RequestQuarantined(LMXError):
    """This exact request was in flight at two crashes of the model's worker:
    it is refused for a while instead of being allowed to crash it again."""

    status = 422
    code = "request_quarantined"
    type = "invalid_request_error"


class QueueFull(LMXError):
    """Too many requests already wait for this model (models.max_queued_requests)."""

    status = 429
    code = "queue_full"
    type = "rate_limit_error"


class Forbidden(LMXError):
    """The operation is not allowed (e.g. a load path outside the allowed dirs)."""

    status = 403
    code = "forbidden"
    type = "invalid_request_error"
