"""The aiohttp application: routes from the api modules, middlewares (errors, auth,
readiness), the engine's lifecycle, and metrics read from the engine at scrape time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import WSCloseCode, web

from sandbox.engine import Engine
from service.api import STATE, VERSION, State, containers, images, runs, system
from service.auth import Admission, Tokens, auth_middleware
from service.config import ServiceConfig
from service.errors import error_middleware
from service.metrics import Gauge, Labels
from service.schemas import Route, openapi

log = logging.getLogger("sandboxd.service")

EngineFactory = Callable[[], Awaitable[Engine]]
START_TASK = web.AppKey("start_task", asyncio.Task)


def routes() -> list[Route]:
    return [*runs.ROUTES, *containers.ROUTES, *images.ROUTES, *system.ROUTES]


def create_app(engine: Engine | EngineFactory, config: ServiceConfig) -> web.Application:
    """The service over `engine`, or over the engine `engine()` starts in the background
    (the service answers /healthz and /readyz meanwhile)."""
    table = routes()
    tokens = Tokens(config.tokens)
    open_paths = frozenset(r.path for r in table if not r.auth)
    app = web.Application(
        client_max_size=config.limits.json_body_bytes,
        middlewares=[error_middleware, auth_middleware(tokens, open_paths)])
    st = State(config=config, tokens=tokens,
               admission=Admission(config.limits.max_running, config.limits.max_queued))
    app[STATE] = st
    app[system.OPENAPI] = openapi(table, VERSION)
    for r in table:
        app.router.add_route(r.method, r.path, r.handler)
    _gauges(st)

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        st.metrics.requests.inc(status=str(response.status))

    app.on_response_prepare.append(count)

    async def start(app: web.Application) -> None:
        if isinstance(engine, Engine):
            st.engine = engine
            return

        async def starting() -> None:
            try:
                st.engine = await engine()
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

    async def cleanup(app: web.Application) -> None:
        task = app.get(START_TASK)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if st.engine is not None:
            await st.engine.close()
            st.engine = None

    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    return app


def _gauges(st: State) -> None:
    def pools() -> list[dict[str, object]]:
        return st.engine.pools.stats() if st.engine is not None else []

    def idle() -> list[tuple[Labels, float]]:
        return [((("image", str(p["image"])), ("policy", str(p["policy"]))),
                 float(p["idle"])) for p in pools()]  # type: ignore[arg-type]

    def total(key: str) -> Callable[[], list[tuple[Labels, float]]]:
        return lambda: [((), float(sum(p[key] for p in pools())))]  # type: ignore[misc]

    def live() -> list[tuple[Labels, float]]:
        return [((), float(st.engine.pools.live if st.engine is not None else 0))]

    st.metrics.gauges += [
        Gauge("sandboxd_pool_idle", "Warm containers waiting, per image and policy.", idle),
        Gauge("sandboxd_pool_hits_total", "Runs that took a warm container.", total("hits"),
              "counter"),
        Gauge("sandboxd_pool_misses_total", "Runs that had to start a container.",
              total("misses"), "counter"),
        Gauge("sandboxd_live_containers", "Containers alive: pools, runs and sessions.", live),
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
    config.state_dir.mkdir(parents=True, exist_ok=True)

    async def factory() -> Engine:
        return await Engine.start(config.engine_config())

    app = create_app(factory, config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=config.shutdown_deadline_s)
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
