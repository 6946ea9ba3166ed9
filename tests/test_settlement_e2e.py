"""Settlement end to end, on SQLite and on PostgreSQL: generated data through the Book,
then settled day by day; idempotency, late events, failed checks, four-eyes reopening."""

from __future__ import annotations

import datetime as dt
import time

import polars as pl
import pytest
from sqlalchemy import delete, select

from ledger import audit
from ledger import schema as s
from ledger.queries import check_book
from rules.timeutil import local_date, local_midnight_us
from settlement import datagen, service
from settlement import schema as ss
from settlement.config import FeeTier, SettlementConfig
from settlement.testing import generated_book, postgres_available, temp_database

START = dt.date(2026, 11, 2)  # a Monday
DAYS = 4
CONFIG = SettlementConfig(watermark_lag_us=0)

BACKENDS = ["sqlite", pytest.param("postgresql", marks=[
    pytest.mark.postgres, pytest.mark.skipif(not postgres_available(), reason="PostgreSQL is not reachable")])]


@pytest.fixture(scope="module", params=BACKENDS)
def world(request):
    with temp_database(request.param) as url:
        generated = generated_book(url, start=START, days=DAYS, farming_on=START + dt.timedelta(days=1))
        yield generated
        generated.engine.dispose()


def _day(i: int) -> dt.date:
    return START + dt.timedelta(days=i)


def _ledger_net_sales(engine, day: str) -> dict[str, int]:
    """−Σ merchant payable legs per merchant for transactions of `day`: the ledger's truth."""
    t, l = s.ledger_txns, s.ledger_legs
    with engine.connect() as conn:
        rows = conn.execute(select(l.c.account_id, l.c.amount_won).join(t, t.c.txn_id == l.c.txn_id)
                            .where(t.c.business_date == day, l.c.account_id.like("merchant/%"))).all()
    out: dict[str, int] = {}
    for account, amount in rows:
        merchant = account.split("/")[1]
        out[merchant] = out.get(merchant, 0) - amount
    return {k: v for k, v in out.items() if v}


def _paid_net_sales(engine, day: str) -> dict[str, int]:
    """Σ payout rows of `day` over every successful settlement."""
    p, t = ss.settlement_payouts, ss.settlements
    with engine.connect() as conn:
        rows = conn.execute(select(p.c.merchant_id, p.c.net_sales_won)
                            .join(t, t.c.settlement_id == p.c.settlement_id)
                            .where(p.c.for_business_date == day, t.c.status.in_(service.SUCCESSFUL))).all()
    out: dict[str, int] = {}
    for merchant, amount in rows:
        out[merchant] = out.get(merchant, 0) + amount
    return {k: v for k, v in out.items() if v}


