"""The answers /openapi.json documents (api/answers.py) are the answers given: every
2xx JSON body the suite receives is checked against its route's model
(`tests.conftest.check_answer`); here, that the check bites and that the document names
an answer for every JSON route."""

import re

import httpx
import pytest

from tests.conftest import check_answer


def _answer(method: str, path: str, body: dict, status: int = 201) -> httpx.Response:
    return httpx.Response(status, json=body, request=httpx.Request(method, f"http://testserver{path}"))


def test_a_payment_answer_missing_or_retyping_a_field_fails_the_check(api):
    api.put("/v1/members/m1", {"district": "seo"})
    api.put("/v1/merchants/shop", {"name": "S", "district": "seo", "category": "grocery",
                                   "annual_sales": 100_000_000, "registered_from": "2019-01-01"})
    api.post("/v1/topups", {"topup_id": "t", "member_id": "m1", "amount": 50_000,
                            "occurred_at": "2025-09-15T12:00:00+09:00"})
    real = api.post("/v1/payments", {"payment_id": "p", "member_id": "m1", "merchant_id": "shop", "amount": 10_000,
                                     "occurred_at": "2025-09-15T12:00:00+09:00"}).json()
    check_answer(_answer("POST", "/v1/payments", real))  # the real one passes
    with pytest.raises(AssertionError, match="PaymentOut"):
        check_answer(_answer("POST", "/v1/payments", {k: v for k, v in real.items() if k != "spent"}))
    with pytest.raises(AssertionError, match="PaymentOut"):
        check_answer(_answer("POST", "/v1/payments", {**real, "cashback": {**real["cashback"], "amount": "1000"}}))
    # `cashback.why`: documented (a won as text fails), and optional (answers recorded before it)
    with pytest.raises(AssertionError, match="PaymentOut"):
        check_answer(_answer("POST", "/v1/payments", {**real, "cashback": {
            **real["cashback"], "why": [{"code": "not_earning_money", "balance": "points", "amount": "1000"}]}}))
    check_answer(_answer("POST", "/v1/payments", {**real, "cashback": {
        k: v for k, v in real["cashback"].items() if k != "why"}}))
    # /v1/policies/schema is its own route, not /v1/policies/{policy_id}'s PolicyOut.
    check_answer(_answer("GET", "/v1/policies/schema", {"type": "object"}, 200))
    with pytest.raises(AssertionError, match="PolicyOut"):
        check_answer(_answer("GET", "/v1/policies/x", {"type": "object"}, 200))


def test_every_json_route_documents_its_answer_and_errors(api):
    document = api.client.get("/openapi.json").json()
    missing = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if path in ("/healthz", "/readyz", "/metrics", "/v1/policies/schema") or path.startswith("/v1/reports/"):
                continue
            ok = [s for s in operation["responses"] if s.startswith("2")]
            schema = operation["responses"][ok[0]].get("content", {}).get("application/json", {}).get("schema")
            if not schema or schema == {}:
                missing.append(f"{method.upper()} {path}")
            assert "4XX" in operation["responses"] and "5XX" in operation["responses"], (method, path)
    assert not missing, missing
    payment = document["components"]["schemas"]["PaymentOut"]
    assert {"payment_id", "status", "spent", "cashback", "balances"} <= set(payment["required"])


def test_replays_codes_and_retry_after_are_in_the_document(api):
    """What a generated client needs beyond the happy path: a resend's 200 (same schema,
    `Idempotent-Replayed`), every problem `code`, `Retry-After` on 429/5XX, times typed."""
    document = api.client.get("/openapi.json").json()
    payment = document["paths"]["/v1/payments"]["post"]["responses"]
    assert payment["200"]["content"]["application/json"]["schema"] == payment["201"]["content"]["application/json"][
        "schema"] and "Idempotent-Replayed" in payment["200"]["headers"]
    assert "Retry-After" in payment["429"]["headers"] and "Retry-After" in payment["5XX"]["headers"]
    codes = document["components"]["schemas"]["Problem"]["properties"]["code"]["description"]
    for code in ("refund_exceeds_payment", "idempotency_conflict", "member_not_found", "policy_clash",
                 "service_unavailable", "validation_error"):
        assert f"`{code}`" in codes, code
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert document["components"]["schemas"]["PaymentOut"]["properties"]["occurred_at"]["format"] == "date-time"


