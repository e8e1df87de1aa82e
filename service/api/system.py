"""/v1/info, /healthz, /readyz, /metrics, /openapi.json."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from service.api import VERSION, engine, json_response, state
from service.auth import principal
from service.replies import Health, Info
from service.schemas import ERROR, Reply, Route


async def info(request: web.Request) -> web.Response:
    # The caller's own pools and sessions: other tenants' are not theirs to learn of.
    return json_response({"version": VERSION,
                          **engine(request).info(principal(request).tenant)})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    st = state(request)
    if st.stopping:
        return json_response({"status": "stopping"}, status=503)
    if st.engine is None:
        # The state only: why the engine failed is in the log, for the operator; to anyone
        # else it would tell internal paths and host details.
        return json_response({"status": "failed" if st.start_error else "starting"},
                             status=503)
    ready, reason = st.engine.health()
    if not ready:  # it serves what needs no new container; runs wait for it to recover
        return json_response({"status": "degraded", "reason": reason}, status=503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    # Request ids (OpenMetrics exemplars) are every tenant's, and a client may choose its
    # own: only the operator's scrape may ask for them; any other gets the plain text.
    accept = request.headers.get("Accept", "") if principal(request).operator else ""
    body, content_type = state(request).metrics.render(accept)
    return web.Response(body=body, headers={"Content-Type": content_type,
                                            "X-Content-Type-Options": "nosniff"})


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


OPENAPI = web.AppKey("openapi", dict)
_TAGS = ("system",)
ROUTES = [
    Route("GET", "/v1/info", info, "Version, host capabilities and warnings, pools, sessions",
          replies=(Reply(200, "about this service", Info),
                   Reply(503, "not ready", ERROR)), tags=_TAGS),
    Route("GET", "/healthz", healthz, "The process answers", auth=False,
          replies=(Reply(200, "alive", Health),), tags=_TAGS),
    Route("GET", "/readyz", readyz, "The engine has started and the service accepts runs",
          auth=False, replies=(Reply(200, "ready", Health), Reply(503, "not ready", Health)),
          tags=_TAGS),
    Route("GET", "/metrics", metrics, "Prometheus metrics",
          replies=(Reply(200, "Prometheus text format; for an `operator` token that asks for "
                         "it (Accept), OpenMetrics with request ids as exemplars",
                         content_type="text/plain",
                         streams=("application/openmetrics-text",)),),
          tags=_TAGS),
    Route("GET", "/openapi.json", openapi, "This API as OpenAPI 3",
          replies=(Reply(200, "the document", dict[str, Any]),), tags=_TAGS),
]
