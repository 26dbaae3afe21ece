"""Every failure LMX reports to a client: a stable error code
and a kind that says what sort of failure it is. The supervisor raises these
and speaks no HTTP; the gateway maps each kind to a status and renders the
error in the dialect of the route. One table, so a code means one thing
everywhere."""

from __future__ import annotations

import enum


class ErrorKind(enum.StrEnum):
    INVALID = "invalid"  # the request itself is wrong
    FORBIDDEN = "forbidden"  # not allowed for anyone (e.g. a path outside the allowed dirs)
    NOT_FOUND = "not_found"  # what it names does not exist
    TOO_LARGE = "too_large"  # the request is bigger than allowed
    MEDIA_TYPE = "media_type"  # the body is not in the format the route takes
    CONFLICT = "conflict"  # the current state does not allow it (or a load failed)
    UNSUPPORTED = "unsupported"  # a model this runtime cannot serve
    BUSY = "busy"  # try again later: a bound was reached
    UNAVAILABLE = "unavailable"  # the model cannot serve now
    NODE_UNREACHABLE = "node_unreachable"  # the host the model runs on stopped answering
    TIMEOUT = "timeout"  # a deadline passed
    NO_RESOURCES = "no_resources"  # not enough memory or disk
    UPSTREAM = "upstream"  # a service LMX depends on failed (the model hub)
    INTERNAL = "internal"  # a fault of LMX or of a worker


class LMXError(Exception):
    kind = ErrorKind.INTERNAL
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_sec: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # When the same request may succeed again (BUSY, UNAVAILABLE).
        self.retry_after_sec = retry_after_sec
        if code is not None:
            self.code = code


class BadRequest(LMXError):
    kind = ErrorKind.INVALID
    code = "invalid_value"


class UnsupportedMediaType(LMXError):
    kind = ErrorKind.MEDIA_TYPE
    code = "unsupported_media_type"


class ModelNotFound(LMXError):
    kind = ErrorKind.NOT_FOUND
    code = "model-not-found"


class RequestTooLarge(LMXError):
    kind = ErrorKind.TOO_LARGE
    code = "request_too_large"


class NoModelLoaded(LMXError):
    kind = ErrorKind.UNAVAILABLE
    code = "no-model-loaded"


class ModelUnavailable(LMXError):
    """The model exists but cannot take this request now (stopping, restarting
    past the wait budget, quarantined)."""

    kind = ErrorKind.UNAVAILABLE
    code = "model_unavailable"


class NodeUnreachable(LMXError):
    """The node the model's worker runs on missed its heartbeats (agent
    killed, host down, network cut): the request ends at once."""

    kind = ErrorKind.NODE_UNREACHABLE
    code = "node_unreachable"


class WorkerCrashed(LMXError):
    """The worker serving the request died before the response completed."""

    kind = ErrorKind.UNAVAILABLE
    code = "worker_crashed"


class RateLimited(LMXError):
    kind = ErrorKind.BUSY
    code = "rate_limit_exceeded"


class InferenceTimeout(LMXError):
    kind = ErrorKind.TIMEOUT
    code = "lmx-timeout"


class LoadFailed(LMXError):
    """A worker could not be brought up: the loader crashed, the load timed
    out, the warm-up canary failed, or the worker speaks another protocol."""

    kind = ErrorKind.CONFLICT
    code = "model_loader_crashed"


class UnsupportedModel(LMXError):
    kind = ErrorKind.UNSUPPORTED
    code = "model_unsupported_backend"


class WorkerError(LMXError):
    """The worker refused or failed one request but is itself fine."""

    kind = ErrorKind.INTERNAL
    code = "worker_internal_error"


class InsufficientMemory(LMXError):
    """A load the memory guard refuses: the model's estimate does not fit
    under memory.max_memory_percent, even after any eviction allowed."""

    kind = ErrorKind.NO_RESOURCES
    code = "insufficient_memory"


class InsufficientStorage(LMXError):
    """Not enough free disk for a download (checked before any byte is written)."""

    kind = ErrorKind.NO_RESOURCES
    code = "storage-full"


class HubUnavailable(LMXError):
    """The model hub (HF_ENDPOINT) could not be reached or answered with an error."""

    kind = ErrorKind.UPSTREAM
    code = "hub_unreachable"


class NotFound(LMXError):
    """A resource other than a model (e.g. a download id) does not exist."""

    kind = ErrorKind.NOT_FOUND
    code = "not_found"


class Conflict(LMXError):
    """The request conflicts with the current state: a model that is loaded
    (so not deletable), quarantined, incomplete on disk, an id already in
    use, a download that already ended."""

    kind = ErrorKind.CONFLICT
    code = "conflict"


class InvalidModelFile(LMXError):
    """A model file that cannot be read as what it claims to be: a truncated
    or corrupt GGUF, a forged header, an unreadable config (422)."""

    kind = ErrorKind.UNSUPPORTED
    code = "invalid_model_file"


class WorkerUnresponsive(LMXError):
    """The worker serving the request stopped answering its heartbeat (or made
    no progress for too long); it is killed and restarted."""

    kind = ErrorKind.UNAVAILABLE
    code = "worker_unresponsive"


class RequestQuarantined(LMXError):
    """This exact request was in flight at two crashes of the model's worker:
    it is refused for a while instead of being allowed to crash it again."""

    kind = ErrorKind.UNSUPPORTED
    code = "request_quarantined"


class QueueFull(LMXError):
    """Too many requests already wait for this model (models.max_queued_requests)."""

    kind = ErrorKind.BUSY
    code = "queue_full"


class Forbidden(LMXError):
    """The operation is not allowed (e.g. a load path outside the allowed dirs)."""

    kind = ErrorKind.FORBIDDEN
    code = "forbidden"
