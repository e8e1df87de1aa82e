"""The aiohttp application: routes from the api modules, middlewares (errors, what only a
browser sends, auth), the engine's lifecycle, and metrics read from the engine at scrape
time."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable

from aiohttp import WSCloseCode, web

from sandbox import Engine, full_network_problem, parse_ip, prepare_state_dir, split_host
from service import logs
from service.admission import Admission
from service.api import (
    STATE,
    VERSION,
    State,
    batches,
    build,
    containers,
    files,
    gojudge,
    gojudge_ws,
    images,
    jobs,
    runs,
    system,
)
from service.auth import PRINCIPAL, Principal, Tokens, auth_middleware
from service.cluster import NODE_HEADER, Forwarder, cluster_middleware
from service.config import ServiceConfig
from service.errors import ApiError, Handler, error_middleware
from service.idletrim import IdleTrim
from service.jobs.runner import JOBS, Jobs
from service.metrics import Gauge, Labels
from service.schemas import Route, openapi

log = logging.getLogger("sandboxd.service")
access = logging.getLogger("sandboxd.access")

EngineFactory = Callable[[], Awaitable[Engine]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
START_TASK = web.AppKey("start_task", asyncio.Task)
REQUEST_ID = web.RequestKey("request_id", str)
# After the deadline: for cancelled requests to end (aiohttp's own timeout is this later).
SHUTDOWN_GRACE_S = 5.0


def routes() -> list[Route]:
    return [*runs.ROUTES, *batches.ROUTES, *containers.ROUTES, *files.ROUTES,
            *images.ROUTES, *build.ROUTES, *system.ROUTES, *gojudge.ROUTES,
            *gojudge_ws.ROUTES, *jobs.ROUTES]


def create_app(engine: Engine | EngineFactory, config: ServiceConfig) -> web.Application:
    """The service over `engine`, or over the engine `engine()` starts in the background
    (the service answers /healthz and /readyz meanwhile)."""
    table = routes()
    tokens = Tokens(config)
    open_paths = frozenset(r.path for r in table if not r.auth)
    forwarder = Forwarder(config)
    # A request for another node's session or job is forwarded once its token is known
    # good: the owner checks it again, and the tenancy.
    app = web.Application(
        client_max_size=config.limits.json_body_bytes,
        middlewares=[request_middleware(config.log_format == "json"), handlers_middleware,
                     error_middleware, browser_middleware(config),
                     auth_middleware(tokens, open_paths), documented_methods_middleware(table),
                     cluster_middleware(forwarder)])
    st = State(config=config, tokens=tokens,
               admission=Admission(config.limits.max_running, config.limits.max_queued))
    app[STATE] = st
    app[JOBS] = job_runner = Jobs(st)
    if config.cluster.node is not None:
        st.metrics.gauges.append(forwarder.metric())
    app[system.OPENAPI] = openapi(table, VERSION)
    jobs.narrow_document(app[system.OPENAPI], config.jobs.callback_hosts)
    gojudge.narrow_document(app[system.OPENAPI], config)
    for r in table:
        app.router.add_route(r.method, r.path, r.handler)
    _gauges(st)

    node = config.cluster.node

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        request_id = request.get(REQUEST_ID)
        st.metrics.observe_request(response.status, request_id)
        # Here, not in the middleware: a stream's or a WebSocket's headers are sent before
        # its handler returns.
        if request_id is not None:
            response.headers[logs.HEADER] = request_id
        if node is not None:  # a forwarded answer keeps its owner's
            response.headers.setdefault(NODE_HEADER, node)

    app.on_response_prepare.append(count)
    # The allocator's free memory back to the system once no request is in flight (the
    # soak's RSS creep was free memory in glibc's heap: docs/reliability.md).
    trim = IdleTrim(lambda: bool(st.handlers))
    app.on_response_prepare.append(trim.note)
    app.on_startup.append(trim.start)
    app.on_cleanup.append(trim.close)

    async def start(app: web.Application) -> None:
        if isinstance(engine, Engine):
            st.engine = engine
            return

        async def starting() -> None:
            try:
                st.engine = await engine()
                # What startup made lives as long as the service: frozen, a full collection
                # no longer walks it (one over its ~50,000 objects stalled every run in
                # flight for 20-30 ms, measured).
                gc.freeze()
            except Exception as e:
                st.start_error = str(e) or type(e).__name__
                log.error("the engine failed to start: %s", st.start_error,
                          exc_info=not isinstance(e, OSError))
        app[START_TASK] = asyncio.ensure_future(starting())

    async def shutdown(app: web.Application) -> None:
        st.stopping = True
        st.admission.closed = True
        for ws in list(st.websockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"sandboxd is shutting down")
        # Requests get the deadline, then are cancelled here (a cancelled run is killed),
        # before aiohttp's own shutdown, whose timeout is longer: a handler that ended just
        # as aiohttp's timeout expired tripped its race (InvalidStateError on the waiter
        # of the handler, logged with a traceback).
        if st.handlers:
            _, late = await asyncio.wait(set(st.handlers), timeout=config.shutdown_deadline_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=SHUTDOWN_GRACE_S)

    async def cleanup(app: web.Application) -> None:
        task = app.get(START_TASK)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if st.engine is not None:
            await st.engine.close()
            st.engine = None

    # Jobs start before the engine (queued ones wait for it) and stop first: none starts
    # any more and their event streams end rather than wait out the deadline, which running
    # jobs get as requests do.
    app.on_startup.append(forwarder.start)
    app.on_startup.append(job_runner.start)
    app.on_startup.append(start)
    app.on_shutdown.append(job_runner.close)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(job_runner.cleanup)
    app.on_cleanup.append(cleanup)
    app.on_cleanup.append(forwarder.close)
    return app


def request_middleware(access_log: bool) -> Middleware:
    """The request's id (the client's X-Request-Id if it is a fair one, else a new one) on
    its log lines, results and response; with `access_log`, a line per request when it
    ends (off in the text log, as it always was: a line per run costs the warm path)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request[REQUEST_ID] = logs.request_id_of(request.headers.get(logs.HEADER))
        with logs.scope(request_id, lambda: _tenant(request)):
            if not access_log:
                return await handler(request)
            started, status = time.monotonic(), 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as e:
                status = e.status
                raise
            finally:
                duration_ms = round((time.monotonic() - started) * 1000, 3)
                access.info("%s %s %d %.1f ms", request.method, request.path, status,
                            duration_ms, extra={"method": request.method,
                                                "path": request.path, "status": status,
                                                "duration_ms": duration_ms})
    return middleware


