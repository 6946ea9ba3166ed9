"""Budget limits with a second person (`ledger.budget_requests`): one person asks
(`POST /v1/budget-requests`), a different person approves, which sets the limit as
`PUT /v1/budgets/...` does; with EUM_BUDGET_APPROVAL=second_person the PUT is refused.
A refused step changes nothing, and each step is in the audit log with who took it."""

from __future__ import annotations

import pytest

from tests.book_helpers import assert_problem, budget_rows, pay, put_member, put_merchant, topup
from tests.conftest import at, make_api
from tests.test_maker_checker import new_key, new_key_and_id, revoke


def _ask(api, source: str = "city", period: str = "2025-09", amount: int = 9_000, role: str = "policy-editor",
         headers: dict | None = None, **extra):
    body = {"source": source, "period": period, "amount": amount, **extra}
    if headers is not None:
        return api.client.post("/v1/budget-requests", json=body, headers=headers)
    return api.post("/v1/budget-requests", body, role=role)


def _limit(api, source: str = "city", period: str = "2025-09") -> int | None:
    row = budget_rows(api).get((source, period))
    return None if row is None else row["limit"]


def _audit(api, action: str) -> list[dict]:
    entries = api.get("/v1/audit-log", role="auditor", params={"action": action}).json()["items"]
    return [e for e in entries if e["action"] == action]


def test_a_limit_asked_for_by_one_person_is_set_when_another_approves(api):
    asked = _ask(api, amount=9_000, reason="supplementary budget (추경) 2025-2")
    assert asked.status_code == 201, asked.text
    request = asked.json()
    assert (request["status"], request["amount"], request["limit_before"], request["committed"]) == (
        "pending", 9_000, None, 0)
    assert request["requested_by"].startswith("test policy-editor")
    assert _limit(api) is None  # nothing set until approved
    (row,) = [b for b in api.get("/v1/budgets", role="finance").json()["budgets"]
              if (b["source"], b["period"]) == ("city", "2025-09")]
    assert row["pending_request"] == {"request_id": request["request_id"], "amount": 9_000,
                                      "requested_by": request["requested_by"]}
    listed = api.get("/v1/budget-requests?status=pending", role="auditor").json()
    assert [r["request_id"] for r in listed["items"]] == [request["request_id"]] and listed["next_after"] is None

    approved = api.post(f"/v1/budget-requests/{request['request_id']}/approve", role="policy-approver")
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert body["status"] == "approved" and body["decided_by"].startswith("test policy-approver")
    assert body["budget"] == {"source": "city", "period": "2025-09", "limit": 9_000, "committed": 0,
                              "remaining": 9_000}
    assert _limit(api) == 9_000
    assert all(b["pending_request"] is None for b in api.get("/v1/budgets", role="finance").json()["budgets"])
    (entry,) = _audit(api, "budget.request")
    assert entry["detail"]["request_id"] == request["request_id"] and entry["detail"]["limit"] == 9_000
    assert entry["detail"]["reason"] == "supplementary budget (추경) 2025-2"
    (put,) = _audit(api, "budget.put")
    assert put["actor"].startswith("test policy-approver") and put["object_id"] == "city/2025-09"
    assert put["detail"]["request_id"] == request["request_id"]
    assert put["detail"]["requested_by"] == request["requested_by"]
    assert (put["detail"]["limit"], put["detail"]["before"]) == (9_000, None)
    again = api.post(f"/v1/budget-requests/{request['request_id']}/approve", role="finance")
    assert_problem(again, 409, "budget_request_decided")


