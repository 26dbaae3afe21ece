"""Log output: `text` for people, `structured` for one JSON object per line."""

from __future__ import annotations

import logging
import sys
import time

import msgspec

from lmx_gateway.http.request_context import RequestIdFilter

_json = msgspec.json.Encoder(enc_hook=str)  # odd extras become strings, never a crash
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if entry["event"] != record.getMessage():
            # An `extra={"event": name}` names the event; keep the line too.
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _json.encode(entry).decode()


class TextFormatter(logging.Formatter):
    """`LEVEL: message`, plus the request id when logged during a request."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} request_id={rid}" if rid else line


def setup_logging(level: str, fmt: str, file: str | None = None) -> None:
    handler: logging.Handler = (logging.FileHandler(file) if file
                                else logging.StreamHandler(sys.stderr))
    if fmt == "structured":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
