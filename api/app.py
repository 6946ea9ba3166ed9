"""The FastAPI application: `create_app()` is the uvicorn factory."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import time
from contextlib import asynccontextmanager

import structlog
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.dependencies.utils import field_annotation_is_sequence
from fastapi.exceptions import RequestValidationError

from api import access, cardapp, cardfast, metrics, ops, policies, problems, programs, registry
from api.problems import crash_answer, eum_problem, problem
from api.ratelimit import RateLimiter
from api.requestids import request_id_of
from eum.logs import configure_logging
from eum.settings import Settings, get_settings
from ledger.errors import PayloadTooLarge
from rules.loader import POLICY_FILE_BYTES_MAX

log = structlog.get_logger("api")


def _query_names(dependant) -> tuple[frozenset[str], frozenset[str]]:
    """The query parameters a route declares, its dependencies' included, and of those
    the ones that take a list (`kind=payment&kind=refund`)."""
    names = {field.alias for field in dependant.query_params}
    lists = {field.alias for field in dependant.query_params
             if field_annotation_is_sequence(field.field_info.annotation)}
    for sub in dependant.dependencies:
        sub_names, sub_lists = _query_names(sub)
        names |= sub_names
        lists |= sub_lists
    return frozenset(names), frozenset(lists)


_DECLARED: dict[str, tuple[frozenset[str], frozenset[str]]] = {}


def known_query(request: Request) -> None:
    """A read's query parameter its route does not declare is 422 `validation_error`:
    FastAPI ignores one, so `GET .../transactions?kind=topup&from=...` answered every
    kind and date, and a client took the page as filtered (read-path audit). So is one
    that takes a single value given twice (`month=2025-09&month=2025-10`): FastAPI keeps
    the last and drops the other, and the page would not be what was asked."""
    if request.method != "GET" or not request.query_params:
        return
    route = request.scope.get("route")
    if route is None:
        return
    declared = _DECLARED.get(route.path_format)
    if declared is None:
        declared = _DECLARED[route.path_format] = _query_names(route.dependant)
    names, lists = declared
    given = request.query_params
    unknown = sorted(set(given) - names)
    if unknown:
        raise RequestValidationError([
            {"loc": ("query", name), "msg": f"not a parameter of this route (it takes: "
                                            f"{', '.join(sorted(names)) or 'none'})", "type": "extra_forbidden"}
            for name in unknown])
    twice = sorted(name for name in set(given) - lists if len(given.getlist(name)) > 1)
    if twice:
        raise RequestValidationError([
            {"loc": ("query", name), "msg": "given more than once; it takes one value", "type": "value_error"}
            for name in twice])


KNOWN_QUERY = [Depends(known_query)]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks: list[asyncio.Task] = []
        if (supervisor := _supervisor_pid()) is not None:
            tasks.append(asyncio.create_task(_watch_supervisor(supervisor)))
        services = _try_start(settings)
        if services is not None:
            _serve(app, services, tasks)
        else:  # the database cannot be reached: answer 503 meanwhile, and keep trying
            tasks.append(asyncio.create_task(_start_when_reachable(app, settings, tasks)))
        yield
        for task in list(tasks):
            task.cancel()
        await app.state.limiter.close()
        if app.state.services is not None:
            await app.state.services.idempotency.close()
            app.state.services.close()

    # The interactive docs load their scripts from a CDN and invite staff to paste keys:
    # not served in production (the contract, /openapi.json, is).
    docs = settings.environment != "production"
    app = EumApp(title="e-eum cashback engine", version="0.1.0", lifespan=lifespan,
                 docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                 # /v1/payments/ is a 404 problem, not a 307 to an http:// URL built from Host.
                 redirect_slashes=False,
                 description="Book of record and cashback rules for Incheon's local-currency card.")
    # POST /v1/payments and /v1/topups answered ahead of the middleware on their happy path.
    app.fast_routes = cardfast.ROUTES if getattr(settings, "api_fast_path", True) else {}
    app.body_bytes_max = settings.request_body_bytes_max
    app.state.services = None  # set once the worker reaches the book of record (lifespan)
    # Empty (compose's ${VAR:-}) is unset: /metrics open, as `eum serve` warns.
    app.state.metrics_token = (settings.metrics_token.get_secret_value().strip() or None
                               if settings.metrics_token else None)
    # Per-key token buckets, checked by api.auth and api.cardfast (api/ratelimit.py).
    app.state.limiter = RateLimiter.from_settings(settings)
    problems.install(app)
    for module in (cardapp, registry, programs, policies, ops):
        app.include_router(module.router, dependencies=[] if module is ops else KNOWN_QUERY)
    _install_optional_routers(app)
    access.install_openapi(app)  # the bearer security scheme and the roles per operation
    app.add_middleware(Edge, access_log=settings.access_log, body_bytes_max=settings.request_body_bytes_max,
                       upload_bytes_max=settings.upload_bytes_max, template_of=app._template_of)
    return app


STARTUP_RETRY_S_MAX = 5.0


def _try_start(settings: Settings):
    """The worker's services, or None while the database cannot be reached. A worker
    that uvicorn starts in place of a dead one during an outage must not fail its
    start-up: uvicorn's supervisor answers a failed start by stopping every worker, and
    the service would stay down after the database came back. Anything but an
    unreachable database (a bad policy file, one edited in place, a missing table) still
    fails the start."""
    from sqlalchemy.exc import InterfaceError, OperationalError, TimeoutError as PoolTimeout

    from api.policies import sync_files
    from api.services import build
    from ledger.db import error_kind

    services = None
    try:
        services = build(settings)
        sync_files(services)
        return services
    except (OperationalError, InterfaceError, PoolTimeout) as error:
        if services is not None:
            services.close()
        # the driver's first line with the class: a connection refused for a setting (a
        # statement timeout PostgreSQL cannot take) had logged "OperationalError" alone
        log.warning("service.waiting_for_database", error=error_kind(error))
        return None
    except BaseException:
        if services is not None:  # its writer threads and connections: not left behind
            services.close()
        raise


async def _start_when_reachable(app, settings: Settings, tasks: list) -> None:
    """Until the database answers, the worker is up but not ready: every route that needs
    the book answers 503 `not_ready` with Retry-After (`EumApp`), `/healthz` 200. Then it
    serves. (Waiting inside start-up instead, a worker accepted no connection at all: with
    every worker waiting, even the probes hung.)"""
    delay_s = 0.25
    while True:
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, STARTUP_RETRY_S_MAX)
        try:
            services = await asyncio.to_thread(_try_start, settings)
        except Exception as error:  # noqa: BLE001 - e.g. the book came back unmigrated: logged, tried again
            log.error("service.start_failed", error=f"{type(error).__name__}: {error}"[:300])
            continue
        if services is not None:
            _serve(app, services, tasks)
            return


def _serve(app, services, tasks: list) -> None:
    from api.auth import keep_keys_warm
    from api.policies import refresher

    app.state.services = services
    tasks.append(asyncio.create_task(refresher(services)))
    tasks.append(asyncio.create_task(keep_keys_warm(services.keys)))
    tasks.append(asyncio.create_task(_watch_queue(services.batcher)))
    from ledger.db import where

    log.info("service.started", database=where(services.settings.database_url),
             redis_configured=bool(services.settings.redis_url), policies=len(services.timeline))


SUPERVISOR_WATCH_S = 1.0
SUPERVISOR_ENV = "EUM_SUPERVISOR_PID"  # set by `eum serve --workers N` for the workers it spawns (eum/cli.py)


def _supervisor_pid() -> int | None:
    """The pid of the `eum serve` supervisor that spawned this worker, or None (one
    worker in `eum serve`'s own process, a test's app). Only when multiprocessing
    spawned this process from it: an environment inherited some other way names no
    supervisor of ours. Whether it is still this process's parent is not asked here: a
    supervisor killed while this worker was still starting had made it an orphan before
    its lifespan began, and the worker, watching nothing, served on and held the port
    (the watcher below stops it at its first look)."""
    text = os.environ.get(SUPERVISOR_ENV, "")
    parent = multiprocessing.parent_process()
    return int(text) if text.isdigit() and parent is not None and parent.pid == int(text) else None


async def _watch_supervisor(supervisor_pid: int) -> None:
    """A worker whose supervisor died (kill -9 of its pid alone, the OOM killer) stops
    itself, as SIGTERM stops it: answered requests and batches finish, then it exits.
    Left running, orphaned workers served the port on with no one to replace one that
    died, and held it, so `eum serve` started again was refused (exit 2, address in use)
    until each was found and killed by hand (fault audit, 2026-12-07)."""
    while os.getppid() == supervisor_pid:
        await asyncio.sleep(SUPERVISOR_WATCH_S)
    log.warning("service.supervisor_gone", supervisor_pid=supervisor_pid, worker_pid=os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)


QUEUE_WATCH_S = 1.0


async def _watch_queue(batcher) -> None:
    """`eum_batch_queue_depth` every second as well as after each batch: set only by the
    writer after a batch, it stood at its last figure while a writer waited on a stalled
    database, the very time the queue fills (operations audit, 2026-12-07)."""
    while True:
        metrics.QUEUE_DEPTH.set(batcher.depth)
        await asyncio.sleep(QUEUE_WATCH_S)


class EumApp(FastAPI):
    """FastAPI, with the card app's hottest writes taken before the middleware stack
    (`api/cardfast.py`): for them the stack's layers (server errors, FastAPI's own
    middleware, `Edge`, routing) cost more than the book's work. Whatever the fast path
    does not answer goes through the whole stack, body replayed."""

    fast_routes: dict = {}
    body_bytes_max: int = 65_536

    # Routes that answer without the book: served while the worker waits for the database.
    WITHOUT_BOOK = frozenset(("/healthz", "/metrics", "/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.state.services is None and scope["path"] not in self.WITHOUT_BOOK:
            await self._not_ready(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"] in self.fast_routes and scope["method"] == "POST":
            await cardfast.handle(self, super().__call__, scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    _templates: list | None = None

    def _template_of(self, path: str) -> str:
        """The documented route template a raw path falls under, as the router would name
        it, for an answer given before routing; "unmatched" when none."""
        if self._templates is None:
            self._templates = [(re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(t)) + "$"), t)
                               for t in self.openapi()["paths"]]
        return next((t for pattern, t in self._templates if pattern.match(path)), "unmatched")

    async def _not_ready(self, scope, receive, send) -> None:
        """503 while the worker has not reached the book, answered before the middleware
        stack (its routes need the services) with what `Edge` gives every answer: the
        request id echoed, the request counted and a `request` warning, under the route's
        template (a raw path names a member)."""
        started = time.perf_counter()
        request_id = request_id_of(dict(scope["headers"]))
        response = problem(503, "not_ready", "Not ready", "the service is starting and cannot reach the book "
                           "of record yet; retry shortly",
                           headers={"Retry-After": "1", **{k.decode(): v.decode() for k, v in cardfast.ANSWER_HEADERS}})
        response.raw_headers.append((b"x-request-id", request_id.encode()))
        await response(scope, receive, send)
        route = self._template_of(scope["path"])
        elapsed = time.perf_counter() - started
        metrics.observe_request(route, 503, elapsed)
        log.warning("request", method=scope["method"], path=route, status=503, ms=round(elapsed * 1000, 2),
                    code="not_ready", request_id=request_id)


def _install_optional_routers(app: FastAPI) -> None:
    """Routers of other domains (policies, finance), included when present."""
    import importlib

    for name in ("api.finance",):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        app.include_router(module.router, dependencies=KNOWN_QUERY)


class Edge:
    """Pure ASGI middleware: request id and access log, latency metrics, and a cap on
    body size (Content-Length checked up front, streamed bodies counted).

    The access log (`EUM_ACCESS_LOG`): `staff` (the default) writes a line for every call
    but the card app's and the public probes', with the caller's key id and role, refused
    calls and unknown keys included (a card-app key refused, 401 or 403, is logged too);
    `all` adds the card app's (at its volume a real cost); `off` none. A 5xx is logged
    whatever the setting: a warning, its `access` line, or a `request` line when the
    access log names no such call."""

    # File uploads (CSV of recipients, clearing files, policy documents) may be larger.
    UPLOAD_PATHS = ("/disbursements/bulk", "/v1/reconciliations")
    PUBLIC = frozenset(("/healthz", "/readyz", "/metrics"))

    def __init__(self, app, body_bytes_max: int, upload_bytes_max: int, access_log: str = "staff",
                 template_of=lambda path: "unmatched"):
        self.app = app
        self.template_of = template_of  # a route's template for an answer given before routing (a 413)
        self.access_log = access_log
        self.body_bytes_max = body_bytes_max
        self.upload_bytes_max = upload_bytes_max

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        path = scope.get("path", "")
        if path == "/v1/policies":  # a document: the parser refuses more (rules/loader.py)
            limit = min(self.upload_bytes_max, POLICY_FILE_BYTES_MAX)
        elif path.endswith(self.UPLOAD_PATHS):
            limit = self.upload_bytes_max
        else:
            limit = self.body_bytes_max
        request_id = request_id_of(headers)
        started = time.perf_counter()
        status_holder = {"status": 500, "started": False}
        seen = {"bytes": 0}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit:
                    raise _TooLarge(limit)
            return message

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_holder["status"], status_holder["started"] = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode()),
                                      *cardfast.ANSWER_HEADERS]
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                raise _TooLarge(limit)  # refused before the body is read: logged and counted all the same
            await self.app(scope, limited_receive, send_with_id)
        except _TooLarge:
            response = eum_problem(PayloadTooLarge(f"bodies here may be at most {limit} bytes"))
            await response(scope, receive, send_with_id)
        except Exception as error:
            if status_holder["started"]:  # the answer has begun to leave: the server's to log
                raise
            # Answered here, in the request's log context, rather than by the server's
            # error middleware outside this one: the crash line and the 500 carry the id.
            response = await crash_answer(Request(scope), error)
            await response(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = route.path if route is not None else self.template_of(scope.get("path", ""))
            elapsed = time.perf_counter() - started
            metrics.REQUESTS.labels(path, str(status_holder["status"])).inc()
            metrics.LATENCY.labels(path).observe(elapsed)
            status = status_holder["status"]
            caller = (scope.get("state") or {}).get("caller")
            if (self.access_log != "off" and path not in self.PUBLIC
                    and (self.access_log == "all" or caller is None or caller.role != "card-app"
                         or status in (401, 403))):
                # A 5xx too (a warning): it had been only a `request` line, naming no caller.
                (log.warning if status >= 500 else log.info)(
                    "access", method=scope["method"], path=path, status=status, ms=round(elapsed * 1000, 2),
                    key_id=caller.key_id if caller else None, role=caller.role if caller else None)
            elif status >= 500:
                log.warning("request", method=scope["method"], path=path, status=status, ms=round(elapsed * 1000, 2))
            structlog.contextvars.clear_contextvars()


class _TooLarge(HTTPException):
    """A streamed body passed the limit. An HTTPException so that FastAPI's body reading
    lets it through (it turns any other exception into a 400); the problem handler
    answers it as 413 payload_too_large."""

    def __init__(self, limit: int = 0):
        super().__init__(413, f"bodies here may be at most {limit} bytes")
