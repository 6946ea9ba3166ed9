"""A read answer made of several statements is one state of the book, whatever commits
while it is made. On PostgreSQL under READ COMMITTED each statement took its own
snapshot: found by polling GET balance during top-ups (charged 70,000 beside a month
topped up 60,000) and GET grant-program during grant spending (disbursed ≠ held + spent
+ returned). Here the commit is put between two of the answer's statements, every time."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import event

from ledger.book import Pay, TopUp
from rules.timeutil import to_us
from tests.book_helpers import approve_program, put_member, put_merchant, topup
from tests.conftest import at, make_api


def _us(day: str) -> int:
    return to_us(dt.datetime.fromisoformat(at(day)))


def _commit_after(api, marker: str, commands: list) -> list:
    """Arm a hook: right after the first read-only statement whose SQL holds `marker`,
    the book commits `commands` (on its own connection), once. Returns their outcomes,
    filled when it has run."""
    engine, outcomes = api.services.engine, []

    def after(conn, _cursor, statement, _parameters, _context, _many):
        if not outcomes and conn.get_execution_options().get("readonly") and marker in statement:
            outcomes.extend(api.services.book.execute(commands))

    event.listen(engine, "after_cursor_execute", after)
    return outcomes


def test_a_balance_is_read_in_one_snapshot(db_url):
    api = make_api(db_url)
    with api.client:
        put_member(api, "m1")
        topup(api, "t1", "m1", 10_000, at("2026-01-05"))
        outcomes = _commit_after(api, "FROM member_months", [TopUp("t2", "m1", 10_000, _us("2026-01-05"), "h-t2")])
        r = api.get("/v1/members/m1/balance", params={"month": "2026-01"})
        assert r.status_code == 200, r.text
        assert outcomes and outcomes[0].error is None and outcomes[0].body["status"] == "approved"
        answer = r.json()
        # Read before the top-up committed, both halves: the month and the balances agree.
        assert (answer["balances"]["charged"], answer["month"]["topped_up"]) == (10_000, 10_000), answer
        after = api.get("/v1/members/m1/balance", params={"month": "2026-01"}).json()
        assert (after["balances"]["charged"], after["month"]["topped_up"]) == (20_000, 20_000), after


def test_a_grant_programs_money_is_read_in_one_snapshot(db_url):
    api = make_api(db_url)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "shop")
        program = {"program_id": "g", "name": "g", "valid_from": "2026-01-01", "valid_until": "2027-12-31",
                   "funding": {"city": 10_000}}
        assert api.post("/v1/grant-programs", program, role="policy-editor").status_code == 201
        approve_program(api, "g")
        r = api.post("/v1/grant-programs/g/disbursements", {"disbursement_id": "d1", "member_id": "m1",
                                                            "amount": 50_000, "occurred_at": at("2026-01-02")},
                     role="policy-editor")
        assert r.status_code == 201, r.text
        # A payment of grant money commits after the answer summed the lots' legs by kind,
        # before it read what members hold.
        outcomes = _commit_after(api, "GROUP BY ledger_txns.kind",
                                 [Pay("p1", "m1", "shop", 1_000, _us("2026-01-05"), "h-p1")])
        r = api.get("/v1/grant-programs/g", role="finance")
        assert r.status_code == 200, r.text
        assert outcomes and outcomes[0].error is None and outcomes[0].body["status"] == "approved"
        money = r.json()["money"]
        assert money["disbursed"] == money["held_by_members"] + money["spent_net_of_refunds"] + money[
            "returned_to_funders"], money
        assert (money["held_by_members"], money["spent_net_of_refunds"]) == (50_000, 0), money
