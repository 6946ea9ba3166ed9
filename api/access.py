"""The access matrix, read from the routes themselves: which roles each route admits."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute

from ledger.keys import ROLES

PUBLIC = "public"


def route_roles(route: APIRoute) -> frozenset[str] | None:
    """The roles a route's auth dependency admits; None for a public route."""
    for dependant in route.dependant.dependencies:
        roles = getattr(dependant.call, "roles", None)
        if roles is not None:
            return roles
    return None


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