def test_the_person_who_asked_cannot_approve_with_any_key(api):
    kim = new_key(api, "Kim Min-jun", "policy-editor")
    kim_finance = new_key(api, "kim min‐jun", "finance")  # the same name: another role, a look-alike hyphen
    request = _ask(api, headers=kim).json()
    for headers in (kim, kim_finance):
        refused = api.client.post(f"/v1/budget-requests/{request['request_id']}/approve", headers=headers)
        assert_problem(refused, 403, "self_approval")
    assert _limit(api) is None
    assert api.get("/v1/budget-requests?status=pending", role="auditor").json()["items"][0]["status"] == "pending"
    assert not _audit(api, "budget.put")
    lee = new_key(api, "Lee Seo-yeon", "finance")
    assert api.client.post(f"/v1/budget-requests/{request['request_id']}/approve", headers=lee).status_code == 200
    assert _limit(api) == 9_000


def test_a_request_whose_author_key_was_revoked_is_not_approved(api):
    key_id, kim = new_key_and_id(api, "Kim", "policy-editor")
    request = _ask(api, headers=kim).json()
    revoke(api, key_id)
    refused = api.post(f"/v1/budget-requests/{request['request_id']}/approve", role="policy-approver")
    assert_problem(refused, 409, "author_key_revoked")
    assert _limit(api) is None


def test_one_pending_request_per_budget(api):
    first = _ask(api).json()
    second = _ask(api, amount=12_000, role="finance")
    assert_problem(second, 409, "budget_request_pending")
    assert second.json()["request_id"] == first["request_id"]
    assert _ask(api, period="2025-10").status_code == 201  # another budget
    assert _ask(api, source="national").status_code == 201
    withdrawn = api.post(f"/v1/budget-requests/{first['request_id']}/withdraw", {"reason": "wrong month"},
                         role="policy-approver")
    assert withdrawn.status_code == 200 and withdrawn.json()["status"] == "withdrawn", withdrawn.text
    assert _audit(api, "budget.request_withdrawn")[0]["detail"]["reason"] == "wrong month"
    assert _ask(api, amount=12_000, role="finance").status_code == 201  # the budget is free again
    assert_problem(api.post(f"/v1/budget-requests/{first['request_id']}/approve", role="policy-approver"),
                   409, "budget_request_decided")
    assert _limit(api) is None


def test_an_approval_after_the_limit_changed_is_refused(api):
    request = _ask(api, amount=9_000).json()
    assert api.put("/v1/budgets/city/2025-09", {"amount": 50_000}, role="finance").status_code == 200
    refused = api.post(f"/v1/budget-requests/{request['request_id']}/approve", role="policy-approver")
    body = assert_problem(refused, 409, "budget_changed_since_request")
    assert (body["limit_before"], body["limit"]) == (None, 50_000)
    assert _limit(api) == 50_000  # the approver's 9,000 would undo a change it never read