def _tenant(request: web.Request) -> str | None:
    """The token's name (its tenant), "anonymous" without tokens or on an open path, None
    before authentication."""
    who = request.get(PRINCIPAL)
    return who.name if isinstance(who, Principal) else None


@web.middleware
async def handlers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request being served is known (State.handlers), for the shutdown's deadline."""
    handlers = request.app[STATE].handlers
    task = asyncio.current_task()
    assert task is not None  # aiohttp serves each request in a task of its own
    handlers.add(task)
    try:
        return await handler(request)
    finally:
        handlers.discard(task)


def documented_methods_middleware(table: list[Route]) -> Middleware:
    """A path the document has as it is (`/v1/images/gc`) takes the methods it lists there
    only, though a templated route (`/v1/images/{ref}`) matches it too: any other method is
    a 405 whose Allow header is what the document lists (aiohttp's would add the templated
    route's methods)."""
    methods: dict[str, set[str]] = {}
    for r in table:
        if "{" not in r.path:
            methods.setdefault(r.path, set()).add(r.method)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        allowed = methods.get(request.path)
        if allowed is not None and request.method not in allowed:
            raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
        return await handler(request)
    return middleware


def browser_middleware(config: ServiceConfig) -> Middleware:
    """Refuses what only a web page would send: a Host this service is not reached by (a
    DNS name rebound to it) and a cross-origin Origin (a page's fetch, form or WebSocket).
    Without tokens a page's requests would otherwise run code as any local caller."""
    # Peers forward requests under the name they reach this node by.
    names = {"localhost", *config.allowed_hosts, *config.cluster.own_hosts(),
             config.host.lower().strip("[]").rstrip(".")}

    @functools.lru_cache(maxsize=64)  # a service is called by a handful of names
    def allowed(hostport: str) -> bool:
        try:
            name = split_host(hostport.strip().lower())[0].rstrip(".")
        except ValueError:
            return False
        # An IP address cannot be rebound: only a name resolves to another host later.
        return name in names or parse_ip(name) is not None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is not None and not allowed(host):
            raise ApiError(403, "forbidden", f"Host {host[:200]!r} is not a name of this service; "
                           "use its address or localhost, or add the name to "
                           "server.allowed_hosts")
        origin = request.headers.get("Origin")
        if origin is not None and (host is None or _origin_hostport(origin) != host.lower()):
            raise ApiError(403, "forbidden", f"cross-origin requests from {origin[:200]!r} are "
                           "refused (web pages may not use this API); call it from a program, "
                           "which sends no Origin header")
        return await handler(request)
    return middleware


