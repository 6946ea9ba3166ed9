"""The access matrix, read from the routes themselves: which roles each route admits."""

from __future__ import annotations

from typing import Callable

from fastapi import FastAPI
from fastapi.routing import APIRoute

from ledger.keys import ROLES

PUBLIC = "public"


def auth_dependency(route) -> Callable | None:
    """A route's key check (`api.auth.require(...)`, marked by its `roles`); None for a
    public route or anything that is not an API route."""
    for dependant in getattr(getattr(route, "dependant", None), "dependencies", ()):
        if getattr(dependant.call, "roles", None) is not None:
            return dependant.call
    return None


def route_roles(route: APIRoute) -> frozenset[str] | None:
    """The roles a route's auth dependency admits; None for a public route."""
    check = auth_dependency(route)
    return None if check is None else check.roles


def _api_routes(routes) -> list[APIRoute]:
    out = []
    for route in routes:
        if isinstance(route, APIRoute):
            out.append(route)
        elif hasattr(route, "original_router"):  # a router included in the app
            out.extend(_api_routes(route.original_router.routes))
    return out


def matrix(app: FastAPI) -> list[tuple[str, str, frozenset[str] | None]]:
    rows = []
    for route in _api_routes(app.routes):
        if route.include_in_schema:
            for method in sorted(route.methods - {"HEAD"}):
                rows.append((method, route.path, route_roles(route)))
    return sorted(rows, key=lambda r: (r[1], r[0]))


def markdown(app: FastAPI) -> str:
    head = "| method | path | " + " | ".join(ROLES) + " |\n|" + " --- |" * (2 + len(ROLES)) + "\n"
    lines = []
    for method, path, roles in matrix(app):
        cells = ["public"] * len(ROLES) if roles is None else ["yes" if r in roles else "" for r in ROLES]
        lines.append(f"| {method} | `{path}` | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


PROBLEM_SCHEMA = {
    "type": "object", "required": ["type", "title", "status", "detail", "code"],
    "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "detail": {"type": "string"}, "code": {"type": "string"},
                   # fields some problems add (each optional; more may be added)
                   "errors": {"type": "array", "items": {"type": "object"},
                              "description": "422 validation_error: each bad field (loc, msg, type); 422 "
                                             "clearing_file_invalid: each bad line (line, reason)"},
                   "problems": {"type": "array", "items": {"type": "object"},
                                "description": "422 policy_invalid: each problem with its line, path, reason"},
                   "remaining": {"type": "integer", "description": "409 refund_exceeds_payment: what is left"},
                   "limit_max": {"type": "integer", "description": "422 page_size_too_large: the largest page"},
                   "earliest": {"type": "string", "format": "date-time",
                                "description": "409 activation_in_past: the earliest effective_from; 409 "
                                               "withdrawal_before_activity: the earliest occurred_at"},
                   "limit_per_s": {"type": "number", "description": "429 rate_limited: the key's requests a second"},
                   "burst": {"type": "integer", "description": "429 rate_limited: the requests it may send at once"},
                   "request_id": {"type": "string",
                                  "description": "409 reopen_request_decided: the reopen request already pending; "
                                                 "409 budget_request_pending: the budget request already pending"},
                   "limit_before": {"type": ["integer", "null"],
                                    "description": "409 budget_changed_since_request: the limit the request replaces"},
                   "limit": {"type": ["integer", "null"],
                             "description": "409 budget_changed_since_request: the budget's limit now"},
                   "checks": {"type": "object", "description": "503 not_ready from /readyz: each dependency's state"}},
    "additionalProperties": True,
    "description": "RFC 9457 problem document (application/problem+json) with a stable `code`",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before resending", "schema": {"type": "integer"}}}
# A problem document's content, as every operation's error answers name it.
PROBLEM_CONTENT = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


# The modules that define the engine's errors (subclasses of `ledger.errors.EumError`).
# `problem_codes` imports them itself: the classes it finds are only those of modules
# already imported, and some are imported only when first used (`ledger.corrections`, by
# the first correction), so `/openapi.json` built before that left their codes out.
# tests/test_answers_documented.py checks in a fresh interpreter that no other module
# defines one.
ERROR_MODULES = ("ledger.errors", "ledger.audit", "ledger.corrections", "ledger.policies", "ledger.programs",
                 "ledger.queries", "settlement.reconcile", "settlement.runs", "settlement.service", "api.auth",
                 "api.policies", "api.programs", "api.ratelimit")


def problem_codes() -> list[str]:
    """Every `code` a problem document can carry: the engine's errors' and the HTTP ones."""
    import importlib

    from api.problems import _HTTP_CODES
    from ledger.errors import EumError

    for module in ERROR_MODULES:
        importlib.import_module(module)
    codes, todo = set(_HTTP_CODES.values()), [EumError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if isinstance(getattr(cls, "code", None), str):
            codes.add(cls.code)
    return sorted(codes | {"validation_error", "not_ready", "overloaded", "policy_clash", "payload_too_large"})
_AUTH_ANSWERS = {"401": "no key, or an unknown, revoked or expired key (`unauthorized`)",
                 "403": "this key's role may not call this (`forbidden`)",
                 "429": "this key passed its rate limit (`rate_limited`); see `Retry-After`"}
_OTHER_ANSWERS = {"4XX": "refused (not found, a conflict such as `idempotency_conflict`, ...): nothing changed",
                  "5XX": "not done (`internal_error`), or the service is unavailable (503 "
                         "`service_unavailable`, see `Retry-After`): resend (with the same id, where the "
                         "request carries one)"}


def install_openapi(app: FastAPI) -> None:
    """The OpenAPI document says how to authenticate: a `bearer` security scheme, required
    by every route that names roles (which roles: in the operation's description), and the
    401/403/429 problem answers they can give. Tools such as schemathesis then send the key."""
    table = {(method, path): roles for method, path, roles in matrix(app)}
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        components = document.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": "an API key (`eum keys create --name NAME --role ROLE`); one role per key"}
        schema = {**PROBLEM_SCHEMA, "properties": {**PROBLEM_SCHEMA["properties"], "code": {
            "type": "string", "description": "stable; one of " + ", ".join(f"`{c}`" for c in problem_codes())
                                             + " (more may be added)"}}}
        schemas = components.setdefault("schemas", {})
        schemas["Problem"] = schema
        # FastAPI's own 422 shape: never sent (every 422 here is a Problem)
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        for path, operations in document.get("paths", {}).items():
            for method, operation in operations.items():
                roles = table.get((method.upper(), path))
                if roles is None:
                    continue
                if "422" in operation.get("responses", {}):  # every 422 here is a problem document
                    operation["responses"]["422"] = {"description": "the request is not valid "
                                                                    "(`validation_error` and others)",
                                                     "content": PROBLEM_CONTENT}
                operation["security"] = [{"bearer": []}]
                note = "Roles: " + ", ".join(f"`{r}`" for r in ROLES if r in roles) + "."
                operation["description"] = f"{operation.get('description', '').strip()}\n\n{note}".strip()
                for status, text in {**_AUTH_ANSWERS, **_OTHER_ANSWERS}.items():
                    answer = {"description": text, "content": PROBLEM_CONTENT}
                    if status in ("429", "5XX"):
                        answer["headers"] = RETRY_AFTER
                    operation.setdefault("responses", {}).setdefault(status, answer)
        app.openapi_schema = document
        return document

    app.openapi = openapi
