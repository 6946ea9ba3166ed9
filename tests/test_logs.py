"""No secrets or personal data in logs (docs/design.md, Logs): requests with keys,
member ids and bad payloads go through the whole app with every log line captured at
DEBUG where the logger allows, and no API key, key hash, pepper or member id appears — nor in any answer that
is not the caller's own data."""

from __future__ import annotations

import psycopg
import pytest
import structlog
from sqlalchemy import exc as sa_exc

from ledger.keys import hash_key
from tests.book_helpers import put_merchant
from tests.conftest import at, make_api

MEMBER = "m-kim-minji-19870412"  # looks like what a careless card app might send as an id
PEPPER = "pepper-for-the-log-test-7d1c2a"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_logs_carry_no_keys_hashes_pepper_or_member_ids(db_url, capfd, monkeypatch):
    from eum.logs import configure_logging

    api = make_api(db_url, key_pepper=PEPPER, rate_limits={"card-app": (0.05, 12)})
    configure_logging("DEBUG", True)  # every line the app writes (loggers not yet cached by other tests)
    secrets = {name: token for name, token in api.tokens.items()}
    hashes = {f"hash of {name}": hash_key(token, PEPPER) for name, token in secrets.items()}
    answers: list[str] = []
    with api.client:
        capfd.readouterr()  # start-up lines are checked too, below, with the rest
        send = api.client.request

        def call(method, path, role=None, token=None, **kw):
            headers = kw.pop("headers", {})
            if role is not None:
                headers["Authorization"] = f"Bearer {api.tokens[role]}"
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            r = send(method, path, headers=headers, **kw)
            answers.append(r.text)
            return r

        assert call("PUT", f"/v1/members/{MEMBER}", "admin", json={"district": "seo"}).status_code == 201
        put_merchant(api, "shop")
        body = {"topup_id": "t1", "member_id": MEMBER, "amount": 50_000, "occurred_at": at("2025-09-01")}
        assert call("POST", "/v1/topups", "card-app", json=body).status_code == 201
        pay = {"payment_id": "p1", "member_id": MEMBER, "merchant_id": "shop", "amount": 10_000,
               "occurred_at": at("2025-09-02")}
        assert call("POST", "/v1/payments", "card-app", json=pay).status_code == 201
        assert call("POST", "/v1/payments", "card-app", json={**pay, "amount": 9_999}).status_code == 409
        call("GET", f"/v1/members/{MEMBER}/balance", "card-app")
        call("GET", f"/v1/members/{MEMBER}/transactions?limit=100000", "card-app")
        # bad keys, and secrets pasted where they do not belong
        call("POST", "/v1/payments", token=secrets["admin"] + "x", json=pay)
        call("POST", "/v1/payments", token="eum_" + "k" * 40, json=pay)
        call("POST", "/v1/payments", "admin", json=pay)  # wrong role
        call("POST", "/v1/payments", "card-app", json={**pay, "member_id": secrets["admin"]})
        call("POST", "/v1/payments", "card-app", json={**pay, "payment_id": "p2", "note": secrets["finance"]})
        call("POST", "/v1/payments", "card-app", content=("{" + secrets["auditor"]).encode(),
             headers={"content-type": "application/json"})
        call("POST", "/v1/policies", "policy-editor", content=f"policy_id: [{secrets['admin']}".encode(),
             headers={"content-type": "application/yaml"})
        call("PUT", f"/v1/members/{MEMBER}", "admin", json={"district": secrets["card-app"]})
        # a crash, and the rate limit
        monkeypatch.setattr("ledger.queries.member_balance",
                            lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a planted failure")))
        assert call("GET", f"/v1/members/{MEMBER}/balance", "auditor").status_code == 500
        # database errors whose text quotes a row's values: an outage (503) and a constraint (500)
        for orig, status in ((psycopg.OperationalError(f"server closed the connection reading {MEMBER}"), 503),
                             (psycopg.errors.UniqueViolation(f"Key (member_id)=({MEMBER}) already exists"), 500)):
            wrapped = sa_exc.DBAPIError.instance("SELECT 1 WHERE member_id = %(m)s", {"m": MEMBER}, orig,
                                                 psycopg.Error)
            monkeypatch.setattr("ledger.queries.member_balance",
                                lambda *a, _e=wrapped, **k: (_ for _ in ()).throw(_e))
            assert call("GET", f"/v1/members/{MEMBER}/balance", "auditor").status_code == status
        statuses = [call("GET", f"/v1/members/{MEMBER}/transactions", "card-app").status_code for _ in range(12)]
        assert 429 in statuses
    out = capfd.readouterr()
    logged = out.out + out.err
    assert "request.database_unavailable" in logged and "UniqueViolation" in logged
    assert "request.crashed" in logged and "/v1/members/{member_id}/balance" in logged  # the logs did run
    forbidden = {**{f"key of {n}": t for n, t in secrets.items()}, **hashes, "pepper": PEPPER, "member id": MEMBER}
    leaks = [what for what, value in forbidden.items() if value in logged]
    assert not leaks, f"in the logs: {leaks}"
    # Answers echo no secret either (a caller's own member id in its own answers is its data).
    echoed = [what for what, value in forbidden.items() if what != "member id" and any(value in a for a in answers)]
    assert not echoed, f"in answers: {echoed}"


class _Recorder:
    def __init__(self):
        self.lines: list[tuple[str, dict]] = []

    def info(self, event, **kw):
        self.lines.append((event, kw))

    warning = info


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("mode", ["staff", "all", "off"])
def test_the_access_log_names_each_staff_call_and_its_key_not_the_card_apps(db_url, monkeypatch, mode):
    """Who called what, when, with which key: every staff call, refused ones and unknown
    keys too, by route template (no member id) and key id (never the key)."""
    recorder = _Recorder()
    monkeypatch.setattr("api.app.log", recorder)
    api = make_api(db_url, access_log=mode)
    with api.client:
        assert api.put(f"/v1/members/{MEMBER}", {"district": "seo"}).status_code == 201
        assert api.get(f"/v1/members/{MEMBER}/balance", role="card-app").status_code == 200
        assert api.put("/v1/merchants/shop", {"name": "S"}, role="finance").status_code == 403
        assert api.get("/v1/audit-log", role="card-app").status_code == 403  # a card-app key trying staff routes
        assert api.client.get("/v1/audit-log", headers={"Authorization": "Bearer eum_nope_nope"}).status_code == 401
        assert api.client.get("/healthz").status_code == 200
        # a staff call that fails: it had been only a `request` warning, naming no caller
        monkeypatch.setattr("ledger.queries.member_balance",
                            lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a planted failure")))
        assert api.get(f"/v1/members/{MEMBER}/balance", role="auditor").status_code == 500
    access = [kw for event, kw in recorder.lines if event == "access"]
    seen = [(a["method"], a["path"], a["status"], a["role"]) for a in access]
    staff = [("PUT", "/v1/members/{member_id}", 201, "admin"), ("PUT", "/v1/merchants/{merchant_id}", 403, "finance"),
             ("GET", "/v1/audit-log", 403, "card-app"), ("GET", "/v1/audit-log", 401, None),
             ("GET", "/v1/members/{member_id}/balance", 500, "auditor")]
    requests = [(kw["path"], kw["status"]) for event, kw in recorder.lines if event == "request"]
    if mode == "off":
        assert seen == [] and requests == [("/v1/members/{member_id}/balance", 500)]  # a 5xx is logged all the same
        return
    assert requests == []
    card = [("GET", "/v1/members/{member_id}/balance", 200, "card-app")] if mode == "all" else []
    assert seen == staff[:1] + card + staff[1:]
    keys = {a["role"]: a["key_id"] for a in access if a["role"]}
    assert keys["card-app"] == api.tokens["card-app"].split("_")[1]
    assert keys["admin"] == api.tokens["admin"].split("_")[1] and keys["finance"] == api.tokens["finance"].split("_")[1]
    assert all(token not in str(access) for token in api.tokens.values()) and MEMBER not in str(access)


def _json_lines(text: str) -> list[dict]:
    import json

    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def test_a_crash_answer_and_its_crash_line_carry_the_request_id(sqlite_url, capfd, monkeypatch):
    """The 500 of an unexpected exception had no X-Request-Id, and its `request.crashed`
    line (the traceback) no request id: Starlette's error middleware, outside Edge,
    answered it after Edge had cleared the log context (the observability audit)."""
    from eum.logs import configure_logging

    api = make_api(sqlite_url)
    configure_logging("INFO", True)
    with api.client:
        assert api.put("/v1/members/m1", {"district": "seo"}).status_code == 201
        capfd.readouterr()
        monkeypatch.setattr("ledger.queries.member_balance",
                            lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a planted failure")))
        r = api.client.get("/v1/members/m1/balance", headers={**api.h("auditor"), "X-Request-Id": "rid-crash-1"})
    assert r.status_code == 500 and r.json()["code"] == "internal_error"
    assert r.headers["x-request-id"] == "rid-crash-1" and r.headers["cache-control"] == "no-store"
    lines = _json_lines(capfd.readouterr().out)
    crashed = [d for d in lines if d.get("event") == "request.crashed"]
    assert len(crashed) == 1 and crashed[0]["request_id"] == "rid-crash-1", crashed
    assert "a planted failure" in crashed[0]["exception"] and crashed[0]["path"] == "/v1/members/{member_id}/balance"
    access = [d for d in lines if d.get("event") == "access"]
    assert [(d["status"], d["request_id"]) for d in access] == [(500, "rid-crash-1")]


def test_not_ready_answers_are_logged_counted_and_carry_a_request_id(capfd, monkeypatch):
    """A worker that has not reached the book answers 503 not_ready before the middleware
    stack: that answer had no request id, no log line and no count, the one case an
    operator most needs to see (the observability audit)."""
    from fastapi.testclient import TestClient

    from api import metrics
    from api.app import create_app
    from eum.logs import configure_logging
    from eum.settings import Settings
    from tests.conftest import POLICIES

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    settings = Settings(database_url="postgresql://postgres@127.0.0.1:1/nothing", environment="test",
                        policies_dir=POLICIES, db_connect_timeout_s=2)
    route = "/v1/members/{member_id}/balance"
    with TestClient(create_app(settings), raise_server_exceptions=True) as client:
        configure_logging("INFO", True)
        capfd.readouterr()
        before = metrics.REQUESTS.labels(route, "503")._value.get()
        r = client.get("/v1/members/m-1/balance", headers={"X-Request-Id": "rid-nr-1"})
        counted = metrics.REQUESTS.labels(route, "503")._value.get() - before
    assert r.status_code == 503 and r.json()["code"] == "not_ready" and r.headers["retry-after"] == "1"
    assert r.headers["x-request-id"] == "rid-nr-1" and counted == 1
    logged = [d for d in _json_lines(capfd.readouterr().out) if d.get("event") == "request"]
    assert [(d["path"], d["status"], d["code"], d["request_id"]) for d in logged] == \
        [(route, 503, "not_ready", "rid-nr-1")]
    assert "m-1" not in str(logged)


def test_a_body_refused_by_its_content_length_is_logged_and_counted(sqlite_url, monkeypatch):
    """A 413 for a Content-Length over the limit was answered before Edge's log and count;
    the same body streamed without one had both (the observability audit). Both are under
    the route's template (the first fix counted it as `unmatched`: its review)."""
    from api import metrics

    recorder = _Recorder()
    monkeypatch.setattr("api.app.log", recorder)
    api = make_api(sqlite_url)
    big = b'{"district": "seo", "x": "' + b"a" * 70_000 + b'"}'
    route = "/v1/members/{member_id}"
    with api.client:
        before = metrics.REQUESTS.labels(route, "413")._value.get()
        r = api.client.put("/v1/members/m1", content=big, headers={**api.h("admin"), "Content-Type": "application/json",
                                                                   "X-Request-Id": "rid-413"})
        streamed = api.client.put("/v1/members/m1", content=iter([big]),  # no Content-Length: refused as it streams
                                  headers={**api.h("admin"), "Content-Type": "application/json"})
        counted = metrics.REQUESTS.labels(route, "413")._value.get() - before
    assert r.status_code == streamed.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert r.headers["x-request-id"] == "rid-413" and counted == 2  # both under the route's template
    assert [(kw["method"], kw["path"], kw["status"]) for event, kw in recorder.lines if event == "access"] == \
        [("PUT", route, 413)] * 2


def test_two_workers_writing_one_stdout_give_whole_lines():
    """`eum serve`'s workers share one stdout, and the image runs unbuffered
    (PYTHONUNBUFFERED=1): each line must reach it in one write. structlog's PrintLogger
    (`print(line, flush=True)`) wrote the line and its newline apart, so another
    worker's line landed between them and a JSON-lines collector lost both (the keys
    audit of 2026-12-06i: 64 of 21,717 lines of a two-worker run, access lines among
    them)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import structlog\n"
              "from eum.logs import configure_logging\n"
              "configure_logging('INFO', True)\n"
              "log = structlog.get_logger('api.access')\n"
              "for i in range(4000):\n"
              "    log.info('access', method='POST', path='/v1/payments', status=201, ms=1.0, n=i)\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    read_fd, write_fd = os.pipe()
    try:
        workers = [subprocess.Popen([sys.executable, "-c", script], stdout=write_fd, env=env) for _ in range(2)]
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        out = pipe.read().decode()
    assert all(worker.wait(timeout=60) == 0 for worker in workers)
    lines = out.split("\n")
    assert lines[-1] == ""

    def whole(line: str) -> bool:
        try:
            return isinstance(json.loads(line), dict)
        except ValueError:  # two lines run together, or an empty one
            return False

    broken = [line for line in lines[:-1] if not whole(line)]
    assert not broken and len(lines) - 1 == 8000, (len(broken), broken[:2])


def _planted(orig: Exception):
    """`orig` as SQLAlchemy raises it from a statement (hide_parameters: no values in it)."""
    return sa_exc.DBAPIError.instance("INSERT INTO payments ...", None, orig, psycopg.Error, hide_parameters=True)


def test_the_books_retry_and_failure_lines_name_a_database_error_by_its_kind_not_its_detail(sqlite_url, capfd,
                                                                                           monkeypatch):
    """The book's own lines (`batch.integrity_retry`, `batch.failed`, and the bulk writer's)
    logged `str(error)`, which on PostgreSQL carries the error's DETAIL: `Key (...)=(...)`
    or `Failing row contains (...)`, the row's values, a member id among them. They name
    the kind now (class, SQLSTATE, constraint), as the request's own lines already did."""
    from eum.logs import configure_logging
    from ledger.book import Book
    from tests.book_helpers import put_merchant, topup

    detail = f"Key (account_id)=(member/{MEMBER}/charged) already exists."
    unique = psycopg.errors.UniqueViolation(f'duplicate key value violates unique constraint "accounts_pkey"\n'
                                            f"DETAIL:  {detail}")
    check = psycopg.errors.CheckViolation(f'new row for relation "accounts" violates check constraint '
                                          f'"ck_accounts_floor"\nDETAIL:  Failing row contains (member/{MEMBER}/'
                                          "charged, liability, -1).")
    api = make_api(sqlite_url)
    configure_logging("INFO", True)
    # A fresh logger for the book: its module's binds the level of the configuration it was
    # first used under (`cache_logger_on_first_use`), WARNING where an earlier test of the
    # same process logged through it, and the retry line (INFO) was then dropped.
    monkeypatch.setattr("ledger.book.log", structlog.get_logger("ledger.book"))
    with api.client:
        assert api.put(f"/v1/members/{MEMBER}", {"district": "seo"}).status_code == 201
        put_merchant(api, "shop")
        topup(api, "t1", MEMBER, 50_000, at("2025-09-01"))
        real_run = Book._run
        plan: list[Exception] = []

        def run(self, *args, **kwargs):
            if plan:
                raise _planted(plan.pop(0))
            return real_run(self, *args, **kwargs)

        monkeypatch.setattr(Book, "_run", run)
        capfd.readouterr()
        pay = {"payment_id": "p1", "member_id": MEMBER, "merchant_id": "shop", "amount": 1_000,
               "occurred_at": at("2025-09-02")}
        plan.append(unique)  # a racing duplicate: retried, and the retry goes through
        assert api.post("/v1/payments", pay).status_code == 201
        plan.extend([check] * 10)  # every attempt: the batch fails, 503
        assert api.post("/v1/payments", {**pay, "payment_id": "p2"}).status_code == 503
    lines = _json_lines(capfd.readouterr().out)
    events = {d.get("event") for d in lines}
    assert {"batch.integrity_retry", "batch.failed"} <= events, events
    logged = str(lines)
    assert MEMBER not in logged and "Failing row" not in logged and "Key (" not in logged, logged
    assert "UniqueViolation" in logged and "CheckViolation" in logged  # the kind is still told


@pytest.mark.postgres
def test_uvicorns_own_lines_are_json_lines_too(pg_url, tmp_path):
    """`eum serve --workers 2` as an operator runs it (stdout and stderr in one stream,
    as Docker keeps them): a worker killed and replaced, then SIGTERM to the supervisor.
    uvicorn wrote its own lines (`INFO:     Child process [N] died`, `Received SIGTERM,
    exiting.`) as plain text on stderr beside the JSON lines, so a JSON-lines collector
    could not parse the very lines that say a worker died. Every line is a JSON object
    now, uvicorn's with their `logger`."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    from loadtests import harness as h

    port = h.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EUM_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"EUM_DATABASE_URL": pg_url, "EUM_LOG_LEVEL": "INFO", "EUM_POLICIES_DIR": str(h.REPO_ROOT / "policies"),
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])})
    out = tmp_path / "service.log"
    with open(out, "wb") as log:
        service = subprocess.Popen([sys.executable, "-m", "eum", "serve", "--host", "127.0.0.1", "--port", str(port),
                                    "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        def wait(predicate, what: str, timeout_s: float = 120) -> None:
            deadline = time.monotonic() + timeout_s
            while not predicate():
                assert service.poll() is None and time.monotonic() < deadline, (what, out.read_text()[-3000:])
                time.sleep(0.1)

        wait(lambda: ready() and len(h.worker_pids_of(service.pid)) == 2, "two workers ready")
        killed = h.kill9_worker(service.pid)
        wait(lambda: killed not in h.worker_pids_of(service.pid) and len(h.worker_pids_of(service.pid)) == 2
             and ready(), "a worker in the killed one's place")
        os.kill(service.pid, signal.SIGTERM)
        assert service.wait(timeout=60) == 0
    finally:
        if service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()
    lines = [line for line in out.read_text().splitlines() if line.strip()]

    def parsed(line: str):
        try:
            value = json.loads(line)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    assert not [line for line in lines if parsed(line) is None], [line for line in lines if parsed(line) is None][:5]
    uvicorns = {(entry["logger"], entry["level"], entry["event"]) for entry in map(parsed, lines)
                if entry.get("logger", "").startswith("uvicorn")}
    assert ("uvicorn.error", "info", f"Child process [{killed}] died") in uvicorns, sorted(uvicorns)
    assert ("uvicorn.error", "info", "Received SIGTERM, exiting.") in uvicorns, sorted(uvicorns)


@pytest.mark.postgres
def test_the_start_line_names_the_database_without_its_password(pg_url, monkeypatch):
    """`service.started` named the database as the URL past its last `@`: a password in
    the URL's query (`?password=...`, as libpq and SQLAlchemy take it) was logged whole
    by every worker at every start (operations audit, 2026-12-07). It names the host,
    port and database now."""
    from api import app as app_module

    started = []

    class Spy:
        def info(self, event, **fields):
            started.append((event, fields))

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(app_module, "log", Spy())
    secret = "db-password-in-the-query-5e1f"
    api = make_api(f"{pg_url}?password={secret}&application_name=eum-log-test")
    with api.client:
        assert api.client.get("/readyz").status_code == 200
    [(_, fields)] = [entry for entry in started if entry[0] == "service.started"]
    assert secret not in repr(fields), fields
    host_and_database = pg_url.rsplit("@", 1)[1]  # 127.0.0.1:5432/eum_test_...
    assert fields["database"] == host_and_database, fields