def _origin_hostport(origin: str) -> str | None:
    scheme, sep, hostport = origin.strip().lower().partition("://")
    return hostport if sep and scheme in ("http", "https") and "/" not in hostport else None


def _gauges(st: State) -> None:
    def pools() -> list[dict[str, object]]:
        return st.engine.pool_stats() if st.engine is not None else []

    def idle() -> list[tuple[Labels, float]]:
        # Per policy, never per image: any token may scrape, and image digests would tell
        # it what other tenants run.
        by_policy: dict[str, float] = {}
        for p in pools():
            by_policy[str(p["policy"])] = by_policy.get(str(p["policy"]), 0.0) + float(
                p["idle"])  # type: ignore[arg-type]
        return [((("policy", policy),), n) for policy, n in sorted(by_policy.items())]

    def total(key: str) -> Callable[[], list[tuple[Labels, float]]]:
        return lambda: [((), float(sum(p[key] for p in pools())))]  # type: ignore[misc]

    def live() -> list[tuple[Labels, float]]:
        return [((), float(st.engine.live_containers if st.engine is not None else 0))]

    st.metrics.gauges += [
        Gauge("sandboxd_pool_idle", "Warm containers waiting, per policy.", idle),
        Gauge("sandboxd_pool_hits_total", "Runs that took a warm container.", total("hits"),
              "counter"),
        Gauge("sandboxd_pool_misses_total", "Runs that had to start a container.",
              total("misses"), "counter"),
        Gauge("sandboxd_live_containers", "Containers alive: pools, runs and sessions.", live),
        Gauge("sandboxd_spawner_deaths_total", "Times the spawner process died (and was "
              "started again): each took every container with it.",
              lambda: [((), float(st.engine.runtime.spawner.generation if st.engine else 0))],
              "counter"),
        Gauge("sandboxd_sessions", "Containers kept by callers (sessions).",
              lambda: [((), float(len(st.engine.sessions) if st.engine else 0))]),
        Gauge("sandboxd_runs_running", "Runs executing now.",
              lambda: [((), float(st.admission.running))]),
        Gauge("sandboxd_runs_queued", "Runs waiting for a slot.",
              lambda: [((), float(st.admission.waiting))]),
    ]


async def serve(config: ServiceConfig) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully: stop accepting, let runs
    finish within the deadline (then kill them), close the engine. 1 if the engine failed."""
    prepare_state_dir(config.state_dir)

    async def factory() -> Engine:
        engine = await Engine.start(config.engine_config())
        if config.network.full and (problem := full_network_problem()) is not None:
            log.warning("[network] full is on, but its runs will fail: %s", problem)
        return engine

    app = create_app(factory, config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=config.shutdown_deadline_s + SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        if not config.tokens:
            log.warning("no API tokens are configured: sandboxd listens on loopback only, and "
                        "anyone on this machine can run code through it; configure [[tokens]] "
                        "or SANDBOXD_TOKENS to require a token")
        log.info("sandboxd %s listening on http://%s:%d (state in %s)", VERSION,
                 f"[{host}]" if ":" in host else host, port, config.state_dir)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({stopping, app[START_TASK]}, return_when=asyncio.FIRST_COMPLETED)
        st = app[STATE]
        if st.start_error is not None:
            stopping.cancel()
            return 1
        if not stopping.done():
            log.info("the engine is ready")
            await stopping
        log.info("shutting down: no new connections; runs get %.0f s to finish",
                 config.shutdown_deadline_s)
    finally:
        await runner.cleanup()
    log.info("sandboxd stopped")
    return 0
