"""A correction is never posted twice (the s19 race audit): two proposals of one range
with the same wrong and right policy (two staff at once, or the same correction proposed
again under a new id after the first was posted) both posted in full and cut the
member's cashback twice: 100,000 at the pharmacy earned 10,000, corrected to 7% twice it
held 4,000, and a whole refund then gave the funders 6,000 back in all.

Now a plan moves a payment an earlier correction re-based from what it holds to what the
right policy gives (right − held; a payment no correction touched keeps right − wrong),
and records how many corrections had re-based each payment; posting refuses a line whose
payment has been corrected since (`payment_corrected_since_planned`), and a new proposal
corrects the rest (docs/design.md, "Corrections")."""

from __future__ import annotations

import threading

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule
from sqlalchemy import select

from ledger import corrections
from ledger import schema as s
from ledger.book import cashback_held
from ledger.keys import Principal
from rules.simulate import evaluate_frame
from rules.timeutil import to_us
from settlement.simulate import load_range
from tests.book_helpers import (assert_book_ok, assert_months_hold_their_payments, migrate_down_and_up,
                                proposed_by_an_earlier_release)
from tests.conftest import POLICIES, at
from tests.test_corrections import _funders, _november, _pharm_7, _points_and_month, _refund
from tests.machines import ServiceMachine, run_on_postgres, run_on_sqlite

FROM, TO = at("2026-11-01", "00:00:00"), at("2026-12-01", "00:00:00")


def _policy(policy_id: str, category: str, rate_bp: int) -> dict:
    doc = yaml.safe_load((POLICIES / "2025-10-cap-50man.yaml").read_text())
    doc["policy_id"] = policy_id
    doc.pop("effective_from")
    doc["components"][0]["variants"].insert(1, {"id": category, "when": {"categories_include": [category]},
                                                "bands": [{"up_to_won": 500000, "rate_bp": rate_bp}]})
    return doc


def _propose(api, correction_id: str, right: str = "pharm-7", wrong: str = "incheon-2025-10") -> dict:
    r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": wrong,
                                     "right_policy_id": right, "from": FROM, "to": TO}, role="policy-editor")
    assert r.status_code == 201, r.text
    return r.json()


def _approve(api, correction_id: str) -> dict:
    r = api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver")
    assert r.status_code == 200, r.text
    return r.json()


def _superseded(api, correction_id: str, by: str) -> None:
    """Its approval is refused: planned before `by` took effect over its months."""
    r = api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver")
    assert r.status_code == 409 and r.json()["code"] == "correction_state_conflict", r.text
    assert f"'{by}'" in r.json()["detail"] and "propose it again" in r.json()["detail"], r.text


def _failed(api, correction_id: str) -> list[dict]:
    """The failed lines of the correction's last posting (its audit entry)."""
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": correction_id}).json()["items"]
    return [e for e in log if e["action"] == "correction.post"][-1]["detail"]["failed"]


