"""The service's log: text lines (the default) or one JSON object per line, and the request
id that follows a request through every line it logs, its results and the node it is
forwarded to.

A request's id and tenant live in a context variable: aiohttp serves each request in a task
of its own, and a task copies the context it was created in, so whatever a request starts
(a batch's cases, a streamed run's pump) logs under its id too. A job runs long after its
request, in a worker task: the runner sets the id it was submitted with (`scope`)."""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

import orjson

HEADER = "X-Request-Id"
# What a client's own id may be: enough for a UUID, a trace id or "svc:job-42.3", nothing
# a log reader or a header could be fooled by (no spaces, quotes, CR or LF, nothing beyond
# ASCII). Anything else is replaced, never echoed.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class Scope:
    """Who a log line is for: the request's id and, once its token is known, its tenant
    (read when a line is logged: the id is set before authentication)."""

    request_id: str
    tenant: Callable[[], str | None] = lambda: None


_scope: ContextVar[Scope | None] = ContextVar("sandboxd_scope", default=None)


def request_id_of(header: str | None) -> str:
    """The client's id when it is 1-128 of [A-Za-z0-9._:-], else a new one."""
    if header is not None and _CLIENT_ID.fullmatch(header):
        return header
    return secrets.token_hex(16)


def current_request_id() -> str | None:
    """The id of the request (or job) this code runs for; None outside any."""
    scope = _scope.get()
    return None if scope is None else scope.request_id


@contextlib.contextmanager
def scope(request_id: str, tenant: Callable[[], str | None] = lambda: None) -> Iterator[None]:
    """Log lines and results within are this request's."""
    token = _scope.set(Scope(request_id, tenant))
    try:
        yield
    finally:
        _scope.reset(token)


# A LogRecord's own attributes; any other was passed in `extra` and becomes a field.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601), level, logger,
    message, request_id and tenant within a request, the record's `extra` fields (the
    access log's method, path, status, duration_ms), and a traceback as one `exception`
    string, never lines of its own."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        current = _scope.get()
        if current is not None:
            out["request_id"] = current.request_id
            if (tenant := current.tenant()) is not None:
                out["tenant"] = tenant
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


def configure(log_format: str) -> None:
    """The process's log on stderr, as `text` (the format it always had) or `json`. In
    JSON, Python's warnings and an exception nothing caught are records too, not lines of
    their own (the spawner, a process of its own, still prints a crash's traceback)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if log_format == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    logging.getLogger("sandboxd").critical("sandboxd failed: %s", exc or kind.__name__,
                                           exc_info=(kind, exc, tb))