def test_generated_month_settles_day_by_day_with_every_check_green(world):
    assert all(o.ok for o in world.outcomes), [str(o.error) for o in world.outcomes if not o.ok][:3]
    with world.engine.connect() as conn:
        assert all(c.ok for c in check_book(conn))
    for i in range(DAYS - 1):
        before = local_date(time.time_ns() // 1000)
        result = service.settle(world.engine, _day(i), actor="finance-1", config=CONFIG)
        assert result.status == "settled", result.failures
        assert all(c["ok"] for c in result.checks) and len(result.checks) >= 9
        run = result.totals["run"]
        assert run["trial_balance_won"] == 0
        assert run["payment_count"] > 100
        assert run["net_payable_won"] == run["net_sales_won"] - run["fee_won"] - run["merchant_share_won"]
        # settled late (these days are weeks past): paid no earlier than a business day after
        # the run (the run's Seoul day: the one before or after the call, should it cross midnight)
        assert result.payout_date in {max(service.add_business_days(_day(i), 2),
                                          service.add_business_days(today, 1)).isoformat()
                                      for today in (before, local_date(time.time_ns() // 1000))}
        assert _paid_net_sales(world.engine, _day(i).isoformat()) == _ledger_net_sales(world.engine,
                                                                                       _day(i).isoformat())
    with world.engine.connect() as conn:
        sources = {row["source"] for row in service.get_settlement(conn, "stl-2026-11-02-v1").totals["funders"]}
    assert {"national", "city", "merchant"} <= sources  # every kind of funder appears


def test_settling_a_settled_date_returns_the_same_settlement(world):
    first = service.settle(world.engine, _day(0), actor="finance-1", config=CONFIG)
    again = service.settle(world.engine, _day(0), actor="finance-2", config=CONFIG)
    assert again.replayed and again.settlement_id == first.settlement_id
    assert again.totals == first.totals and again.watermark_us == first.watermark_us
    with world.engine.connect() as conn:
        count = conn.execute(select(ss.settlements.c.settlement_id)
                             .where(ss.settlements.c.business_date == _day(0).isoformat())).all()
    assert len(count) == 1


def test_a_late_event_lands_once_in_the_next_run(world):
    day0 = _day(0).isoformat()
    service.settle(world.engine, _day(0), actor="finance-1", config=CONFIG)
    before = _paid_net_sales(world.engine, day0)
    member = world.plan.members[0]["member_id"]
    merchant = world.plan.merchants[0]["merchant_id"]
    late_at = local_midnight_us(_day(0)) + 20 * 3_600_000_000
    late = world.book.execute([datagen.pay("LATE-1", member, merchant, 12_300, late_at)])
    assert late[0].ok and late[0].body["status"] == "approved"
    # The settled date, run again, does not move.
    assert service.settle(world.engine, _day(0), actor="finance-1", config=CONFIG).replayed
    nxt = service.settle(world.engine, _day(DAYS - 1), actor="finance-1", config=CONFIG)
    assert nxt.status == "settled", nxt.failures
    assert day0 in nxt.totals["dates"] and nxt.totals["dates"][day0]["payment_count"] == 1
    with world.engine.connect() as conn:
        rows = service.merchant_payouts(conn, nxt.settlement_id).filter(pl.col("kind") == "adjustment")
    assert rows.select("for_business_date", "merchant_id", "sales_won").rows() == [(day0, merchant, 12_300)]
    after = _paid_net_sales(world.engine, day0)
    assert after[merchant] == before.get(merchant, 0) + 12_300
    assert after == _ledger_net_sales(world.engine, day0)
    # A later run does not count it again.
    later = service.settle(world.engine, _day(DAYS), actor="finance-1", config=CONFIG)
    assert day0 not in later.totals["dates"]
    assert _paid_net_sales(world.engine, day0) == _ledger_net_sales(world.engine, day0)


def test_a_run_that_fails_a_check_is_not_settled_and_says_why(world):
    day = _day(DAYS + 1)
    with world.engine.begin() as conn:
        merchant = conn.execute(select(s.merchants).where(s.merchants.c.merchant_id == "S000001")).one()
    at = local_midnight_us(day) + 12 * 3_600_000_000
    assert world.book.execute([datagen.pay("FAILCHECK-1", world.plan.members[1]["member_id"], "S000001",
                                            5_000, at)])[0].ok
    with world.engine.begin() as conn:  # the registry loses the merchant (an operator's mistake)
        conn.execute(delete(s.merchants).where(s.merchants.c.merchant_id == "S000001"))
    failed = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
    assert failed.status == "failed"
    assert [c["name"] for c in failed.failures] == ["every paid merchant is registered"]
    assert "S000001" in failed.failures[0]["detail"]
    with world.engine.connect() as conn:
        assert service.merchant_payouts(conn, failed.settlement_id).height == 0
    with world.engine.begin() as conn:
        conn.execute(s.merchants.insert().values(**merchant._mapping))
    retried = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
    assert retried.status == "settled" and retried.version == failed.version + 1 and retried.kind == "day"


def test_reopening_needs_a_second_person_and_corrects_by_difference(world):
    day = _day(1)
    first = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
    request = service.request_reopen(world.engine, first.settlement_id, actor="alice", reason="fee table was wrong")
    with pytest.raises(service.ReopenRequestDecided, match=request["request_id"]):  # one waits already
        service.request_reopen(world.engine, first.settlement_id, actor="carol", reason="also")
    with pytest.raises(service.SecondPersonRequired):
        service.approve_reopen(world.engine, request["request_id"], actor="alice")
    assert service.settle(world.engine, day, actor="finance-1", config=CONFIG).replayed  # still settled
    approved = service.approve_reopen(world.engine, request["request_id"], actor="bob")
    assert approved["status"] == "reopened"
    with pytest.raises(service.ReopenRequestDecided, match="already approved by 'bob'"):  # a 409, not "not found"
        service.approve_reopen(world.engine, request["request_id"], actor="carol")
    with pytest.raises(service.ReopenRequestNotFound):
        service.approve_reopen(world.engine, "reopen-nothing", actor="carol")
    dearer = SettlementConfig(watermark_lag_us=0, fee_tiers=(FeeTier(sales_max_won=100_000_000, fee_bp=0),
                                                            FeeTier(sales_max_won=None, fee_bp=100)))
    corrected = service.settle(world.engine, day, actor="finance-1", config=dearer)
    assert corrected.status == "settled" and corrected.kind == "correction", corrected.failures
    assert corrected.version == first.version + 1
    with world.engine.connect() as conn:
        assert service.get_settlement(conn, first.settlement_id).status == "superseded"
        delta = service.merchant_payouts(conn, corrected.settlement_id)
        assert set(delta["kind"].to_list()) <= {"correction", "adjustment"}
        assert delta.filter(pl.col("kind") == "correction").height > 0
        sales = dict(conn.execute(select(s.merchants.c.merchant_id, s.merchants.c.annual_sales_won)).all())
        p, t = ss.settlement_payouts, ss.settlements
        fees: dict[str, int] = {}
        for merchant, fee in conn.execute(select(p.c.merchant_id, p.c.fee_won)
                                          .join(t, t.c.settlement_id == p.c.settlement_id)
                                          .where(p.c.for_business_date == day.isoformat(),
                                                 t.c.status.in_(service.SUCCESSFUL))):
            fees[merchant] = fees.get(merchant, 0) + fee
    for merchant, net in _ledger_net_sales(world.engine, day.isoformat()).items():
        bp = 0 if sales[merchant] <= 100_000_000 else 100
        assert fees.get(merchant, 0) == (abs(net) * bp // 10_000) * (1 if net > 0 else -1), merchant
    with world.engine.connect() as conn:
        actions = [r.action for r in conn.execute(select(s.audit_log.c.action)
                                                  .where(s.audit_log.c.object_id == first.settlement_id))]
        assert "settlement.reopen_requested" in actions and "settlement.reopened" in actions
        assert audit.verify(conn).ok
    # Σ of every row for the day = the day as the new fee table settles it.
    assert _paid_net_sales(world.engine, day.isoformat()) == _ledger_net_sales(world.engine, day.isoformat())
    assert service.settle(world.engine, day, actor="finance-1", config=dearer).settlement_id == corrected.settlement_id
    # the correction recounted the whole day, the first run's count superseded with it
    check = _coverage_check(world.engine)
    assert check.ok, check.detail


def test_a_failed_correction_leaves_the_date_reopened_and_the_next_run_corrects(world):
    """A reopened date whose correction run fails (twice) is still reopened: the run after
    it is a correction, written as the difference, and supersedes the first settlement. It
    was a `day` run, the whole day paid again beside the first run's rows."""
    day = _day(2)
    first = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
    assert first.status == "settled"
    request = service.request_reopen(world.engine, first.settlement_id, actor="alice", reason="recheck")
    service.approve_reopen(world.engine, request["request_id"], actor="bob")
    with world.engine.connect() as conn:
        paid = service.merchant_payouts(conn, first.settlement_id)["merchant_id"][0]
    with world.engine.begin() as conn:  # the registry loses a paid merchant (an operator's mistake)
        merchant = conn.execute(select(s.merchants).where(s.merchants.c.merchant_id == paid)).one()
        conn.execute(delete(s.merchants).where(s.merchants.c.merchant_id == paid))
    try:
        for _ in range(2):
            failed = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
            assert failed.status == "failed" and failed.kind == "correction"
    finally:
        with world.engine.begin() as conn:
            conn.execute(s.merchants.insert().values(**merchant._mapping))
    corrected = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
    assert corrected.status == "settled" and corrected.kind == "correction", corrected.failures
    assert corrected.version == first.version + 3
    with world.engine.connect() as conn:
        assert service.get_settlement(conn, first.settlement_id).status == "superseded"
        assert set(service.merchant_payouts(conn, corrected.settlement_id)["kind"]) <= {"correction", "adjustment"}
    assert _paid_net_sales(world.engine, day.isoformat()) == _ledger_net_sales(world.engine, day.isoformat())
    assert service.settle(world.engine, day, actor="finance-1", config=CONFIG).replayed


def test_a_correction_runs_totals_are_what_it_pays(world):
    """A correction's totals gave the whole day recomputed (`eum settle` printed the day's
    net payable as the run's) while its rows paid the difference. Now `run` and `dates` are
    what the run writes, so over every successful run they add up to the day as it is now
    (kept under `recomputed`); a payment of the day recorded since is counted once."""
    day = _day(3)
    first = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
    request = service.request_reopen(world.engine, first.settlement_id, actor="alice", reason="fee table")
    service.approve_reopen(world.engine, request["request_id"], actor="bob")
    late = world.book.execute([datagen.pay("LATE-C", world.plan.members[2]["member_id"],
                                           world.plan.merchants[1]["merchant_id"], 8_800,
                                           local_midnight_us(day) + 15 * 3_600_000_000)])[0]
    assert late.ok and late.body["status"] == "approved", late.body
    dearer = SettlementConfig(watermark_lag_us=0, fee_tiers=(FeeTier(sales_max_won=None, fee_bp=130),))
    corrected = service.settle(world.engine, day, actor="finance-1", config=dearer)
    assert corrected.kind == "correction" and corrected.status == "settled", corrected.failures
    with world.engine.connect() as conn:
        rows = service.merchant_payouts(conn, corrected.settlement_id)
        runs = [r for r in service.list_settlements(conn) if r.status in service.SUCCESSFUL]
    run, own = corrected.totals["run"], corrected.totals["dates"][day.isoformat()]
    assert run["net_payable_won"] == int(rows["net_payable_won"].sum())
    assert run["net_payable_won"] == corrected.totals["payout_rows_net_payable_won"]
    assert (own["payment_count"], own["txn_count"], own["sales_won"]) == (1, 2, 8_800)  # the payment, its cashback
    assert run["cashback_net_won"] == sum(r["cashback_net_won"] for r in corrected.totals["funders"])
    assert run["net_payable_won"] != corrected.totals["recomputed"]["run"]["net_payable_won"]
    whole = corrected.totals["recomputed"]["dates"][day.isoformat()]
    for key in ("txn_count", "payment_count", "refund_count", "sales_won", "fee_won", "net_payable_won"):
        assert sum(r.totals["dates"].get(day.isoformat(), {}).get(key, 0) for r in runs) == whole[key], key


def test_reopen_of_a_settlement_that_is_not_settled_is_refused(world):
    with pytest.raises(service.SettlementNotFound):
        service.request_reopen(world.engine, "stl-1999-01-01-v1", actor="alice", reason="x")


def test_a_business_date_that_has_not_ended_cannot_be_settled(world):
    from rules.timeutil import local_date
    import time

    today = local_date(time.time_ns() // 1000)
    with pytest.raises(service.BusinessDateOpen):
        service.settle(world.engine, today, actor="finance-1", config=CONFIG)


def test_a_correction_run_stores_grant_money_by_funder_as_a_difference(world):
    """Day 0 holds the generated relief grants. Settled, reopened by a second person and
    settled again, the grant money by funder summed over every successful run of the day
    is still the day's grantfund legs: the correction stores the difference, not the day
    again (and the funders' cashback likewise)."""
    day = _day(0)
    first = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
    assert first.status == "settled"
    assert first.totals["dates"][day.isoformat()]["grants_by_source"], "the generated day holds grants"
    request = service.request_reopen(world.engine, first.settlement_id, actor="alice", reason="recheck grants")
    service.approve_reopen(world.engine, request["request_id"], actor="bob")
    corrected = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
    assert corrected.kind == "correction" and corrected.status == "settled", corrected.failures
    t, legs = s.ledger_txns, s.ledger_legs
    with world.engine.connect() as conn:
        stored = service.stored_flows(conn, day=day.isoformat())["grant_funders"]
        truth: dict[str, int] = {}
        for account, amount in conn.execute(select(legs.c.account_id, legs.c.amount_won)
                                            .join(t, t.c.txn_id == legs.c.txn_id)
                                            .where(t.c.business_date == day.isoformat(),
                                                   legs.c.account_id.like("grantfund/%"))):
            source = account.split("/")[2]
            truth[source] = truth.get(source, 0) + amount
    settled = {r["source"]: r["grant_net_won"] for r in
               stored.group_by("source").agg(pl.col("grant_net_won").sum()).iter_rows(named=True)}
    assert settled == truth and sum(truth.values()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_late_events_carried_by_an_earlier_dates_first_run_count_for_their_date(backend):
    """Day 1 settled, then a late payment dated day 1, then day 0 settled for the first
    time: that run carries the late payment as an adjustment of day 1. Day 1's funder
    flows (reports, corrections) must include it; they read only runs of day 1 and
    later, so the report was short by its cashback and a correction of day 1 wrote it a
    second time."""
    with temp_database(backend) as url:
        world = generated_book(url, start=START, days=2)
        day0, day1 = _day(0), _day(1)
        service.settle(world.engine, day1, actor="finance-1", config=CONFIG)

        def cashback(day: dt.date) -> int:
            with world.engine.connect() as conn:
                return int(service.stored_flows(conn, day=day.isoformat())["funders"]["cashback_net_won"].sum())

        before = cashback(day1)
        member, merchant = world.plan.members[0]["member_id"], world.plan.merchants[0]["merchant_id"]
        late = world.book.execute([datagen.pay("LATE-E", member, merchant, 40_000,
                                               local_midnight_us(day1) + 12 * 3_600_000_000)])[0]
        assert late.ok and late.body["status"] == "approved" and late.body["cashback"]["amount"] > 0, late.body
        carrier = service.settle(world.engine, day0, actor="finance-1", config=CONFIG)
        assert carrier.status == "settled" and day1.isoformat() in carrier.totals["dates"]
        assert cashback(day1) == before + late.body["cashback"]["amount"]
        settled = service.settle(world.engine, day1, actor="finance-1", config=CONFIG)
        request = service.request_reopen(world.engine, settled.settlement_id, actor="alice", reason="recheck")
        service.approve_reopen(world.engine, request["request_id"], actor="bob")
        corrected = service.settle(world.engine, day1, actor="finance-1", config=CONFIG)
        assert corrected.kind == "correction" and corrected.status == "settled", corrected.failures
        assert cashback(day1) == before + late.body["cashback"]["amount"]  # not written a second time
        world.engine.dispose()


def _fee_bp(day: str, sales: int) -> int:
    """DOMAIN.md: 2023–: 0% ≤ 5억, 0.55% 5–10억; earlier 0.25% ≤ 3억, 0.85% 3–5억, 1% 5–10억;
    above 10억 1.10% to 30억, 1.50% beyond in both (docs/settlement.md, assumptions)."""
    tiers = ((300_000_000, 25), (500_000_000, 85), (1_000_000_000, 100)) if day < "2023-01-01" else \
        ((500_000_000, 0), (1_000_000_000, 55))
    for bound, bp in (*tiers, (3_000_000_000, 110)):
        if sales <= bound:
            return bp
    return 150


def _fee(net: int, bp: int) -> int:
    return (abs(net) * bp // 10_000) * (1 if net >= 0 else -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fees_are_charged_by_each_rows_business_date(backend, monkeypatch):
    """Days either side of 2023-01-01, a late payment of 2022-12-31 carried by the
    2023-01-02 run, and 2022-12-31 reopened after a merchant's sales changed: every row
    pays its own business date's fee schedule (a 2022 date was settled at the 2023 rates)."""
    policy = datagen.demo_policy_data("2022-01-01T00:00:00+09:00")  # the demo policy, in force in 2022
    monkeypatch.setattr(datagen, "demo_timeline", lambda: datagen.PolicyTimeline(
        [datagen.compile_policy(datagen.validate_policy_data(policy))]))
    days = [dt.date(2022, 12, 30) + dt.timedelta(days=i) for i in range(4)]  # 12-30, 12-31, 01-01, 01-02
    with temp_database(backend) as url:
        world = generated_book(url, start=days[0], days=4, members=80, merchants=20, payments_per_day=60)
        for day in days[:3]:
            assert service.settle(world.engine, day, actor="finance-1", config=CONFIG).status == "settled"
        member, merchant = world.plan.members[0]["member_id"], world.plan.merchants[0]["merchant_id"]
        late = world.book.execute([datagen.pay("LATE-FEE", member, merchant, 40_000,
                                               local_midnight_us(days[1]) + 12 * 3_600_000_000)])[0]
        assert late.ok and late.body["status"] == "approved", late.body
        carrier = service.settle(world.engine, days[3], actor="finance-1", config=CONFIG)
        assert carrier.status == "settled" and days[1].isoformat() in carrier.totals["dates"]
        with world.engine.begin() as conn:  # the merchant's sales move to 4억: 0.85% in 2022, 0% in 2023
            before = dict(conn.execute(select(s.merchants.c.merchant_id, s.merchants.c.annual_sales_won)).all())
            conn.execute(s.merchants.update().where(s.merchants.c.merchant_id == merchant)
                         .values(annual_sales_won=400_000_000))
            first = service.merchant_payouts(conn, carrier.settlement_id)
        assert _fee_bp("2022-12-31", before[merchant]) != 85
        rows = first.filter(pl.col("kind") == "adjustment").to_dicts()
        assert [(r["for_business_date"], r["merchant_id"]) for r in rows] == [(days[1].isoformat(), merchant)]
        assert rows[0]["fee_bp"] == _fee_bp("2022-12-31", before[merchant])
        settled = service.settle(world.engine, days[1], actor="finance-1", config=CONFIG)
        request = service.request_reopen(world.engine, settled.settlement_id, actor="alice", reason="sales")
        service.approve_reopen(world.engine, request["request_id"], actor="bob")
        corrected = service.settle(world.engine, days[1], actor="finance-1", config=CONFIG)
        assert corrected.kind == "correction" and corrected.status == "settled", corrected.failures
        p, t = ss.settlement_payouts, ss.settlements
        with world.engine.connect() as conn:
            paid = conn.execute(select(p.c.for_business_date, p.c.merchant_id, p.c.kind, p.c.fee_bp, p.c.fee_won,
                                       p.c.net_sales_won).join(t, t.c.settlement_id == p.c.settlement_id)
                                .where(t.c.status.in_(service.SUCCESSFUL))).all()
        bps = {r.fee_bp for r in paid if r.for_business_date < "2023-01-01"}
        assert bps & {25, 85, 100} and not bps & {0, 55}, bps  # the generated merchants' sales span the tiers
        for r in paid:
            if r.kind == "day":  # settled before the sales changed
                assert (r.fee_bp, r.fee_won) == (_fee_bp(r.for_business_date, before[r.merchant_id]),
                                                 _fee(r.net_sales_won, r.fee_bp)), r
        # 2022-12-31 after its correction: each merchant's rows add up to its day's net
        # sales at that date's fee for its sales now
        totals: dict[str, tuple[int, int]] = {}
        for r in paid:
            if r.for_business_date == days[1].isoformat():
                net, fee = totals.get(r.merchant_id, (0, 0))
                totals[r.merchant_id] = (net + r.net_sales_won, fee + r.fee_won)
        sales = {**before, merchant: 400_000_000}
        assert totals and all(fee == _fee(net, _fee_bp("2022-12-31", sales[m])) for m, (net, fee) in totals.items()), \
            totals
        assert totals[merchant][1] == _fee(totals[merchant][0], 85) > 0
        world.engine.dispose()


@pytest.mark.postgres
@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL is not reachable")
def test_a_read_only_session_idle_in_a_transaction_does_not_hold_the_day_back(monkeypatch):
    """A BI tool's read-only transaction left open no longer holds the watermark (a day
    settled as empty, its payments paid later as adjustments, and nothing said why); one
    of the engine's own sessions, which may be recording, still does; and a run whose
    watermark falls inside its day is refused, naming the session, with nothing settled."""
    import psycopg

    from ledger.db import make_engine

    clock = lambda: time.time_ns() // 1000  # noqa: E731
    with temp_database("postgresql") as url:
        world = generated_book(url, start=START, days=2)
        plain = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain) as bi, world.engine.connect() as conn:  # a reader: no transaction id
            bi.execute("SELECT count(*) FROM merchants").fetchall()  # and now idle in its transaction
            assert service._watermarks(conn, CONFIG, clock)[2] is None
            conn.rollback()
            own = make_engine(url)
            with own.connect() as mine:
                mine.exec_driver_sql("SELECT 1").all()  # an engine session inside a transaction
                pid = mine.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
                _, w, holder = service._watermarks(conn, CONFIG, clock)
                assert holder is not None and (holder[1], holder[2]) == (pid, "eum") and w < holder[0]
            own.dispose()
        day_end = local_midnight_us(_day(1) + dt.timedelta(days=1)) - 1
        monkeypatch.setattr(service, "_watermarks", lambda *a: (-1, day_end - 5, (day_end - 4, 4242, "eum", "idle")))
        with pytest.raises(service.WatermarkHeld, match="database session 4242"):
            service.settle(world.engine, _day(1), actor="finance-1", config=CONFIG)
        with world.engine.connect() as conn:
            assert service._latest(conn, _day(1).isoformat()) is None  # nothing settled
        monkeypatch.undo()
        assert service.settle(world.engine, _day(1), actor="finance-1", config=CONFIG).status == "settled"
        world.engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_members_came_to_owe_summed_over_a_dates_runs_is_the_day(backend):
    """A correction line takes back 1,000 more than a member holds: the day's receivable
    moved 1,000. Settled, reopened and settled again with nothing changed: the rerun's
    `receivable_net_won` is the difference, 0, as its other figures are (it read the
    whole day again, 1,000 and 1,000 over the two runs; the audit of this session's
    changes)."""
    from sqlalchemy import func

    from ledger.commands import Correct

    with temp_database(backend) as url:
        world = generated_book(url, start=START, days=2)
        day = START + dt.timedelta(days=1)
        noon = local_midnight_us(day) + 12 * 3_600_000_000
        with world.engine.connect() as conn:
            balances = dict(conn.execute(select(s.accounts.c.account_id, s.accounts.c.balance_won)).all())
            members = [m for (m,) in conn.execute(select(s.members.c.member_id))]
        member_id = min(members, key=lambda m: (balances.get(f"member/{m}/points", 0)
                                                + balances.get(f"member/{m}/charged", 0), m))
        wallet = sum(v for k, v in balances.items() if k.startswith(f"member/{member_id}/"))
        spent = world.book.execute([datagen.pay("SPEND-ALL", member_id, world.plan.merchants[1]["merchant_id"],
                                                wallet, noon)])[0]
        assert spent.ok and spent.body["status"] == "approved", spent.body
        take = spent.body["cashback"]["amount"] + 1_000
        out = world.book.execute([Correct("line-x", member_id, "2026-11", (("national", -take),),
                                          (("base", -take),), noon + 3_600_000_000, "h")])[0]
        assert out.ok and out.body["clawback_detail"]["owed"] == 1_000, out
        with world.engine.connect() as conn:
            owed = int(conn.execute(
                select(func.coalesce(func.sum(s.ledger_legs.c.amount_won), 0))
                .select_from(s.ledger_legs.join(s.ledger_txns, s.ledger_txns.c.txn_id == s.ledger_legs.c.txn_id))
                .where(s.ledger_txns.c.business_date == day.isoformat(),
                       s.ledger_legs.c.account_id.like("receivable/%"))).scalar_one())
        first = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
        assert first.status == "settled", first.failures
        request = service.request_reopen(world.engine, first.settlement_id, actor="alice", reason="recheck")
        service.approve_reopen(world.engine, request["request_id"], actor="bob")
        again = service.settle(world.engine, day, actor="finance-1", config=CONFIG)
        assert again.kind == "correction" and again.status == "settled", again.failures
        world.engine.dispose()
    d = day.isoformat()
    assert owed == 1_000 and again.totals["dates"][d]["net_payable_won"] == 0
    assert [first.totals["dates"][d]["receivable_net_won"], again.totals["dates"][d]["receivable_net_won"]] == [1_000, 0]
    assert again.totals["run"]["receivable_net_won"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_payment_stamped_before_the_watermark_by_a_clock_stepped_back_is_settled_once(backend, monkeypatch):
    """Day 0 settled; the clock then steps back a minute and a late payment of day 0 is
    recorded, stamped before day 0's watermark: no later window (p, w] holds it, and it was
    never settled, its merchant never paid (operator audit). A run covers too every
    transaction of a settled date whose id is above the highest any run covered (a step
    back cannot give a new transaction an old id): once, in the next run."""
    from ledger import book as book_module

    with temp_database(backend) as url:
        world = generated_book(url, start=START, days=3)
        day0 = _day(0).isoformat()
        first = service.settle(world.engine, _day(0), actor="finance-1", config=CONFIG)
        assert first.status == "settled", first.failures
        member, merchant = world.plan.members[0]["member_id"], world.plan.merchants[0]["merchant_id"]
        stepped = first.watermark_us - 60_000_000  # the clock a minute behind the run's
        monkeypatch.setattr(book_module, "now_us", lambda: stepped)
        late = world.book.execute([datagen.pay("LATE-STEP", member, merchant, 12_300,
                                               local_midnight_us(_day(0)) + 20 * 3_600_000_000)])[0]
        assert late.ok and late.body["status"] == "approved", late.body
        monkeypatch.undo()
        with world.engine.connect() as conn:
            assert conn.execute(select(s.ledger_txns.c.recorded_at_us)
                                .where(s.ledger_txns.c.ref == "LATE-STEP")).scalars().all() == [stepped] * 2
        nxt = service.settle(world.engine, _day(1), actor="finance-1", config=CONFIG)
        assert nxt.status == "settled", nxt.failures
        assert nxt.totals["dates"][day0]["payment_count"] == 1
        with world.engine.connect() as conn:
            rows = service.merchant_payouts(conn, nxt.settlement_id).filter(pl.col("kind") == "adjustment")
        assert rows.select("for_business_date", "merchant_id", "sales_won").rows() == [(day0, merchant, 12_300)]
        assert _paid_net_sales(world.engine, day0) == _ledger_net_sales(world.engine, day0)
        with world.engine.connect() as conn:  # the coverage row's window holds the stamp it counted
            c = ss.settlement_coverage.c
            window = conn.execute(select(c.txn_count, c.from_us, c.to_us).where(
                c.settlement_id == nxt.settlement_id, c.business_date == day0)).one()
        assert window == (2, stepped - 1, nxt.watermark_us), (window, stepped, first.watermark_us)
        later = service.settle(world.engine, _day(2), actor="finance-1", config=CONFIG)  # not again
        assert later.status == "settled" and day0 not in later.totals["dates"]
        assert _paid_net_sales(world.engine, day0) == _ledger_net_sales(world.engine, day0)
        assert _coverage_check(world.engine).ok
        world.engine.dispose()


def _coverage_check(engine):
    with engine.connect() as conn:
        return next(c for c in check_book(conn) if c.name == "every transaction of a settled date is in one settlement")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_payment_a_clock_stepped_back_past_the_runs_look_back_missed_is_found_and_settled_by_reopening(
        backend, monkeypatch):
    """A step back of more than the hour a run looks back for (`STEP_BACK_MAX_US`) still
    stamps a late payment before every later window: no run settles it (documented). The
    book check finds the date short of its transactions; reopened, its correction run
    recounts the whole day and pays it, and the check is green again."""
    from ledger import book as book_module

    with temp_database(backend) as url:
        world = generated_book(url, start=START, days=3)
        day0 = _day(0).isoformat()
        first = service.settle(world.engine, _day(0), actor="finance-1", config=CONFIG)
        assert first.status == "settled" and _coverage_check(world.engine).ok
        member, merchant = world.plan.members[0]["member_id"], world.plan.merchants[0]["merchant_id"]
        stepped = first.watermark_us - 2 * 3_600_000_000  # two hours behind the run's clock
        monkeypatch.setattr(book_module, "now_us", lambda: stepped)
        late = world.book.execute([datagen.pay("LATE-STEP-2H", member, merchant, 45_600,
                                               local_midnight_us(_day(0)) + 20 * 3_600_000_000)])[0]
        assert late.ok and late.body["status"] == "approved", late.body
        monkeypatch.undo()
        nxt = service.settle(world.engine, _day(1), actor="finance-1", config=CONFIG)
        assert nxt.status == "settled" and day0 not in nxt.totals["dates"]  # missed: the documented limit
        assert _paid_net_sales(world.engine, day0) != _ledger_net_sales(world.engine, day0)
        found = _coverage_check(world.engine)
        assert not found.ok and f"{day0}: " in found.detail and found.detail.endswith("settled"), found.detail
        ledger, counted = (int(word) for word in found.detail.split(": ")[1].split()[::4][:2])
        assert ledger == counted + 2, found.detail  # the payment and its cashback transaction
        request = service.request_reopen(world.engine, first.settlement_id, actor="alice", reason="missed payment")
        service.approve_reopen(world.engine, request["request_id"], actor="bob")
        corrected = service.settle(world.engine, _day(0), actor="finance-1", config=CONFIG)
        assert corrected.kind == "correction" and corrected.status == "settled", corrected.failures
        assert _paid_net_sales(world.engine, day0) == _ledger_net_sales(world.engine, day0)
        assert _coverage_check(world.engine).ok, _coverage_check(world.engine).detail
        world.engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stepped_back_payment_carried_by_its_dates_correction_run_is_counted_there(backend, monkeypatch):
    """A payment a clock stepped back stamped before day 0's watermark, carried by day 0's
    own correction run (after a reopen): that run's figures are the day's less those the
    earlier runs counted, which took every transaction of the day stamped before the
    watermark as counted, so its txn_count said 0 for the 2 it carried (review). Money and
    payment count were right, and stay so; the next run does not carry it again."""
    from ledger import book as book_module

    with temp_database(backend) as url:
        world = generated_book(url, start=START, days=3)
        day0 = _day(0).isoformat()
        first = service.settle(world.engine, _day(0), actor="finance-1", config=CONFIG)
        member, merchant = world.plan.members[0]["member_id"], world.plan.merchants[0]["merchant_id"]
        stepped = first.watermark_us - 60_000_000
        monkeypatch.setattr(book_module, "now_us", lambda: stepped)
        late = world.book.execute([datagen.pay("LATE-STEP", member, merchant, 12_300,
                                               local_midnight_us(_day(0)) + 20 * 3_600_000_000)])[0]
        assert late.ok and late.body["status"] == "approved", late.body
        monkeypatch.undo()
        request = service.request_reopen(world.engine, first.settlement_id, actor="alice", reason="recheck")
        service.approve_reopen(world.engine, request["request_id"], actor="bob")
        corrected = service.settle(world.engine, _day(0), actor="finance-1", config=CONFIG)
        assert corrected.kind == "correction" and corrected.status == "settled", corrected.failures
        assert corrected.totals["dates"][day0]["payment_count"] == 1
        assert corrected.totals["dates"][day0]["txn_count"] == 2  # the payment and its cashback
        assert _paid_net_sales(world.engine, day0) == _ledger_net_sales(world.engine, day0)
        nxt = service.settle(world.engine, _day(1), actor="finance-1", config=CONFIG)
        assert nxt.status == "settled" and day0 not in nxt.totals["dates"], nxt.failures
        world.engine.dispose()
