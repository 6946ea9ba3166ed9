"""Reconciliation of the clearing file: planted differences come back exactly; encodings;
malformed files name their lines."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
from sqlalchemy import select

from ledger import schema as s
from ledger.db import reader
from rules.timeutil import rfc3339
from settlement import reconcile as rc
from settlement.config import SettlementConfig
from settlement.testing import generated_book, temp_database

DAY = dt.date(2026, 11, 3)


def _csv(rows: list[list], header=("record_type", "approval_id", "merchant_id", "amount_won", "transacted_at",
                                   "split_seq", "refund_id")) -> str:
    lines = [",".join(header)]
    lines += [",".join("" if v is None else str(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def book():
    with temp_database("sqlite") as url:
        generated = generated_book(url, start=dt.date(2026, 11, 2), days=3, payments_per_day=300)
        yield generated
        generated.engine.dispose()


def _ledger_day(engine, day: dt.date):
    from rules.timeutil import local_midnight_us

    lo, hi = local_midnight_us(day), local_midnight_us(day + dt.timedelta(days=1))
    with reader(engine).connect() as conn:
        pays = conn.execute(select(s.payments).where(s.payments.c.occurred_at_us >= lo,
                                                     s.payments.c.occurred_at_us < hi,
                                                     s.payments.c.status == "approved")
                            .order_by(s.payments.c.payment_id)).all()
        refunds = conn.execute(select(s.refunds).where(s.refunds.c.occurred_at_us >= lo,
                                                       s.refunds.c.occurred_at_us < hi)).all()
    return pays, refunds


def test_planted_differences_come_back_exactly(book):
    day = next(d for d in (dt.date(2026, 11, 2) + dt.timedelta(days=i) for i in range(3))
               if _ledger_day(book.engine, d)[1])
    pays, refunds = _ledger_day(book.engine, day)
    assert len(pays) > 50 and refunds
    rows, planted = [], {"missing_in_clearing": set(), "missing_in_ledger": set(), "amount_mismatch": set(),
                         "duplicates": set(), "split": set()}
    for i, p in enumerate(pays):
        at = rfc3339(p.occurred_at_us)
        if i in (3, 17):
            planted["missing_in_clearing"].add(p.payment_id)
            continue
        if i in (5, 23):
            planted["amount_mismatch"].add(p.payment_id)
            rows.append(["P", p.payment_id, p.merchant_id, p.amount_won + 100, at, None, None])
            continue
        if i in (8, 30) and p.amount_won >= 200:
            planted["split"].add(p.payment_id)
            first = p.amount_won // 2
            rows.append(["P", p.payment_id, p.merchant_id, first, at, 1, None])
            rows.append(["P", p.payment_id, p.merchant_id, p.amount_won - first, at, 2, None])
            continue
        rows.append(["P", p.payment_id, p.merchant_id, p.amount_won, at, None, None])
        if i in (11, 40):
            planted["duplicates"].add(len(rows) + 2)  # the repeated line's number (header is line 1)
            rows.append(["P", p.payment_id, p.merchant_id, p.amount_won, at, None, None])
    for n in range(2):
        planted["missing_in_ledger"].add(f"NOT-OURS-{n}")
        rows.append(["P", f"NOT-OURS-{n}", "S000001", 5_000, f"{day.isoformat()} 12:00:0{n}", None, None])
    for r in refunds:
        rows.append(["R", r.payment_id, "x", r.amount_won, rfc3339(r.occurred_at_us), None, r.refund_id])
    result = rc.reconcile(reader(book.engine).connect(), _csv(rows).encode("utf-8"), config=SettlementConfig())
    f = result.frames
    assert set(f["missing_in_clearing"]["approval_id"]) == planted["missing_in_clearing"]
    assert set(f["missing_in_ledger"]["approval_id"]) == planted["missing_in_ledger"]
    assert set(f["amount_mismatch"]["approval_id"]) == planted["amount_mismatch"]
    assert f["amount_mismatch"]["difference_won"].to_list() == [100, 100]
    assert set(f["duplicates"]["line"]) == planted["duplicates"]
    assert f["merchant_mismatch"].height == 0
    matched = f["matched"]
    assert set(matched.filter(pl.col("split").fill_null(False))["approval_id"]) == planted["split"]
    assert matched.filter(pl.col("record_type") == "R").height == len(refunds)
    assert matched.filter(pl.col("record_type") == "P").height == len(pays) - 4
    body = result.body(rows_max=5)
    assert body["matched"]["rows_truncated"] and body["duplicates"]["count"] == 2
    assert body["facts"]["business_dates"] == [day.isoformat()]


def test_tolerance_absorbs_small_differences():
    clearing, _ = rc.parse_clearing(_csv([["P", "p1", "S1", 10_001, "2026-11-03 12:00:00", None, None]]).encode())
    ledger = pl.DataFrame({"payment_id": ["p1"], "merchant_id": ["S1"], "amount_won": [10_000],
                           "occurred_at_us": clearing["transacted_at_us"].to_list(), "status": ["approved"]})
    refunds = pl.DataFrame(schema=rc.LEDGER_REFUNDS_SCHEMA)
    assert rc.reconcile_frames(clearing, ledger, refunds).counts()["amount_mismatch"] == 1
    assert rc.reconcile_frames(clearing, ledger, refunds, tolerance_won=1).counts()["matched"] == 1


def test_declined_payment_in_clearing_is_missing_in_ledger_with_the_reason():
    clearing, _ = rc.parse_clearing(_csv([["P", "p1", "S1", 10_000, "2026-11-03 12:00:00", None, None]]).encode())
    ledger = pl.DataFrame({"payment_id": ["p1"], "merchant_id": ["S1"], "amount_won": [10_000],
                           "occurred_at_us": clearing["transacted_at_us"].to_list(), "status": ["declined"]})
    result = rc.reconcile_frames(clearing, ledger, pl.DataFrame(schema=rc.LEDGER_REFUNDS_SCHEMA))
    assert result.frames["missing_in_ledger"]["reason"].to_list() == ["payment is declined in the ledger"]


KOREAN = "구분,승인번호,가맹점번호,거래금액,거래일시\n승인,p1,S1,\"12,000\",20261103120000\n취소,p1,S1,2000,20261103130000\n"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp949"])
def test_utf8_bom_and_cp949_files_read_the_same(encoding):
    frame, facts = rc.parse_clearing(KOREAN.encode(encoding))
    assert facts["encoding"] == encoding and facts["declares_refunds"]
    assert frame.select("record_type", "approval_id", "amount_won").rows() == [("P", "p1", 12_000), ("R", "p1", 2_000)]
    expected = int(dt.datetime(2026, 11, 3, 3, 0, tzinfo=dt.timezone.utc).timestamp()) * 1_000_000
    assert frame["transacted_at_us"][0] == expected


def test_malformed_lines_are_listed_by_number():
    text = _csv([["P", "ok-1", "S1", 1000, "2026-11-03 12:00:00", None, None],
                 ["P", "bad id!", "S1", 1000, "2026-11-03 12:00:00", None, None],
                 ["P", "ok-2", "S1", "12.5", "2026-11-03 12:00:00", None, None],
                 ["X", "ok-3", "S1", 1000, "yesterday", None, None],
                 ["P", "ok-4", "S1", 0, "2026-11-03 12:00:00", "a", None]])
    with pytest.raises(rc.ClearingFileInvalid) as caught:
        rc.parse_clearing(text.encode())
    errors = caught.value.extra["errors"]
    assert [e["line"] for e in errors] == [3, 4, 5, 6]
    assert "approval_id" in errors[0]["reason"] and "whole number" in errors[1]["reason"]
    assert "lines 3, 4, 5, 6" in caught.value.detail and caught.value.status == 422


def test_ragged_lines_missing_columns_and_bad_bytes_are_clear_errors():
    with pytest.raises(rc.ClearingFileInvalid) as ragged:
        rc.parse_clearing(b"approval_id,merchant_id,amount_won,transacted_at\np1,S1,1,2026-11-03 12:00:00\n"
                          b"p2,S1,1,2026-11-03 12:00:00,extra\n")
    assert ragged.value.extra["errors"][0]["line"] == 3
    with pytest.raises(rc.ClearingFileInvalid) as header:
        rc.parse_clearing(b"approval_id,amount_won\np1,1\n")
    assert "merchant_id" in header.value.detail and "transacted_at" in header.value.detail
    with pytest.raises(rc.ClearingFileInvalid) as binary:
        rc.parse_clearing(b"approval_id,merchant_id,amount_won,transacted_at\n\xff\xfe\xff\n")
    assert binary.value.extra["errors"][0]["line"] == 2
    with pytest.raises(rc.ClearingFileInvalid):
        rc.parse_clearing(b"")


def test_a_file_of_no_lines_and_times_outside_the_years_are_refused():
    for text in ("approval_id,merchant_id,amount_won,transacted_at\n", "approval_id,merchant_id,amount_won,transacted_at"):
        with pytest.raises(rc.ClearingFileInvalid) as empty:
            rc.parse_clearing(text.encode())
        assert "no clearing lines" in empty.value.detail and empty.value.status == 422
    # Valid times, but year 10000 in Seoul or year 1: they once failed deep in the matching as a 500.
    text = _csv([["P", "ok-1", "S1", 1000, "2026-11-03 12:00:00", None, None],
                 ["P", "far-1", "S1", 1000, "9999-12-31T23:59:59-12:00", None, None],
                 ["P", "far-2", "S1", 1000, "0001-01-01T00:00:00+14:00", None, None]])
    with pytest.raises(rc.ClearingFileInvalid) as far:
        rc.parse_clearing(text.encode())
    assert [(e["line"], e["reason"]) for e in far.value.extra["errors"]] == [
        (3, "transacted_at is not between 2000-01-01 and 2099-12-31, Seoul time"),
        (4, "transacted_at is not between 2000-01-01 and 2099-12-31, Seoul time")]


def test_the_business_date_keeps_a_line_timed_past_midnight_from_pulling_in_the_next_day(book):
    """A day's file whose last line the network timed one second past midnight: by its
    lines' times it covers two days, and every payment of the second is missing from it.
    Told its business date, it covers that day, and the late line still matches its
    payment by id."""
    day = dt.date(2026, 11, 3)
    pays, refunds = _ledger_day(book.engine, day)
    after, after_refunds = _ledger_day(book.engine, day + dt.timedelta(days=1))
    assert pays and after
    with reader(book.engine).connect() as conn:
        merchant_of = dict(conn.execute(select(s.payments.c.payment_id, s.payments.c.merchant_id)).all())
    rows = [["R", r.payment_id, merchant_of[r.payment_id], r.amount_won, rfc3339(r.occurred_at_us), None, r.refund_id]
            for r in refunds]
    rows += [["P", p.payment_id, p.merchant_id, p.amount_won, rfc3339(p.occurred_at_us), None, None] for p in pays]
    rows[-1][4] = f"{day + dt.timedelta(days=1)}T00:00:01+09:00"
    data = _csv(rows).encode()
    with reader(book.engine).connect() as conn:
        by_times = rc.reconcile(conn, data)
        by_date = rc.reconcile(conn, data, business_date=day)
    assert by_times.facts["business_dates"] == [day.isoformat(), (day + dt.timedelta(days=1)).isoformat()]
    assert by_times.counts()["missing_in_clearing"] == len(after) + len(after_refunds)
    assert by_date.facts["business_dates"] == [day.isoformat()]
    assert by_date.counts()["matched"] == len(pays) + len(refunds) and by_date.exceptions == 0