def test_two_proposals_of_one_correction_post_once(api):
    """Proposed twice before either is approved (two staff at once): the first posts
    −3,000; the second was planned from the 10,000 the payment held then, before the
    first took effect over its month, and its approval is refused, nothing of it posted
    (it stays proposed). The member holds 7,000, and a whole refund gives the funders
    back exactly the 7,000 they paid net."""
    _november(api)
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    for cid in ("c1", "c2"):
        proposal = _propose(api, cid)
        assert [line["delta"] for line in proposal["lines"]] == [-3_000]
        assert proposal["summary"]["payments_already_corrected"] == 0
    assert _approve(api, "c1")["status"] == "posted"
    _superseded(api, "c2", by="c1")
    assert api.get("/v1/corrections/c2", role="policy-editor").json()["status"] == "proposed"
    assert _points_and_month(api) == (400_000, 7_000, 7_000)
    assert _funders(api) == {"national": 2_800, "city": 4_200}
    # Approving it again is refused again, nothing moves.
    _superseded(api, "c2", by="c1")
    assert _points_and_month(api) == (400_000, 7_000, 7_000)
    # A new proposal has nothing left to correct.
    again = _propose(api, "c3")
    assert again["lines"] == [] and again["summary"]["payments_already_corrected"] == 1
    r = _refund(api, "r-pharm", 100_000)
    assert r.status_code == 201 and r.json()["cashback_clawback"] == 7_000, r.text
    assert _points_and_month(api) == (500_000, 0, 0)
    assert _funders(api) == {"national": 0, "city": 0}
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_the_same_correction_proposed_after_posting_plans_nothing(api):
    """Proposed again under a new id after the first was posted, and again after a
    refund: the payment holds what the right policy gives, so neither plans a line."""
    _november(api)
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    _propose(api, "c1")
    _approve(api, "c1")
    second = _propose(api, "c2")
    assert second["lines"] == [] and second["summary"]["payments_already_corrected"] == 1
    assert second["summary"]["clawback_won"] == 0
    assert _approve(api, "c2")["status"] == "posted"
    assert _points_and_month(api) == (400_000, 7_000, 7_000)
    assert _refund(api, "r-1", 40_000, "2026-11-05").json()["cashback_clawback"] == 2_800
    assert _propose(api, "c3")["lines"] == []
    assert _points_and_month(api) == (440_000, 4_200, 4_200)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_the_same_correction_proposed_after_a_partial_refund_plans_nothing(api):
    """A corrected payment refunded in part holds what the right policy gave it less what
    the refund clawed back by the contract's formula (in proportion, floored); re-rating
    what is left differs where a band, a cap or a won's rounding is involved (600,000 at
    7% on the first 500,000: 35,000; half refunded claws 17,500, where 7% of the 300,000
    left is 21,000). The same correction proposed again planned that difference (+3,500),
    and −2 (1 won a funder) after a refund of 33,333 of a flat 7% payment; it plans
    nothing now: the payment's last correction had this right policy."""
    api.put("/v1/members/m1", {"district": "namdong"})
    api.put("/v1/merchants/pharm", {"name": "pharm", "district": "namdong", "category": "pharmacy",
                                    "annual_sales": 100_000_000, "registered_from": "2019-01-01"})
    for tid in ("t1", "t2"):
        assert api.post("/v1/topups", {"topup_id": tid, "member_id": "m1", "amount": 350_000,
                                       "occurred_at": at("2026-11-01")}).status_code == 201
    r = api.post("/v1/payments", {"payment_id": "p-pharm", "member_id": "m1", "merchant_id": "pharm",
                                  "amount": 600_000, "occurred_at": at("2026-11-02")})
    assert r.json()["cashback"]["amount"] == 50_000, r.text
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    _propose(api, "c1")
    assert _approve(api, "c1")["status"] == "posted"
    assert _refund(api, "r-1", 300_000, "2026-11-05").json()["cashback_clawback"] == 17_500
    again = _propose(api, "c2")
    assert again["lines"] == [] and again["summary"]["payments_already_corrected"] == 1, again
    assert _points_and_month(api)[1] == 17_500
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_the_same_correction_after_an_odd_refund_plans_nothing(api):
    _november(api)
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    _propose(api, "c1")
    assert _approve(api, "c1")["status"] == "posted"
    _refund(api, "r-1", 33_333, "2026-11-05")
    assert _propose(api, "c2")["lines"] == []


