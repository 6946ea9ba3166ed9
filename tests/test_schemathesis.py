"""Schemathesis against the service's own `/openapi.json`: every operation, with inputs
that fit its schema and inputs that break it, sent with every role and with no key.

For every answer: never a 5xx; every 4xx is a problem document
(`application/problem+json` with type, title, status, detail, code); and a refused
request changes nothing — the book's fingerprint (every balance, budgets and month
counters: `tests.book_helpers.snapshot`, and the row count of every table, the audit log
and the staff's drafts and runs included: `_fingerprint`) is the same after it, and
`check_book` stays green at the end.

Two profiles (the number of generated examples per operation and mode):
- CI (default): `EUM_SCHEMATHESIS_EXAMPLES=15`, in-process ASGI app on SQLite, ~1 minute.
- long: `EUM_SCHEMATHESIS_EXAMPLES=300 EUM_SCHEMATHESIS_DB=postgres .venv/bin/python -m pytest -m schemathesis -q`
  (also documented in README.md), a few minutes per 100 examples.
Hypothesis does not keep a database of examples here, so a run is reproducible from its
printed seed (`--hypothesis-seed=N`)."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from api.access import matrix
from ledger.keys import ROLES
from tests.book_helpers import PROBLEM_FIELDS, assert_book_ok, put_member, put_merchant, snapshot, topup
from tests.conftest import POLICIES, at, make_api

pytestmark = pytest.mark.schemathesis

EXAMPLES = int(os.environ.get("EUM_SCHEMATHESIS_EXAMPLES", "15"))
BACKEND = os.environ.get("EUM_SCHEMATHESIS_DB", "sqlite")
NO_KEY = "(no key)"


def _operations() -> list[tuple[str, str]]:
    from api.app import create_app
    from eum.settings import Settings

    app = create_app(Settings(environment="test", log_level="WARNING"))
    return [(method, path) for method, path, _ in matrix(app)]


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """One app for the module: seeded with a member, a merchant, money, a payment and an
    approved grant program, so that generated calls meet real rows as well as missing ones."""
    if BACKEND == "postgres":
        from tests.conftest import create_pg_database, drop_pg_database
        from ledger.db import migrate

        name, url = create_pg_database()
        migrate(url)
    else:
        from ledger.db import migrate

        name, url = None, f"sqlite:///{tmp_path_factory.mktemp('schemathesis') / 'eum.db'}"
        migrate(url)
    api = make_api(url, rate_limits={})  # schemathesis floods on purpose; limits: test_rate_limits
    try:
        with api.client:
            _seed(api)
            document = api.client.get("/openapi.json").json()
            yield api, schemathesis.openapi.from_dict(document)
    finally:
        if name is not None:
            drop_pg_database(name)


def _seed(api) -> None:
    import yaml

    put_member(api, "m1")
    put_merchant(api, "shop")
    topup(api, "t-seed", "m1", 100_000, at("2025-09-10"))
    r = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop", "amount": 10_000,
                                  "occurred_at": at("2025-09-15")})
    assert r.status_code == 201, r.text
    program = yaml.safe_load((POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text())
    program = {**program, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}  # JSON carries dates as text
    r = api.post("/v1/grant-programs", program, role="policy-editor")
    assert r.status_code == 201, r.text
    r = api.post(f"/v1/grant-programs/{program['program_id']}/approve", role="policy-approver")
    assert r.status_code == 200, r.text


def _send(api, case, role: str):
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if k.lower() != "authorization"}
    if role != NO_KEY:
        headers["Authorization"] = f"Bearer {api.tokens[role]}"
    request = {k: v for k, v in kwargs.items() if k in ("method", "url", "params", "content", "json", "data",
                                                        "files", "cookies")}
    return api.client.request(headers=headers, **request)


def _fingerprint(api) -> dict:
    """`snapshot` (the book's rows, balances, budgets and month counters) and the row count
    of every other table: the audit log, keys, policies, corrections, settlements and their
    reopen requests, reconciliation runs, withdrawals. `snapshot` alone left these out, so
    a refused request that wrote an audit entry or a draft went unseen here."""
    from sqlalchemy import func, select

    import settlement.schema  # noqa: F401  (its tables are on the book's metadata)
    from ledger import schema as s
    from tests.book_helpers import _reader

    out = snapshot(api)
    with _reader(api).connect() as conn:
        for table in s.metadata.sorted_tables:
            out[f"rows of {table.name}"] = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
    return out


def _problem_errors(response) -> list[str]:
    errors = []
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        errors.append(f"content-type {response.headers.get('content-type')!r}")
        return errors
    body = response.json()
    errors += [f"no {field}" for field in PROBLEM_FIELDS if field not in body]
    if body.get("status") != response.status_code:
        errors.append(f"status {body.get('status')} in a {response.status_code} answer")
    return errors


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_never_500s_and_refusals_change_nothing(fuzzed, method, path):
    api, schema = fuzzed
    operation = schema[path][method]
    allowed = next(roles for m, p, roles in matrix(api.client.app) if (m, p) == (method, path))
    right = sorted(allowed) if allowed is not None else ["card-app"]
    failures: list[str] = []
    state = {"before": _fingerprint(api)}

    def check(case, role: str) -> None:
        response = _send(api, case, role)
        label = f"{role} {case.method} {case.formatted_path} {case.query} {str(case.body)[:200]!r}"
        if response.status_code >= 500:
            failures.append(f"{response.status_code} for {label}: {response.text[:300]}")
            return
        if response.status_code >= 400:
            problems = _problem_errors(response)
            if problems:
                failures.append(f"{response.status_code} not a problem document ({problems}) for {label}")
            after = _fingerprint(api)
            if after != state["before"]:
                failures.append(f"{response.status_code} for {label} changed the book")
            state["before"] = after
        else:
            state["before"] = _fingerprint(api)
        # A key without the role (or no key) is refused, 401 or 403, whatever the request: access
        # is decided before the body, path or query is read (tests/test_access.py). A 422 was
        # let through here from before that was so, and would have hidden a route whose checks
        # answer a caller it refuses what was wrong with its input.
        if allowed is not None and role not in allowed and response.status_code not in (401, 403):
            failures.append(f"{role} got {response.status_code} for {label}")

    roles = st.one_of(st.sampled_from(right), st.sampled_from([*ROLES, NO_KEY]))
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode), role=roles)
        def run(case, role):
            check(case, role)

        try:
            run()
        except Exception as error:  # a mode with nothing to break (no parameters, no body)
            if type(error).__name__ != "Unsatisfiable":
                raise
    assert not failures, "\n".join(failures[:30])
    assert_book_ok(api)
