"""A create sent twice at once (a client's retry racing its first try) answers as it
would one after the other: never a 500 from the loser's primary-key violation (the fuzz
audit: four identical grant programs or corrections at once, one 201 and three 500s).
PostgreSQL, where the two inserts can overlap."""
from __future__ import annotations

import threading

import pytest
import yaml

from tests.book_helpers import assert_book_ok, put_member, put_merchant, topup
from tests.conftest import POLICIES, at, make_api

pytestmark = pytest.mark.postgres


def _at_once(n: int, call):
    out, barrier = [None] * n, threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        out[i] = call()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def test_one_grant_program_created_four_times_at_once_is_one_201_and_replays(pg_url):
    program = yaml.safe_load((POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text())
    program = {**program, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    api = make_api(pg_url, rate_limits={})
    with api.client:
        for k in range(5):
            body = {**program, "program_id": f"race-{k}"}
            answers = _at_once(4, lambda: api.post("/v1/grant-programs", body, role="policy-editor"))
            assert sorted(r.status_code for r in answers) == [200, 200, 200, 201], [r.text for r in answers]
            assert {r.json()["status"] for r in answers} == {"draft"}
            assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 3
            other = {**body, "name": "another"}
            assert api.post("/v1/grant-programs", other, role="policy-editor").status_code == 409
        log = api.get("/v1/audit-log?action=grant_program.create", role="auditor").json()
        assert len([e for e in log["items"] if e["object_id"].startswith("race-")]) == 5, log


def test_one_correction_proposed_four_times_at_once_is_one_201_and_409s(pg_url):
    # Four heavy slots: the race here is four proposals reaching the book together, which
    # the default one slot per worker would turn into one 201 and three 503s before it
    # (tests/test_heavy_jobs.py); several workers still race so.
    api = make_api(pg_url, rate_limits={}, heavy_jobs_at_once=4)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "shop")
        topup(api, "t1", "m1", 100_000, at("2025-09-10"))
        assert api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop",
                                         "amount": 10_000, "occurred_at": at("2025-09-15")}).status_code == 201
        for k in range(5):
            body = {"correction_id": f"cr-{k}", "wrong_policy_id": "incheon-2025-09",
                    "right_policy_id": "incheon-2025-09", "from": at("2025-09-01"), "to": at("2025-09-30")}
            answers = _at_once(4, lambda: api.post("/v1/corrections", body, role="policy-editor"))
            assert sorted(r.status_code for r in answers) == [201, 409, 409, 409], [r.text for r in answers]
            assert {r.json()["code"] for r in answers if r.status_code == 409} == {"conflict"}
        log = api.get("/v1/audit-log?action=correction.propose", role="auditor").json()
        assert len(log["items"]) == 5, log
        assert_book_ok(api)
