"""RFC 9457 problem documents for every error the service returns."""

from __future__ import annotations

import traceback

import psycopg
import structlog
from fastapi import FastAPI, Request
from sqlalchemy import exc as sa
from fastapi.exceptions import RequestValidationError
from api.access import auth_dependency
from api.responses import Json
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledger.db import database_trouble
from ledger.errors import EumError, InternalError, NotFound, PayloadTooLarge, Unavailable
from rules.compiled import PolicyClash

log = structlog.get_logger("api")
RETRY_AFTER_S = 1  # what a 503 for database trouble tells the client to wait
PROBLEM = "application/problem+json"
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"
NOT_UTF8 = "the body must be JSON in UTF-8 (RFC 8259 §8.1)"

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
               415: "unsupported_media_type", 429: "rate_limited", 500: "internal_error", 503: "service_unavailable"}


def http_title(code: str) -> str:
    """The title of an error Starlette or FastAPI raises (an unknown path, a method not
    allowed, a streamed body past its limit): that of the service's own error with the
    same code, so that one problem type has one title (RFC 9457) whichever path answers
    it; a code only these errors give is titled from itself."""
    from api.auth import Forbidden, Unauthorized  # api.auth imports this module
    from api.ratelimit import RateLimited

    for error in (EumError, Unauthorized, Forbidden, NotFound, PayloadTooLarge, RateLimited, InternalError,
                  Unavailable):
        if error.code == code:
            return error.title
    return code.replace("_", " ").capitalize()


def problem(status: int, code: str, title: str, detail: str, headers: dict | None = None, **extra) -> Json:
    body = {"type": f"/problems/{code}", "title": title, "status": status, "detail": detail, "code": code, **extra}
    return Json(body, status_code=status, media_type=PROBLEM, headers=headers)


def eum_problem(exc: EumError) -> Json:
    """A business error's answer (the handler's, and the ASGI fast path's: api/cardfast.py)."""
    # 503 (Unavailable) and 429 (api.ratelimit.RateLimited) say when to come back.
    retry_after_s = getattr(exc, "retry_after_s", None)
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    if exc.status == 401:  # RFC 9110: a 401 names the scheme it wants
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="eum"'}
    return problem(exc.status, exc.code, exc.title, exc.detail, headers=headers, **exc.extra)


def unavailable(detail: str = "the book of record is not reachable right now; retry with the same id") -> Json:
    return problem(503, "service_unavailable", "Service unavailable", detail,
                   headers={"Retry-After": str(RETRY_AFTER_S)})


def _jsonable(errors: list[dict]) -> list[dict]:
    out = []
    for err in errors[:50]:
        out.append({"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")),
                    "type": str(err.get("type", ""))})
    return out


def _route(request: Request) -> str:
    """What the logs name: the route template (`/v1/members/{member_id}/balance`), never
    the path itself, which carries member and payment ids (docs/design.md, Logs)."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def _error_kind(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    sqlstate = getattr(orig, "sqlstate", None)
    return type(orig).__name__ + (f" (SQLSTATE {sqlstate})" if sqlstate else "")


async def _refused_caller(request: Request) -> Json | None:
    """FastAPI decodes a JSON body before it runs a route's dependencies, so a body it
    cannot decode would be answered 422 before the key is looked at. Access comes first:
    a missing or wrong key, or a role the route does not admit, gets its 401/403 whatever
    the body (docs/access.md)."""
    if getattr(request.state, "principal", None) is not None:
        return None  # the route's key check already ran and passed
    check = auth_dependency(request.scope.get("route"))
    if check is not None:
        try:
            await check(request)
        except EumError as exc:
            return eum_problem(exc)
    return None


async def database_answer(request: Request, exc: Exception) -> Json:
    """The answer to a database error: 503 retry with the same id for an outage (logged
    by class and SQLSTATE), else 500 (a bug, logged by where it happened)."""
    if not database_trouble(exc):  # e.g. an IntegrityError: a bug, not an outage
        # Where it happened (frames), not the message: a constraint's DETAIL quotes the row.
        log.error("request.crashed", path=_route(request), error=_error_kind(exc),
                  where="".join(traceback.format_tb(exc.__traceback__)[-4:]))
        return problem(500, "internal_error", "Internal error", "an unexpected error; it has been logged")
    # The class and SQLSTATE say what went wrong; the message could quote a row's values.
    log.warning("request.database_unavailable", path=_route(request), error=_error_kind(exc))
    return unavailable()


async def crash_answer(request: Request, exc: Exception) -> Json:
    """The answer to an unexpected exception: `database_answer` for database trouble, else
    500 with the traceback logged (`request.crashed`). Called by `api.app.Edge` while
    the request id is in the log context, so the line and the answer carry it; the
    catch-all handler below is for an exception Edge does not see."""
    if database_trouble(exc):
        return await database_answer(request, exc)
    log.exception("request.crashed", path=_route(request))
    return problem(500, "internal_error", "Internal error", "an unexpected error; it has been logged")


def install(app: FastAPI) -> None:
    @app.exception_handler(EumError)
    async def _business(_: Request, exc: EumError):
        return eum_problem(exc)

    @app.exception_handler(PolicyClash)
    async def _clash(_: Request, exc: PolicyClash):
        # an activation, withdrawal, simulation or correction whose policies cannot be in
        # force together; raised before anything is committed
        return problem(409, "policy_clash", "These policies cannot be in force together", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if (refused := await _refused_caller(request)) is not None:
            return refused
        errors = _jsonable(exc.errors())
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else first["msg"]
        if first["loc"] == ["body"] and isinstance((exc.errors() or [{}])[0].get("input"), bytes):
            # The body reached the model unread: FastAPI reads JSON only under a JSON
            # Content-Type (application/json, application/*+json; with its default
            # strict_content_type, none at all is not read), and `curl -d` without -H sends
            # a form. The model's own 'a valid dictionary' named no cause for a valid payment.
            sent = (request.headers.get("content-type") or "").split(";", 1)[0].strip() or "none"
            detail = f"body: send it as JSON, with Content-Type: application/json (the Content-Type sent: {sent})"
        return problem(422, "validation_error", "The request is not valid", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_PARSE_ERROR:
            if (refused := await _refused_caller(request)) is not None:
                return refused
            # FastAPI's answer to a body it cannot decode: malformed input is 422. Bytes that
            # are not UTF-8 (CP949, Korean Windows' encoding) are told what UTF-16 is told
            # (api.auth.json_keys_once, which json.loads lets UTF-16 reach): JSON is UTF-8.
            if isinstance(exc.__cause__, UnicodeDecodeError):
                return problem(422, "validation_error", "The request is not valid", NOT_UTF8)
            return problem(422, "validation_error", "The request is not valid", "body: not valid JSON text",
                           errors=[{"loc": ["body"], "msg": "not valid JSON text", "type": "json_invalid"}])
        code = _HTTP_CODES.get(exc.status_code, "error")
        return problem(exc.status_code, code, http_title(code), str(exc.detail), headers=getattr(exc, "headers", None))

    # Registered per class so that Starlette's ExceptionMiddleware answers them (the
    # catch-all below would answer too, but re-raises into the server's error log).
    for cls in (sa.DBAPIError, sa.TimeoutError, psycopg.OperationalError, psycopg.InterfaceError):
        app.add_exception_handler(cls, database_answer)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return await crash_answer(request, exc)
