"""The JSON error body every 4xx and 5xx carries, how sandbox errors map onto HTTP, and the
middleware that guarantees no traceback ever reaches a client."""

from __future__ import annotations

import contextlib
import errno
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
from aiohttp import web

from sandbox import (
    AtQuota,
    AuthError,
    Busy,
    CapacityError,
    CgroupError,
    ContainerGoneError,
    DigestMismatch,
    Forbidden,
    ImageError,
    ImageInUse,
    InvalidReference,
    LayerError,
    ManifestError,
    NotFound,
    PolicyError,
    QuotaExceeded,
    RegistryError,
    RuntimeRestarting,
    RuntimeSetupError,
    SandboxError,
    StoreFull,
)

log = logging.getLogger("sandboxd.service")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# "limits.cpu_ms: 9 is above ..." -> "limits.cpu_ms": sandbox messages lead with the field.
_LEADING_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*):\s")


class ApiError(Exception):
    """An error the API reports as it is: status, snake_case code, message, field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    @property
    def passing(self) -> bool:
        """The service cannot take the request now and the same request succeeds a moment
        later (no run slot free, the runtime restarting): a batch's case or a job waits
        and asks again instead of failing."""
        return self.code in _PASSING

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=orjson.dumps(self.body()),
                            content_type="application/json", headers=self.headers)


_PASSING = frozenset(("over_capacity", "runtime_restarting"))


def bad_request(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request", message, field)


def too_large(what: str, cap: int, setting: str, size: int | None = None) -> ApiError:
    amount = f"{size} bytes" if size is not None else f"over {cap} bytes"
    return ApiError(413, "body_too_large", f"{what} is too large: {amount}; the limit is "
                    f"{cap} bytes ({setting})")


def _field_of(message: str, default: str | None) -> str | None:
    m = _LEADING_FIELD.match(message)
    return m.group(1) if m else default


def from_sandbox(exc: SandboxError, field: str | None = None) -> ApiError:
    """The HTTP form of an error the sandbox layer raised on purpose."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, StoreFull):  # no Retry-After: waiting frees nothing, deleting does
        log.warning("%s", exc.detail)
        return ApiError(507, "store_full", msg)
    if isinstance(exc, PolicyError):
        return ApiError(400, "invalid_request", msg, _field_of(msg, field))
    if isinstance(exc, InvalidReference):
        return ApiError(400, "invalid_reference", msg, field)
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", msg, field)
    if isinstance(exc, Forbidden):
        return ApiError(403, "forbidden", msg, _field_of(msg, field))
    if isinstance(exc, QuotaExceeded):
        return ApiError(413, "quota_exceeded", msg, field)
    if isinstance(exc, AuthError):
        return ApiError(502, "registry_auth_failed", f"the registry refused access: {msg}",
                        field)
    if isinstance(exc, RegistryError):
        return ApiError(502, "registry_error", f"the registry failed: {msg}", field)
    if isinstance(exc, ManifestError | DigestMismatch | LayerError):
        return ApiError(502, "bad_upstream_content",
                        f"the registry served unusable content: {msg}", field)
    if isinstance(exc, ImageInUse | Busy):
        return ApiError(409, "conflict", msg, field)
    if isinstance(exc, ImageError):
        return ApiError(400, "image_error", msg, _field_of(msg, field))
    if isinstance(exc, RuntimeRestarting):  # the same request succeeds once it is back
        return ApiError(503, "runtime_restarting", msg,
                        headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, ContainerGoneError):
        # Its init was killed (from outside the sandbox, or by the host's OOM killer): not
        # the request's fault nor a bug, and the same request runs in the container that
        # takes its place.
        return ApiError(503, "container_lost", msg, headers={"Retry-After": "1"})
    if isinstance(exc, RuntimeSetupError | CgroupError):
        return ApiError(500, "runtime_error", f"the sandbox runtime failed: {msg}")
    if isinstance(exc, ValueError):  # configuration errors (e.g. registries) from a request
        return ApiError(400, "invalid_request", msg, _field_of(msg, field))
    if isinstance(exc, AtQuota):  # no Retry-After: the count drops only when it deletes
        return ApiError(429, "quota_exceeded", msg, field)
    if isinstance(exc, CapacityError):
        return ApiError(429, "over_capacity", msg, headers={"Retry-After": "1"})
    return ApiError(500, "sandbox_error", msg)


@contextlib.contextmanager
def blame(field: str) -> Iterator[None]:
    """Sandbox errors raised inside are reported against `field` of the request."""
    try:
        yield
    except SandboxError as e:
        raise from_sandbox(e, field) from e


def _out_of_descriptors(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it, is an open that found no descriptor free."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of causes is short; a loop of them is not followed
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def to_api_error(exc: BaseException) -> ApiError:
    """Any exception as an ApiError; unexpected ones are logged and stay generic."""
    if isinstance(exc, ApiError):
        return exc
    if _out_of_descriptors(exc):
        # Capacity, not a fault: every warm container and run holds descriptors, and they
        # come back as runs end. The operator's log says which limit.
        log.warning("out of file descriptors: %s; raise the service's limit on open files "
                    "(LimitNOFILE= in its unit, or ulimit -n), or keep fewer warm "
                    "containers ([pools] max_idle)", exc)
        return ApiError(503, "over_capacity", "the service has no file descriptors free "
                        "for this request; retry shortly", headers={"Retry-After": "1"})
    if isinstance(exc, SandboxError):
        api = from_sandbox(exc)
        if api.status >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        return api
    if isinstance(exc, web.HTTPException):
        return _from_http(exc)
    log.error("internal error", exc_info=exc)
    return ApiError(500, "internal_error", "an internal error occurred; it was logged on the "
                    "server. Report it with the time of the request")


_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type",
               429: "over_capacity", 503: "unavailable"}


def _from_http(exc: web.HTTPException) -> ApiError:
    status = exc.status
    if status == 413:
        message = f"the request body is too large: {exc.text or ''}".rstrip(": ")
    elif status == 404:
        message = "no such endpoint; see /openapi.json for the API"
    elif status == 405:
        message = "this method is not allowed here; see /openapi.json for the API"
    else:
        message = exc.reason
    code = _HTTP_CODES.get(status, "internal_error" if status >= 500 else "invalid_request")
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return ApiError(status, code, message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _from_http(e).response()
    except Exception as e:
        api = to_api_error(e)
        if api.status >= 500 and isinstance(e, ApiError):
            log.error("%s %s -> %d %s", request.method, request.path, api.status, api.message)
        return api.response()
