"""Corrections against each other and against live payments, on PostgreSQL, at once (the
race audit of 2026-12-06d, its reproductions): one correction is approved and posted at
a time (`ledger.corrections._posting_lock`), and a proposal takes its time once the
writes in flight have ended (`_plan_time`). Each case ends by correcting the month to
the last right policy and checking that every payment holds what that policy gives."""
from __future__ import annotations

import datetime as dt
import threading
import time

import orjson
import pytest
from sqlalchemy import select

from ledger import corrections
from ledger import schema as s
from ledger.book import Book, cashback_held
from ledger.commands import Correct, Pay
from ledger.keys import Principal
from rules.simulate import evaluate_frame
from rules.timeutil import to_us
from settlement.simulate import approved_corrections, load_range
from tests.book_helpers import assert_book_ok, assert_months_hold_their_payments
from tests.conftest import at, make_api
from tests.test_corrections_start import _with_cafe, capped_policies, pharmacy_and_cafe

pytestmark = pytest.mark.postgres
FROM, TO = at("2026-11-01", "00:00:00"), at("2026-12-01", "00:00:00")
RIGHT = {"A": "pharm-15", "B": "cafe-15", "X": "pharm-15", "Y": "pharm-15"}


def _us(text):
    return to_us(dt.datetime.fromisoformat(text))


def _holdings(api, right_policy_id):
    """payment -> (what it holds, what right_policy_id over all November gives it, book order)."""
    sv = api.services
    _, right = corrections._timelines(sv.engine, sv.timeline, right_policy_id, _us(FROM), _us(TO))(())
    with sv.reader.connect() as conn:
        loaded = load_range(conn, _us(FROM), _us(TO))
        rows = conn.execute(select(s.payments.c.payment_id, s.payments.c.detail, s.payments.c.refund_state)
                            .where(s.payments.c.status == "approved")).all()
    ev = evaluate_frame(right, loaded.payments, loaded.start, as_given=True)
    ids = loaded.payments["payment_id"].to_list()
    gives = {ids[row]: won for row, won in ev.payments.select("row", "cashback_won").iter_rows()}
    return {pid: (sum(cashback_held(orjson.loads(d), orjson.loads(st or "{}")).values()), gives.get(pid, 0))
            for pid, d, st in rows}


@pytest.fixture
def api(pg_url, tmp_path):
    app = make_api(pg_url, policies_dir=capped_policies(tmp_path))
    with app.client:
        pharmacy_and_cafe(app, topup=500_000, amount=50_000)
        for d in (_with_cafe("pharm-15", pharmacy_bp=1500), _with_cafe("cafe-15", cafe_bp=1500)):
            assert app.post("/v1/policies", d, role="policy-editor").status_code == 201
        yield app


def _propose(api, cid, wrong, right, start: str = "2026-11-01", end: str = "2026-12-01"):
    r = api.post("/v1/corrections", {"correction_id": cid, "wrong_policy_id": wrong, "right_policy_id": right,
                                     "from": at(start, "00:00:00"), "to": at(end, "00:00:00")},
                 role="policy-editor")
    assert r.status_code == 201, r.text
    return r.json()


def _approve(api, cid):
    return corrections.approve_and_post(api.services.engine, api.services.book, cid,
                                        Principal(f"k-{cid}", f"approver {cid}", "policy-approver"))


def _final_check(api):
    assert_book_ok(api)
    assert_months_hold_their_payments(api)
    with api.services.reader.connect() as conn:
        order = [a.correction_id for a in approved_corrections(conn, _us(FROM), _us(TO))]
    last_right = RIGHT[order[-1]]
    _propose(api, "F", last_right, last_right)  # take the month to the last right policy
    assert _approve(api, "F")["status"] == "posted"
    assert_book_ok(api)
    assert_months_hold_their_payments(api)
    holdings = _holdings(api, last_right)
    held, gives = sum(h for h, _ in holdings.values()), sum(g for _, g in holdings.values())
    assert holdings == {p: (g, g) for p, (_, g) in holdings.items()} and held <= gives, \
        f"order {order}, last right {last_right}: month holds {held}, the policy gives {gives}: {holdings}"


def test_two_approvals_at_once_post_one(api, monkeypatch):
    """A (pharmacies to 15%) and B (cafes to 15%), proposed on the same month, approved
    at once; each approval, once past its check, waits for the other to pass it too.
    Both passed and both posted: the month as corrected said p-cafe held what pharm-15
    gives, and a final correction left 14,250 where pharm-15 gives 12,000. Now the
    second is refused while the first posts."""
    gate, real = threading.Barrier(2, timeout=3), corrections._refuse_if_superseded

    def hooked(conn, row):
        real(conn, row)
        try:
            gate.wait()
        except threading.BrokenBarrierError:
            pass

    monkeypatch.setattr(corrections, "_refuse_if_superseded", hooked)
    _propose(api, "A", "cap-2026-10", "pharm-15")
    _propose(api, "B", "cap-2026-10", "cafe-15")
    start, results = threading.Barrier(2), {}

    def approve(cid):
        start.wait()
        try:
            results[cid] = _approve(api, cid)["status"]
        except corrections.CorrectionState as error:
            results[cid] = error.code

    threads = [threading.Thread(target=approve, args=(c,)) for c in "AB"]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results.values()) == ["correction_state_conflict", "posted"], results
    _final_check(api)