def test_every_operation_has_an_id_of_its_own():
    """OpenAPI wants operationIds unique: GET and HEAD /healthz, one route, shared one
    (generated clients clash on it), and FastAPI warned on stderr as it built the document."""
    import collections
    import warnings

    from api.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        document = create_app().openapi()
    ids = collections.Counter(operation["operationId"] for operations in document["paths"].values()
                              for operation in operations.values() if "operationId" in operation)
    assert [name for name, count in ids.items() if count > 1] == []
    assert {"get", "head"} <= set(document["paths"]["/healthz"])


_CODES_IN_A_FRESH_PROCESS = """
import importlib, json, pkgutil

from api.access import problem_codes

first = problem_codes()  # before the app imports its routers' modules
from api.app import create_app

described = create_app().openapi()["components"]["schemas"]["Problem"]["properties"]["code"]["description"]
for package in ("api", "ledger", "rules", "settlement", "eum"):
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if ".migrations" not in module.name and not module.name.endswith("__main__"):  # alembic's env; the CLI
            importlib.import_module(module.name)
print(json.dumps({"described": described, "first": first, "everything_imported": problem_codes()}))
"""


def test_the_problem_codes_do_not_depend_on_what_the_process_imported_before():
    """`problem_codes()` finds the error classes of the modules imported so far; in a
    fresh process (the test session imports everything, which hid it) `/openapi.json` left
    out `correction_not_found` and `correction_state_conflict`, whose module is imported
    at the first correction. With every module of the service imported, no code is added:
    `api.access.ERROR_MODULES` names every module that defines an error. The first call
    comes before the app is built, whose routers import more (`settlement.runs`'s
    `reconciliation_not_found` had been found only through `api.finance`)."""
    import json
    import os
    import subprocess
    import sys

    from eum.settings import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))}
    run = subprocess.run([sys.executable, "-c", _CODES_IN_A_FRESH_PROCESS], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    codes = json.loads(run.stdout.splitlines()[-1])
    missed = sorted(set(codes["everything_imported"]) - set(codes["first"]))
    assert not missed, f"codes of modules api.access.ERROR_MODULES does not name: {missed}"
    assert {"correction_not_found", "correction_state_conflict"} <= set(codes["first"])
    assert [c for c in codes["first"] if f"`{c}`" not in codes["described"]] == []


def _design_table(heading: str) -> dict[str, list[str]]:
    """The rows of a table under `### heading` in docs/design.md, by their first cell's code."""
    from eum.settings import REPO_ROOT

    text = (REPO_ROOT / "docs" / "design.md").read_text()
    if f"\n### {heading}\n" not in text:
        pytest.fail(f'docs/design.md has no "### {heading}" section')
    section = re.split(r"\n##", text.split(f"\n### {heading}\n", 1)[1], maxsplit=1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            assert cells[0].strip("`") not in rows, f"{cells[0]} is listed twice under {heading}"
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def _answered_codes() -> dict[str, set[tuple[int, str]]]:
    """Each code a problem document can carry, with its (status, title): the engine's
    error classes (every module defining one imported, `api.access.problem_codes`), the
    codes the handlers give HTTP errors, and the problems the api package writes out by
    hand (`problem(status, "code", "title", ...)`)."""
    import ast

    from api import problems
    from api.access import problem_codes
    from eum.settings import REPO_ROOT
    from ledger.errors import EumError

    problem_codes()  # imports every module that defines an error
    found: dict[str, set[tuple[int, str]]] = {}
    todo = [EumError]
    while todo:
        error = todo.pop()
        todo.extend(error.__subclasses__())
        found.setdefault(error.code, set()).add((error.status, error.title))
    for status, code in problems._HTTP_CODES.items():
        found.setdefault(code, set()).add((status, problems.http_title(code)))
    for path in (REPO_ROOT / "api").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "problem" and len(node.args) >= 3
                    and all(isinstance(a, ast.Constant) for a in node.args[:3])):
                found.setdefault(node.args[1].value, set()).add((node.args[0].value, node.args[2].value))
    return found


def test_every_problem_code_is_in_the_design_table_with_its_status_and_title():
    """docs/design.md, Errors, "Problem codes": one row per code the API can answer, no
    row for a code it cannot; each row's status and title are the code's. API.md names two
    codes; the others had been scattered through the prose, many nowhere."""
    from api.access import problem_codes

    answered, table = _answered_codes(), _design_table("Problem codes")
    missing, extra = sorted(set(answered) - set(table)), sorted(set(table) - set(answered))
    assert not missing, ('problem codes the API can answer that docs/design.md\'s "Problem codes" table does '
                         f"not list (add a row for each: code, status, title, when): {missing}")
    assert not extra, f'docs/design.md\'s "Problem codes" table lists codes nothing answers: {extra}'
    assert {code: sorted(pairs) for code, pairs in answered.items() if len(pairs) > 1} == {}
    wrong = {code: (cells[:2], sorted(answered[code])) for code, cells in table.items()
             if [(int(cells[0]), cells[1])] != sorted(answered[code])}
    assert not wrong, f"rows whose status or title is not the code's (the table's, the code's): {wrong}"
    assert set(answered) - set(problem_codes()) == set(), "answered codes /openapi.json does not list"


def test_every_decline_code_is_in_the_design_table():
    """docs/design.md, Errors, "Decline codes": exactly the codes `rules.evaluate` declines with."""
    from rules.evaluate import DECLINE_CODES

    table = _design_table("Decline codes")
    missing, extra = sorted(set(DECLINE_CODES) - set(table)), sorted(set(table) - set(DECLINE_CODES))
    assert not missing, ('decline codes that docs/design.md\'s "Decline codes" table does not list (add a row for '
                         f"each: code, what it declines, when): {missing}")
    assert not extra, f'docs/design.md\'s "Decline codes" table lists codes nothing declines with: {extra}'


def test_the_answers_outside_json_are_documented_as_sent(api):
    """/openapi.json said /readyz answers only 200, /metrics only 200 JSON, and a
    settlement's merchant payouts only JSON, where /readyz also answers 503 `not_ready`
    with Retry-After, /metrics Prometheus text (and 401 with EUM_METRICS_TOKEN), and the
    payouts CSV, Parquet and xlsx by `format` (the docs audit). Each is as sent."""
    document = api.client.get("/openapi.json").json()
    ready = document["paths"]["/readyz"]["get"]["responses"]
    assert "application/json" in ready["200"]["content"]
    assert "application/problem+json" in ready["503"]["content"] and "Retry-After" in ready["503"]["headers"]
    metrics = document["paths"]["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"] and "application/problem+json" in metrics["401"]["content"]
    payouts = document["paths"]["/v1/settlements/{settlement_id}/merchant-payouts"]["get"]["responses"]["200"]
    from api.finance import MEDIA

    assert {"application/json", *(m.split(";")[0] for m in MEDIA.values())} == set(payouts["content"]), payouts
    sent = api.client.get("/metrics")
    assert sent.headers["content-type"].split(";")[0] == "text/plain", sent.headers


def test_the_document_says_which_writes_replay_and_what_else_is_sent(api):
    """What /openapi.json promised and the service did not do (the contract audit): a 200
    replay for writes whose resend is a 409 (a policy, a correction, a reopen request),
    an unchanged first answer for a grant program answered as it stands, no 201 for a
    registry PUT that creates, JSON for the HTML reports, and problem fields the
    `Problem` schema did not name."""
    document = api.client.get("/openapi.json").json()
    paths = document["paths"]
    for path in ("/v1/policies", "/v1/corrections", "/v1/settlements/{settlement_id}/reopen-requests"):
        assert "200" not in paths[path]["post"]["responses"] and "201" in paths[path]["post"]["responses"], path
    assert "as it stands now" in paths["/v1/grant-programs"]["post"]["responses"]["200"]["description"]
    assert "unchanged" in paths["/v1/payments"]["post"]["responses"]["200"]["description"]
    for path in ("/v1/merchants/{merchant_id}", "/v1/members/{member_id}"):
        assert {"200", "201"} <= set(paths[path]["put"]["responses"]), path
    for path in ("/v1/reports/daily/{business_date}", "/v1/reports/monthly/{month}"):
        assert set(paths[path]["get"]["responses"]["200"]["content"]) == {"text/html"}, path
    named = document["components"]["schemas"]["Problem"]["properties"]
    assert {"limit_per_s", "burst", "request_id", "checks", "remaining", "limit_max", "earliest"} <= set(named)
    # and the registry's 201 is what a PUT that creates answers
    created = api.put("/v1/merchants/doc-shop", {"name": "doc", "district": "seo", "category": "grocery",
                                                  "annual_sales": 100_000_000, "registered_from": "2019-01-01"})
    assert created.status_code == 201
