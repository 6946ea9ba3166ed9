"""The fast read path of a settlement run (settlement/ledger_read.py) against the first
one (legs joined to transactions in the database, `LIKE` classes: `service.load_legs`,
`service.ledger_movements`), on SQLite and on PostgreSQL: the same legs, the same
movements, the same settlement, including late events, a span holding transactions the
run does not cover, and a run that covers nothing."""

from __future__ import annotations

import datetime as dt
import time

import polars as pl
import pytest
from sqlalchemy import func, literal, select, union_all

from ledger import schema as s
from rules.timeutil import local_midnight_us
from settlement import datagen, ledger_read, service
from settlement import schema as ss
from settlement.calendar import add_business_days
from settlement.compute import CLASSES, account_class, compute
from settlement.config import SettlementConfig
from settlement.io import adbc_uri, arrow_available
from settlement.testing import generated_book, postgres_available, temp_database

START = dt.date(2026, 11, 2)
DAYS = 4
CONFIG = SettlementConfig(watermark_lag_us=0)
NOW = 1 << 62  # a watermark after everything

BACKENDS = ["sqlite", pytest.param("postgresql", marks=[
    pytest.mark.postgres, pytest.mark.skipif(not postgres_available(), reason="PostgreSQL is not reachable")])]


@pytest.fixture(scope="module", params=BACKENDS)
def world(request):
    with temp_database(request.param) as url:
        generated = generated_book(url, start=START, days=DAYS, payments_per_day=120)
        yield generated
        generated.engine.dispose()


def _day(i: int) -> str:
    return (START + dt.timedelta(days=i)).isoformat()


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col("kind").cast(pl.String)).sort("txn_id", "account_id", "amount_won")


def _old(conn, day: str, prev_w: int, w: int):
    legs = service.load_legs(conn, day, prev_w, w)
    # The first read's CSV cannot tell NULL from "" (a top-up has no merchant): it gave
    # "". The book never writes an empty id, so "" there is a NULL in the book.
    legs = legs.with_columns(pl.col(c).replace("", None) for c in ("member_id", "merchant_id"))
    return legs, service.ledger_movements(conn, day, prev_w, w)


def _new(conn, day: str, prev_w: int, w: int, *, arrow: bool = False):
    span = ledger_read.covered_span(conn, day, prev_w, w)
    uri = adbc_uri(conn) if arrow else None
    legs = ledger_read.read_covered(conn, day, prev_w, w, span, uri=uri)
    return legs, ledger_read.span_movements(conn, day, prev_w, w, span)


def _nonzero(movements: tuple[dict, dict]) -> tuple[dict, dict]:
    by_class, counts = movements
    return {k: v for k, v in by_class.items() if v}, counts


def _compare(conn, day: str, prev_w: int, w: int) -> pl.DataFrame:
    (old_legs, old_mv), (new_legs, new_mv) = _old(conn, day, prev_w, w), _new(conn, day, prev_w, w)
    assert _sorted(new_legs).equals(_sorted(old_legs))
    assert _nonzero(new_mv) == _nonzero(old_mv)
    if conn.dialect.name == "postgresql" and arrow_available():
        arrow_legs, arrow_mv = _new(conn, day, prev_w, w, arrow=True)
        assert _sorted(arrow_legs).equals(_sorted(old_legs))
        assert arrow_mv == new_mv
        # A run's read: the span's class sums from the legs as read, in one snapshot with
        # the database's digest of them, give the movements summed in SQL.
        span = ledger_read.covered_span(conn, day, prev_w, w)
        if span is not None:
            read = ledger_read.read_span(adbc_uri(conn), day, prev_w, w, span)
            assert read.movements == _nonzero(new_mv)[0]
            assert read.ledger_digest == read.read_digest and read.ledger_digest[0] == read.legs.height
            assert read.legs["class"].equals(read.legs.select(account_class()).to_series(), check_names=False)
            assert _sorted(ledger_read.join_covered(_txns(conn, day, prev_w, w), read.legs).drop("class")).equals(
                _sorted(old_legs))
    return new_legs


def _txns(conn, day: str, prev_w: int, w: int) -> pl.DataFrame:
    return ledger_read.read_frame_arrow(adbc_uri(conn), ledger_read._txns_stmt(day, prev_w, w), ledger_read.TXN_SCHEMA)