def test_a_correction_approved_while_another_posts_is_refused(api, monkeypatch):
    """A is approved, and its posting has not reached m1's line (a large correction
    posts 1,000 lines a batch) when B is proposed and approved. B's plan read A's
    unposted line as refused, so took the month as A had not corrected it, and both
    posted. Now B's approval is refused while A posts, and again after (A changed the
    month since B's plan)."""
    a_posting, go_on = threading.Event(), threading.Event()
    real = Book.execute

    def execute(self, commands, **kw):
        if commands and isinstance(commands[0], Correct) and commands[0].line_id.startswith("A/"):
            a_posting.set()
            go_on.wait(10)
        return real(self, commands, **kw)

    monkeypatch.setattr(Book, "execute", execute)
    _propose(api, "A", "cap-2026-10", "pharm-15")
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("A", _approve(api, "A")["status"]))
    thread.start()
    assert a_posting.wait(10)
    _propose(api, "B", "cap-2026-10", "cafe-15")
    with pytest.raises(corrections.CorrectionState, match="another correction is being approved"):
        _approve(api, "B")
    go_on.set()
    thread.join()
    assert out["A"] == "posted"
    with pytest.raises(corrections.CorrectionState, match="planned before correction"):
        _approve(api, "B")
    _final_check(api)


def test_a_payment_waiting_on_a_budget_row_when_a_correction_is_planned_is_in_its_plan(api, monkeypatch):
    """X corrects October and its posting holds the city's 2026 budget row (widened with a
    sleep); m1's November payment p2 has taken its time and waits for that row; Y
    (November, pharmacies at 15%, a 20,000 cap) is proposed meanwhile. Y's plan missed
    p2 (recorded before its time, committed after its read), nothing refused Y, and the
    month ended at 24,000 under the 20,000 cap, a final correction leaving it there. Now
    the proposal takes its time once p2's batch has committed, and plans it."""
    api.put("/v1/members/m2", {"district": "namdong"})
    assert api.post("/v1/topups", {"topup_id": "t-m2", "member_id": "m2", "amount": 1_000_000,
                                   "occurred_at": at("2026-10-01", "00:30:00")}).status_code == 201
    api.put("/v1/merchants/rest", {"name": "rest", "district": "namdong", "category": "restaurant",
                                   "annual_sales": 1_000_000_000, "registered_from": "2019-01-01"})
    r = api.post("/v1/payments", {"payment_id": "p-oct", "member_id": "m2", "merchant_id": "pharm",
                                  "amount": 100_000, "occurred_at": at("2026-10-05")})
    assert r.status_code == 201, r.text
    _propose(api, "X", "cap-2026-10", "pharm-15", "2026-10-01", "2026-11-01")
    real_write = Book._write

    def slow_write(self, conn, state):  # X's posting batch holds city/2026 (locked up front) a while
        if any(w.get("lid", "").startswith("X/") for w in state.writes.correction_updates):
            time.sleep(2.0)
        return real_write(self, conn, state)

    monkeypatch.setattr(Book, "_write", slow_write)
    out = {}
    tx = threading.Thread(target=lambda: out.setdefault("X", _approve(api, "X")["status"]))
    tx.start()
    time.sleep(0.7)
    tp = threading.Thread(target=lambda: out.setdefault("P", api.services.book.execute(
        [Pay("p2", "m1", "rest", 100_000, _us(at("2026-11-20")), "h-p2")])))
    tp.start()
    time.sleep(0.5)  # p2's batch has taken its time and waits on city/2026
    _propose(api, "Y", "cap-2026-10", "pharm-15")
    tx.join()
    tp.join()
    assert out["X"] == "posted" and out["P"][0].ok, out
    assert _approve(api, "Y")["status"] == "posted"
    _propose(api, "F", "pharm-15", "pharm-15")
    assert _approve(api, "F")["status"] == "posted"
    assert_book_ok(api)
    assert_months_hold_their_payments(api)
    balance = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()
    assert balance["month"]["cashback_earned"] == 20_000  # the cap: pharm-15 gives more


def test_a_payment_stamped_before_the_plan_by_a_clock_stepped_back_refuses_the_line(api, monkeypatch):
    """A payment of the corrected month recorded after the proposal, while the clock ran a
    minute behind, is stamped before the plan's time: posting took it for planned and the
    month passed its 20,000 cap (21,550; the operator audit). The plan keeps the highest
    transaction id it saw too, and a payment above it refuses the line as recorded since."""
    import ledger.book

    api.put("/v1/merchants/rest", {"name": "rest", "district": "namdong", "category": "restaurant",
                                   "annual_sales": 1_000_000_000, "registered_from": "2019-01-01"})
    _propose(api, "Y", "cap-2026-10", "pharm-15")
    real = ledger.book.now_us
    monkeypatch.setattr(ledger.book, "now_us", lambda: real() - 60_000_000)
    out = api.services.book.execute([Pay("p-late", "m1", "rest", 100_000, _us(at("2026-11-20")), "h-late")])
    assert out[0].ok and out[0].body["status"] == "approved", out
    monkeypatch.undo()
    answer = _approve(api, "Y")
    m1 = [line for line in answer["lines"] if line["member_id"] == "m1"]
    assert m1 and not any(line["posted"] for line in m1), m1
    balance = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()
    assert balance["month"]["cashback_earned"] <= 20_000, balance
    _final_check(api)
