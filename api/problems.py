"""RFC 9457 problem documents for every error the service returns."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from api.responses import Json
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledger.errors import EumError, Unavailable

log = structlog.get_logger("api")
PROBLEM = "application/problem+json"
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
               415: "unsupported_media_type", 429: "rate_limited", 500: "internal_error", 503: "unavailable"}


def problem(status: int, code: str, title: str, detail: str, headers: dict | None = None, **extra) -> Json:
    body = {"type": f"/problems/{code}", "title": title, "status": status, "detail": detail, "code": code, **extra}
    return Json(body, status_code=status, media_type=PROBLEM, headers=headers)


def eum_problem(exc: EumError) -> Json:
    """A business error's answer (the handler's, and the ASGI fast path's: api/cardfast.py)."""
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Unavailable) else None
    return problem(exc.status, exc.code, exc.title, exc.detail, headers=headers, **exc.extra)


def _jsonable(errors: list[dict]) -> list[dict]:
    out = []
    for err in errors[:50]:
        out.append({"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")),
                    "type": str(err.get("type", ""))})
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(EumError)
    async def _business(_: Request, exc: EumError):
        return eum_problem(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        errors = _jsonable(exc.errors())
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else first["msg"]
        return problem(422, "validation_error", "The request is not valid", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_PARSE_ERROR:
            # FastAPI's answer to a body it cannot decode (e.g. not UTF-8): malformed input is 422
            return problem(422, "validation_error", "The request is not valid", "body: not valid JSON text",
                           errors=[{"loc": ["body"], "msg": "not valid JSON text", "type": "json_invalid"}])
        code = _HTTP_CODES.get(exc.status_code, "error")
        return problem(exc.status_code, code, code.replace("_", " ").capitalize(), str(exc.detail),
                       headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("request.crashed", path=request.url.path)
        return problem(500, "internal_error", "Internal error", "an unexpected error; it has been logged")