def _settle_first_day(world) -> service.SettlementResult:
    return service.settle(world.engine, dt.date.fromisoformat(_day(0)), actor="finance-1", config=CONFIG)


def test_each_day_reads_the_same_legs_and_movements_both_ways(world):
    assert all(o.ok for o in world.outcomes)
    with world.engine.connect() as conn:
        for i in range(DAYS):
            legs = _compare(conn, _day(i), -1, NOW)
            assert legs.height > 100 and set(legs["business_date"].unique()) == {_day(i)}
            # The middle days' spans hold other days' transactions too; the read drops them.
            assert legs["kind"].cast(pl.String).is_in(["payment", "cashback"]).any()


def test_late_events_and_a_span_with_uncovered_transactions_read_the_same(world):
    first = _settle_first_day(world)
    member = world.plan.members[2]["member_id"]
    merchant = world.plan.merchants[1]["merchant_id"]
    late_at = local_midnight_us(START) + 21 * 3_600_000_000
    before_late_us = time.time_ns() // 1000
    late = world.book.execute([datagen.pay("READ-LATE-1", member, merchant, 23_400, late_at)])
    assert late[0].ok
    with world.engine.connect() as conn:
        # Day 1 run: its own transactions plus the late day-0 payment, recorded after the
        # last day's: the span reaches over days 2 and 3, which the run does not cover.
        legs = _compare(conn, _day(1), first.watermark_us, NOW)
        assert set(legs["business_date"].unique()) == {_day(0), _day(1)}
        late_legs = legs.filter(pl.col("business_date") == _day(0))
        assert late_legs.filter(pl.col("account_id") == f"merchant/{merchant}/payable")["amount_won"].sum() == -23_400
        span = ledger_read.covered_span(conn, _day(1), first.watermark_us, NOW)
        inside = conn.execute(select(s.ledger_txns.c.business_date).distinct()
                              .where(s.ledger_txns.c.txn_id.between(*span))).scalars().all()
        assert {_day(2), _day(3)} <= set(inside)
        movements, counts = ledger_read.span_movements(conn, _day(1), first.watermark_us, NOW, span)
        assert counts[_day(0)] == 2  # the payment and its cashback
        assert movements[(_day(0), "merchant_payable")] == -23_400
        # A window that ends before the late event: it is not covered, and both ways agree.
        legs = _compare(conn, _day(1), first.watermark_us, before_late_us - 1)
        assert set(legs["business_date"].unique()) == {_day(1)}


def test_a_run_that_covers_nothing_reads_nothing(world):
    with world.engine.connect() as conn:
        # A date with no transactions, and an empty window (prev_w = w) for late events at
        # the latest run's watermark, as a run would take it (a prev_w no run took, after
        # transactions no run covered, would cover those as stamped back by a clock).
        t = ss.settlements
        w = conn.execute(select(func.coalesce(func.max(t.c.watermark_us), -1))
                         .where(t.c.status.in_(service.SUCCESSFUL))).scalar_one()
        assert ledger_read.covered_span(conn, "2030-01-01", w, w) is None
        legs, (movements, counts) = _new(conn, "2030-01-01", w, w)
        assert legs.height == 0 and movements == {} and counts == {}
        old_legs, (old_mv, old_counts) = _old(conn, "2030-01-01", w, w)
        assert old_legs.height == 0 and _nonzero((old_mv, old_counts)) == ({}, {})


def test_the_settlement_computed_from_either_read_is_the_same(world):
    day = _day(2)
    with world.engine.connect() as conn:
        (old_legs, old_mv), (new_legs, new_mv) = _old(conn, day, -1, NOW), _new(conn, day, -1, NOW)
        merchants = service.load_merchants(conn)
    kwargs = dict(config=CONFIG, payout_date=add_business_days(dt.date.fromisoformat(day), 2), primary_date=day)
    a, b = compute(old_legs, merchants, **kwargs), compute(new_legs, merchants, **kwargs)
    assert a.payouts.equals(b.payouts) and a.funders.equals(b.funders) and a.grants.equals(b.grants)
    assert a.totals == b.totals
    assert all(c.ok for c in service.checks(b, *new_mv))