def test_two_approvals_at_once_post_once(api):
    """Both proposals approved at the same moment (two instances): whichever comes second
    is refused at its approval if the first took effect by then, else the book, taking
    the member's lock for each line, finds the payment corrected since its plan. Exactly
    one posts."""
    _november(api)
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    for cid in ("c1", "c2"):
        _propose(api, cid)
    start = threading.Barrier(2)
    results: dict[str, object] = {}

    def approve(cid: str) -> None:
        start.wait()
        try:
            results[cid] = corrections.approve_and_post(api.services.engine, api.services.book, cid,
                                                        Principal(f"k-{cid}", f"approver {cid}", "policy-approver"))
        except Exception as error:  # noqa: BLE001 - reported below
            results[cid] = error

    threads = [threading.Thread(target=approve, args=(cid,)) for cid in ("c1", "c2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    posted = [cid for cid, r in results.items() if isinstance(r, dict) and r["status"] == "posted"]
    assert len(posted) == 1, results
    [loser] = set(results) - set(posted)
    if isinstance(results[loser], Exception):
        assert isinstance(results[loser], corrections.CorrectionState), results
    else:
        assert results[loser]["status"] == "approved", results
        assert [f["error"] for f in _failed(api, loser)] == ["payment_corrected_since_planned"]
    assert _points_and_month(api) == (400_000, 7_000, 7_000)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_stale_line_is_refused_and_a_new_proposal_corrects_from_what_is_held(api):
    """Two corrections to different rates proposed at once (7% and 5%): the 7% posts,
    the 5% is stale and refused; proposed again it takes 2,000 (7,000 → 5,000), not
    the 5,000 that right − wrong would have taken on top. A correction back from 5% to
    7% (wrong: pharm-5) then pays 2,000."""
    _november(api)
    for policy in (_pharm_7(), _policy("pharm-5", "pharmacy", 500)):
        assert api.post("/v1/policies", policy, role="policy-editor").status_code == 201
    _propose(api, "to-7")
    assert [line["delta"] for line in _propose(api, "to-5", right="pharm-5")["lines"]] == [-5_000]
    _approve(api, "to-7")
    _superseded(api, "to-5", by="to-7")
    assert _points_and_month(api) == (400_000, 7_000, 7_000)
    assert [line["delta"] for line in _propose(api, "to-5-again", right="pharm-5")["lines"]] == [-2_000]
    assert _approve(api, "to-5-again")["status"] == "posted"
    assert _points_and_month(api) == (400_000, 5_000, 5_000)
    assert [line["delta"] for line in _propose(api, "back", right="pharm-7", wrong="pharm-5")["lines"]] == [2_000]
    _approve(api, "back")
    assert _points_and_month(api) == (400_000, 7_000, 7_000)
    assert _refund(api, "r-pharm", 100_000).json()["cashback_clawback"] == 7_000
    assert _funders(api) == {"national": 0, "city": 0}
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_correction_replaces_its_layer_over_its_range_earlier_corrections_included(api):
    """After the pharmacy's correction to 7%, a correction of cafes to 5% whose right
    policy pays pharmacies 10% (the policy in force with the cafe fix alone) puts the
    pharmacy payment back to 10,000 (+3,000) beside the cafe's −4,500: a right policy
    replaces its layer's over the range, and the proposal shows it (the payment counted
    as already corrected). Before, which payments a correction touched was where its
    wrong and right policy differed, and the month was then evaluated from figures no
    payment held (the s21 corrections audit: under a 20,000 cap the same two corrections
    ended at 17,000 or 15,500 by their order). A right policy that keeps the pharmacy
    fix takes the cafe's 4,500 alone."""
    _november(api, cafe=True)
    both = _policy("pharm-7-cafe-5", "cafe", 500)
    both["components"][0]["variants"].insert(1, {"id": "pharmacy", "when": {"categories_include": ["pharmacy"]},
                                                 "bands": [{"up_to_won": 500000, "rate_bp": 700}]})
    for policy in (_pharm_7(), _policy("cafe-5", "cafe", 500), both):
        assert api.post("/v1/policies", policy, role="policy-editor").status_code == 201
    _propose(api, "pharm")
    _approve(api, "pharm")
    reverting = _propose(api, "cafe", right="cafe-5")
    assert [line["delta"] for line in reverting["lines"]] == [3_000 - 4_500]
    assert reverting["summary"]["payments_already_corrected"] == 1
    kept = _propose(api, "cafe-kept", right="pharm-7-cafe-5")
    assert [line["delta"] for line in kept["lines"]] == [-4_500]
    _approve(api, "cafe-kept")
    assert _points_and_month(api)[2] == 7_000 + 4_500
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_wrong_policy_never_in_force_over_the_range_is_refused(api):
    """The wrong policy names what was in force over the range, as activated or as
    corrected: one never in force there (a slip of the proposer's) is refused, as are
    two policies of different layers; nothing is proposed."""
    _november(api)
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    r = api.post("/v1/corrections", {"correction_id": "bad", "wrong_policy_id": "incheon-2025-09",
                                     "right_policy_id": "pharm-7", "from": FROM, "to": TO}, role="policy-editor")
    assert r.status_code == 409 and r.json()["code"] == "wrong_policy_not_in_force", r.text
    assert "incheon-2025-10" in r.json()["detail"], r.text
    r = api.post("/v1/corrections", {"correction_id": "layers", "wrong_policy_id": "winwin-2023",
                                     "right_policy_id": "pharm-7", "from": FROM, "to": TO}, role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "correction_layers_differ", r.text
    for correction_id in ("bad", "layers"):
        assert api.get(f"/v1/corrections/{correction_id}", role="policy-editor").status_code == 404
    # As corrected: after the pharmacy correction, pharm-7 was in force over November too.
    _propose(api, "pharm")
    _approve(api, "pharm")
    assert _propose(api, "again", wrong="pharm-7")["lines"] == []


def test_a_line_planned_before_migration_0015_posts_unchecked(api):
    """Per-payment rows without `corrections_seen` (proposed before 0015) post as before."""
    _november(api)
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    with proposed_by_an_earlier_release():
        _propose(api, "c1")
    with api.services.engine.begin() as conn:
        conn.execute(s.correction_payments.update().values(corrections_seen=None))
    assert _approve(api, "c1")["status"] == "posted"
    assert _points_and_month(api) == (400_000, 7_000, 7_000)
    assert_book_ok(api)


def test_migration_0015_adds_and_drops_corrections_seen(db_url):
    before, between, after = migrate_down_and_up(db_url, "0014", "correction_payments")
    assert "corrections_seen" in before and "corrections_seen" in after
    assert between == {"line_id", "payment_id", "refunded_won", "deltas"}


# ---------------------------------------------------------------- the invariant


def _holdings(api, right_policy_id: str) -> dict[str, tuple[int, int, bool]]:
    """Per payment: (what it holds, what the right policy over all November gives it,
    corrected?)."""
    services = api.services
    _, right = corrections._timelines(services.engine, services.timeline, right_policy_id,
                                      to_us(_dt(FROM)), to_us(_dt(TO)))(())
    with services.reader.connect() as conn:
        loaded = load_range(conn, to_us(_dt(FROM)), to_us(_dt(TO)))
        rows = conn.execute(select(s.payments.c.payment_id, s.payments.c.detail, s.payments.c.refund_state)).all()
    evaluation = evaluate_frame(right, loaded.payments, loaded.start, as_given=True)
    ids = loaded.payments["payment_id"].to_list()
    gives = {ids[row]: won for row, won in evaluation.payments.select("row", "cashback_won").iter_rows()}
    out = {}
    for payment_id, detail, state in rows:
        state = orjson.loads(state or "{}")
        held = sum(cashback_held(orjson.loads(detail), state).values())
        out[payment_id] = (held, gives.get(payment_id, 0), "corrected" in state)
    return out


MEMBERS = {"m1": ("pharm", 100_000), "m2": ("pharm", 80_000), "m3": ("pharm", 50_000), "m4": ("cafe", 60_000)}


class CorrectionsMachine(ServiceMachine):
    """Corrections to one right policy (pharmacies at 7%), proposed and approved in any
    order, some proposed before others are posted, with refunds before, between and
    after them. One payment per member (so no points are spent, and every figure is
    exact in won). After every step no payment holds less than the right policy gives
    it (after its refunds), and one a correction re-based holds exactly that; after a
    last proposal, every payment does."""

    def __init__(self) -> None:
        super().__init__()
        self.proposed: list[str] = []
        self.pending: list[str] = []
        self.left: dict[str, int] = {}
        self.refunds = 0
        api = self.api
        for merchant, category in (("pharm", "pharmacy"), ("cafe", "cafe")):
            assert api.put(f"/v1/merchants/{merchant}", {
                "name": merchant, "district": "namdong", "category": category, "annual_sales": 100_000_000,
                "registered_from": "2019-01-01"}).status_code == 201
        for member_id, (merchant, amount) in MEMBERS.items():
            assert api.put(f"/v1/members/{member_id}", {"district": "namdong"}).status_code == 201
            assert api.post("/v1/topups", {"topup_id": f"t-{member_id}", "member_id": member_id, "amount": 500_000,
                                           "occurred_at": at("2026-11-01")}).status_code == 201
            r = api.post("/v1/payments", {"payment_id": f"p-{member_id}", "member_id": member_id,
                                          "merchant_id": merchant, "amount": amount, "occurred_at": at("2026-11-02")})
            assert r.json()["cashback"]["amount"] == amount // 10, r.text
            self.left[f"p-{member_id}"] = amount
        assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201

    def teardown(self) -> None:
        try:
            cid = f"last-{len(self.proposed)}"
            _propose(self.api, cid)
            assert _approve(self.api, cid)["status"] == "posted"
            for payment_id, (held, right, _) in self._holdings().items():
                assert held == right, (payment_id, held, right)
            assert_book_ok(self.api)
            assert_months_hold_their_payments(self.api)
        finally:
            super().teardown()

    def _holdings(self) -> dict[str, tuple[int, int, bool]]:
        return _holdings(self.api, "pharm-7")

    @precondition(lambda self: len(self.proposed) < 4)
    @rule()
    def propose(self):
        cid = f"c{len(self.proposed)}"
        _propose(self.api, cid)
        self.proposed.append(cid)
        self.pending.append(cid)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def approve(self, data):
        cid = data.draw(st.sampled_from(self.pending), label="correction")
        r = self.api.post(f"/v1/corrections/{cid}/approve", role="policy-approver")
        if r.status_code == 409:  # planned before another took effect over its month: never posts
            assert r.json()["code"] == "correction_state_conflict", r.text
            self.pending.remove(cid)
        elif r.json()["status"] == "posted":
            self.pending.remove(cid)

    @precondition(lambda self: any(self.left.values()))
    @rule(data=st.data())
    def refund(self, data):
        payment_id = data.draw(st.sampled_from(sorted(p for p, left in self.left.items() if left)), label="payment")
        amount = data.draw(st.integers(1, self.left[payment_id] // 10_000), label="tens of thousands") * 10_000
        self.refunds += 1
        r = _refund(self.api, f"r-{self.refunds}", amount, "2026-11-20", payment_id)
        assert r.status_code == 201, r.text
        self.left[payment_id] -= amount

    @invariant()
    def never_past_the_right_policy(self):
        for payment_id, (held, right, corrected) in self._holdings().items():
            assert held >= right, (payment_id, held, right)
            if corrected:
                assert held == right, (payment_id, held, right)
        assert_book_ok(self.api)
        assert_months_hold_their_payments(self.api)


def _dt(text: str):
    import datetime as dt

    return dt.datetime.fromisoformat(text)


PROFILE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_corrections_to_one_right_policy_sqlite():
    run_on_sqlite(CorrectionsMachine, settings(max_examples=5, stateful_step_count=12, **PROFILE))


@pytest.mark.postgres
def test_corrections_to_one_right_policy_postgres():
    run_on_postgres(CorrectionsMachine, settings(max_examples=3, stateful_step_count=10, **PROFILE))


# ---------------------------------------------------------------- ranges in any order

# Two members' November at a 40억 shop ("big": above the 30억 ceiling in force, counted
# under the right policy's 50억) and a 10억 one, crossing the 50만 band.
RANGE_PAYMENTS = [("m1", "big", 3, 300_000), ("m1", "small", 8, 150_000), ("m2", "small", 9, 200_000),
                  ("m1", "small", 15, 300_000), ("m2", "big", 18, 250_000), ("m1", "big", 22, 100_000),
                  ("m2", "small", 27, 200_000)]


RIGHTS = {"ceiling-50eok-12": (5_000_000_000, 1_200), "ceiling-50eok": (5_000_000_000, 1_000),
          "rate-12": (3_000_000_000, 1_200)}


class RangesMachine(ServiceMachine):
    """November corrected over ranges that cut the month anywhere, each to one of three
    right policies (a 50억 ceiling at 12%, at 10%, 12% under the 30억 ceiling), posted in
    any order, each against what was in force over its range as corrected: after each,
    every payment holds what the timeline as corrected (each posted correction's right
    policy over its range, in the order they took effect) gives it, so corrections of
    one month to one right policy, once they cover it, end as that policy over the whole
    month (the s20 review's third case: out of date order the month had kept the band
    room the first posted range gave away), and the book and its months hold. The
    payments are recorded in time order or in any other (backdated ones), and "gives" is
    in the order recorded, as the book paid them."""

    def __init__(self) -> None:
        super().__init__()
        from tests.test_corrections import _ceiling

        api = self.api
        for merchant, sales in (("big", 4_000_000_000), ("small", 1_000_000_000)):
            assert api.put(f"/v1/merchants/{merchant}", {
                "name": merchant, "district": "namdong", "category": "restaurant", "annual_sales": sales,
                "registered_from": "2019-01-01"}).status_code == 201
        for member_id in ("m1", "m2"):
            assert api.put(f"/v1/members/{member_id}", {"district": "namdong"}).status_code == 201
            assert api.post("/v1/topups", {"topup_id": f"t-{member_id}", "member_id": member_id, "amount": 1_000_000,
                                           "occurred_at": at("2026-11-01")}).status_code == 201
        for policy_id, (sales_max, rate_bp) in RIGHTS.items():
            right = _ceiling(policy_id, sales_max)
            for variant in right["components"][0]["variants"]:
                if variant["id"] == "standard":
                    variant["bands"][0]["rate_bp"] = rate_bp
            assert api.post("/v1/policies", right, role="policy-editor").status_code == 201
        self.ranges: list[tuple[str, str, str]] = []

    @initialize(cuts=st.lists(st.integers(2, 30), max_size=3, unique=True), data=st.data())
    def cut_the_month(self, cuts, data):
        # Recorded in time order or not: a backdated payment is paid the band room the
        # payments recorded before it left, and every plan follows that order.
        order = data.draw(st.one_of(st.just(list(range(len(RANGE_PAYMENTS)))),
                                    st.permutations(range(len(RANGE_PAYMENTS)))), label="recorded in the order")
        for i in order:
            member_id, merchant, day, amount = RANGE_PAYMENTS[i]
            r = self.api.post("/v1/payments", {"payment_id": f"p{i}", "member_id": member_id, "merchant_id": merchant,
                                               "amount": amount, "occurred_at": at(f"2026-11-{day:02d}")})
            assert r.json()["status"] == "approved", r.text
        days = [f"2026-11-{day:02d}" for day in [1, *sorted(cuts)]] + ["2026-12-01"]
        ranges = data.draw(st.permutations(list(zip(days, days[1:]))), label="ranges in posting order")
        one = data.draw(st.booleans(), label="one right policy")
        rights = st.just("ceiling-50eok-12") if one else st.sampled_from(sorted(RIGHTS))
        self.ranges = [(start, end, data.draw(rights, label=f"right from {start}")) for start, end in ranges]

    @precondition(lambda self: self.ranges)
    @rule()
    def correct_the_next_range(self):
        from ledger.corrections import _in_force
        from settlement.simulate import approved_corrections

        start, end, right = self.ranges.pop(0)
        services = self.api.services
        span = to_us(_dt(at(start, "00:00:00"))), to_us(_dt(at(end, "00:00:00")))
        with services.reader.connect() as conn:
            history = tuple(a.prior for a in approved_corrections(conn, *span))
        corrected = corrections._timelines(services.engine, services.timeline, right, *span)(history)[0]
        wrong = sorted(_in_force(corrected, "city", *span))[0]  # one of what was in force there, as corrected
        cid = f"c-{start}"
        r = self.api.post("/v1/corrections", {"correction_id": cid, "wrong_policy_id": wrong, "right_policy_id": right,
                                              "from": at(start, "00:00:00"), "to": at(end, "00:00:00")},
                          role="policy-editor")
        assert r.status_code == 201, r.text
        assert _approve(self.api, cid)["status"] == "posted"
        for payment_id, (held, gives) in _as_corrected(self.api).items():
            assert held == gives, (payment_id, held, gives)

    @rule()
    def read_the_book(self):
        assert_book_ok(self.api)

    def teardown(self) -> None:
        try:
            if not self.ranges:
                assert_book_ok(self.api)
                assert_months_hold_their_payments(self.api)
        finally:
            super().teardown()


def _as_corrected(api) -> dict[str, tuple[int, int]]:
    """Per payment of November: (what it holds, what the timeline as corrected gives it)."""
    from settlement.simulate import approved_corrections

    services = api.services
    span = to_us(_dt(FROM)), to_us(_dt(TO))
    with services.reader.connect() as conn:
        history = tuple(a.prior for a in approved_corrections(conn, *span))
        loaded = load_range(conn, *span)
        rows = conn.execute(select(s.payments.c.payment_id, s.payments.c.detail, s.payments.c.refund_state)).all()
    corrected = corrections._timelines(services.engine, services.timeline, "rate-12", *span)(history)[0]
    evaluation = evaluate_frame(corrected, loaded.payments, loaded.start, as_given=True)
    ids = loaded.payments["payment_id"].to_list()
    gives = {ids[row]: won for row, won in evaluation.payments.select("row", "cashback_won").iter_rows()}
    return {payment_id: (sum(cashback_held(orjson.loads(detail), orjson.loads(state or "{}")).values()),
                         gives.get(payment_id, 0)) for payment_id, detail, state in rows}


def test_ranges_corrected_in_any_order_end_as_the_right_policy_sqlite():
    run_on_sqlite(RangesMachine, settings(max_examples=8, stateful_step_count=8, **PROFILE))
