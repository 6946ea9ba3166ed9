"""No secrets or personal data in logs (docs/design.md, Logs): requests with keys,
member ids and bad payloads go through the whole app with every log line captured at
DEBUG where the logger allows, and no API key, key hash, pepper or member id appears — nor in any answer that
is not the caller's own data."""

from __future__ import annotations

import psycopg
import pytest
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