def test_a_limit_below_what_is_committed_is_refused_when_asked_and_when_approved(api):
    put_merchant(api, "shop")
    for member in ("m1", "m2"):
        put_member(api, member)
        topup(api, f"t-{member}", member, 200_000, at("2025-09-10"))
    pay(api, "p1", "m1", "shop", 100_000, at("2025-09-11"))
    committed = budget_rows(api)[("city", "2025-09")]["committed"]
    assert committed > 0
    assert_problem(_ask(api, amount=committed - 1), 409, "budget_below_committed")
    request = _ask(api, amount=committed).json()  # room for nothing more: allowed
    pay(api, "p2", "m2", "shop", 100_000, at("2025-09-11"))  # commits more before the approval
    refused = api.post(f"/v1/budget-requests/{request['request_id']}/approve", role="policy-approver")
    assert_problem(refused, 409, "budget_below_committed")
    assert _limit(api) is None
    assert api.get("/v1/budget-requests?status=pending", role="auditor").json()["items"][0]["request_id"] == \
        request["request_id"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_bad_requests_change_nothing(api):
    for body in ({"source": "seoul", "period": "2025-09", "amount": 1}, {"source": "city", "period": "2025-13",
                                                                         "amount": 1},
                 {"source": "city", "period": "2025-09", "amount": -1}, {"source": "city", "period": "2025-09"},
                 {"source": "city", "period": "2025-09", "amount": 1, "extra": 1}):
        assert_problem(api.post("/v1/budget-requests", body, role="finance"), 422)
    assert_problem(api.post("/v1/budget-requests/budget-nope/approve", role="finance"), 404,
                   "budget_request_not_found")
    assert_problem(api.post("/v1/budget-requests/budget-nope/withdraw", role="finance"), 404,
                   "budget_request_not_found")
    assert api.get("/v1/budget-requests", role="auditor").json() == {"items": [], "next_after": None}
    assert_problem(api.get("/v1/budget-requests?limit=1001", role="auditor"), 422, "page_size_too_large")
    assert_problem(api.get("/v1/budget-requests?after=budget-nope", role="auditor"), 404, "budget_request_not_found")
    assert_problem(api.post("/v1/budget-requests", {"source": "city", "period": "2025-09", "amount": 1},
                            role="card-app"), 403, "forbidden")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_requests_are_listed_newest_first_a_page_at_a_time(api):
    made = [_ask(api, period=f"2025-{month:02d}").json()["request_id"] for month in range(1, 8)]
    api.post(f"/v1/budget-requests/{made[2]}/approve", role="policy-approver")
    seen, after = [], None
    while True:
        page = api.get("/v1/budget-requests?limit=3" + (f"&after={after}" if after else ""), role="auditor").json()
        seen += [r["request_id"] for r in page["items"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == made[::-1]
    approved = api.get("/v1/budget-requests?status=approved", role="auditor").json()["items"]
    assert [r["request_id"] for r in approved] == [made[2]]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_with_second_person_approval_required_the_put_is_refused(db_url):
    api = make_api(db_url, budget_approval="second_person")
    with api.client:
        refused = api.put("/v1/budgets/city/2025-09", {"amount": 9_000}, role="finance")
        body = assert_problem(refused, 403, "second_person_required")
        assert "/v1/budget-requests" in body["detail"]
        assert _limit(api) is None and not _audit(api, "budget.put")
        request = _ask(api, role="finance").json()
        assert api.post(f"/v1/budget-requests/{request['request_id']}/approve",
                        role="policy-editor").status_code == 200
        assert _limit(api) == 9_000


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_racing_requests_and_approvals_of_one_budget_take_turns(api):
    """Four people ask for one budget's limit at once, then four approve one request at
    once: one request is taken and the others are 409 `budget_request_pending`; one
    approval sets the limit and the others are 409 `budget_request_decided`. Never a
    500 (a unique violation), never two limits set."""
    import threading

    people = [new_key(api, f"person {n}", "finance") for n in range(8)]
    # the budget's row exists: its first insert would make the racers wait for each other anyway
    assert api.put("/v1/budgets/city/2025-09", {"amount": 100_000}, role="finance").status_code == 200

    def race(call, who) -> list:
        barrier, answers = threading.Barrier(len(who)), [None] * len(who)

        def one(n):
            barrier.wait()
            answers[n] = call(who[n])

        threads = [threading.Thread(target=one, args=(n,)) for n in range(len(who))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return answers

    asked = race(lambda h: _ask(api, amount=9_000, headers=h), people[:4])
    assert sorted(r.status_code for r in asked) == [201, 409, 409, 409], [r.text for r in asked]
    assert {r.json()["code"] for r in asked if r.status_code == 409} == {"budget_request_pending"}
    (taken,) = [r.json()["request_id"] for r in asked if r.status_code == 201]
    approved = race(lambda h: api.client.post(f"/v1/budget-requests/{taken}/approve", headers=h), people[4:])
    assert sorted(r.status_code for r in approved) == [200, 409, 409, 409], [r.text for r in approved]
    assert {r.json()["code"] for r in approved if r.status_code == 409} == {"budget_request_decided"}
    assert _limit(api) == 9_000 and len(_audit(api, "budget.put")) == 2  # the PUT's, then the approval's