ACCOUNTS = [
    "member/M0000001/charged", "member/M0000001/points", "member/M0000001/grant/coupon-2025",
    "member/회원/charged", "member/M1/grants/x", "member/M1/grant", "member/M1/other", "members/M1/charged",
    "member", "member0/x", "merchant/S000001/payable", "merchant", "merchant0", "merchants/x",
    "funder/merchant/2026-11", "funder/merchant", "funder/merchant0/2026-11", "funder/city/2026-11",
    "funder/seo/2026-11", "funder", "funder0", "grantfund/coupon-2025/national", "grantfund",
    "receivable/card", "operator/cash", "operator/cashx", "operator/other", "", "zzz", "Member/M1/charged",
    "merchant/S1/payable\u00a0",
]


def test_the_sql_account_class_is_the_polars_one(world):
    """The run's SQL classes, the reference read's (`service.ledger_movements`) and the
    polars ones agree on every class. (The reference had no `receivable/` branch: a
    correction's clawback beyond what a member held read as "other" there, and the
    tests comparing the two reads would fail on any book holding one.)"""
    rows = union_all(*(select(literal(a).label("account_id")) for a in ACCOUNTS)).subquery()
    with world.engine.connect() as conn:
        cls = ledger_read.account_class_sql(rows.c.account_id, conn.dialect.name)
        got = dict(conn.execute(select(rows.c.account_id, cls)).all())
        reference = dict(conn.execute(select(rows.c.account_id, service._account_class_sql(rows.c.account_id))).all())
    want = dict(pl.DataFrame({"account_id": ACCOUNTS}).with_columns(account_class().cast(pl.String).alias("c"))
                .iter_rows())
    assert got == want
    # (SQLite's LIKE ignores ASCII case: "Member/…", which the book never names, reads
    # as a member account there.)
    assert {a: c for a, c in reference.items() if c != want[a] and a != "Member/M1/charged"} == {}
    assert set(want.values()) == set(CLASSES)


def test_a_run_reads_its_inputs_the_fast_way_and_they_equal_the_first_read(world):
    day = dt.date.fromisoformat(_day(3))
    phases: dict[str, float] = {}
    with world.engine.connect() as conn:
        got = service.read_inputs(conn, day, -1, NOW, config=CONFIG, phases=phases)
        old_legs, old_mv = _old(conn, day.isoformat(), -1, NOW)
        fast = conn.dialect.name == "postgresql" and arrow_available()
        if fast:  # classified as read; the digests of the legs read agree
            assert got.legs["class"].equals(got.legs.select(account_class()).to_series(), check_names=False)
            assert got.legs_read is not None and got.legs_read[0] == got.legs_read[1]
            got.legs = got.legs.drop("class")
        else:
            assert got.legs_read is None
        assert _sorted(got.legs).equals(_sorted(old_legs))
        assert _nonzero((got.movements, got.txn_counts)) == _nonzero(old_mv)
        assert got.payments_won == service._payments_won(conn, day, NOW)
        assert got.merchants.equals(service.load_merchants(conn))
        # On PostgreSQL with the ADBC driver, the rows come by binary COPY on connections
        # of their own (the phases say so); elsewhere on the run's connection.
        assert ("reads_s" in phases) == fast


def test_a_read_whose_legs_differ_from_the_ledger_fails_the_run_and_says_why(world, monkeypatch):
    """If the legs as read ever differed from the database's (a decoding fault, a lost
    batch), the movements taken from them could not be trusted: the run is not settled."""
    if not (world.engine.dialect.name == "postgresql" and arrow_available()):
        pytest.skip("the digest belongs to the ADBC read")
    real = ledger_read.span_digest
    monkeypatch.setattr(ledger_read, "span_digest", lambda legs: real(legs.slice(1)))
    result = service.settle(world.engine, dt.date.fromisoformat(_day(2)), actor="finance-1", config=CONFIG)
    assert result.status == "failed"
    assert [c["name"] for c in result.failures] == ["the legs read equal the ledger's legs"]
    assert "as read" in result.failures[0]["detail"]
    with world.engine.connect() as conn:
        assert service.merchant_payouts(conn, result.settlement_id).height == 0
