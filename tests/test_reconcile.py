"""Reconciliation of the clearing file: planted differences come back exactly; encodings;
malformed files name their lines."""

from __future__ import annotations

import csv
import datetime as dt
import time

import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
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
    with reader(book.engine).connect() as conn:
        merchant_of = dict(conn.execute(select(s.payments.c.payment_id, s.payments.c.merchant_id)).all())
    for r in refunds:  # cleared to the payment's merchant: refund lines' merchants are checked too
        rows.append(["R", r.payment_id, merchant_of[r.payment_id], r.amount_won, rfc3339(r.occurred_at_us), None,
                     r.refund_id])
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
    assert body["rows_truncated"]["matched"] and len(body["matched"]) == 5 and body["counts"]["duplicates"] == 2
    assert not body["rows_truncated"]["duplicates"] and len(body["duplicates"]) == 2
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


@pytest.mark.parametrize("head,encoding", [
    ("\ufeff구분", "utf-8-sig"),  # a BOM'd file saved again with a BOM: two BOMs
    ("구 분", "cp949"), ("구분\u200b", "utf-8"), (" TYPE ", "utf-8"), ("구분", "utf-8")])
def test_a_type_column_spelled_otherwise_is_still_read_as_the_type(head, encoding):
    """The 구분 column under a name not spelled exactly as an alias (two BOMs, a space
    inside, a zero-width space) was ignored as an unknown column: every 취소 line
    was read as a 승인 line and the refunded payment was an amount_mismatch of the refund
    twice over, nothing saying why (Korean text audit, repro_1)."""
    frame, facts = rc.parse_clearing(KOREAN.replace("구분", head, 1).encode(encoding))
    assert facts["declares_refunds"] and facts["ignored_columns"] == [], facts
    assert frame["record_type"].to_list() == ["P", "R"]


def test_an_unknown_column_is_listed_and_one_holding_record_types_refuses_the_file():
    """Columns the format does not know are ignored (a network's file carries more than
    the engine reads) and named in facts.ignored_columns; one whose every value is a
    record type (승인/취소, P/R) is the type under a name the format does not know, and
    reading its lines as purchases would be wrong: the file is refused naming it."""
    extra = KOREAN.replace("거래일시\n", "거래일시,가맹점명\n").replace("20261103120000\n", "20261103120000,한빛\n")
    extra = extra.replace("20261103130000\n", "20261103130000,\n")
    frame, facts = rc.parse_clearing(extra.encode("cp949"))
    assert facts["ignored_columns"] == ["가맹점명"] and frame["record_type"].to_list() == ["P", "R"]
    typed = KOREAN.replace("구분", "매출 구분\u200b", 1)
    with pytest.raises(rc.ClearingFileInvalid) as refused:
        rc.parse_clearing(typed.encode("utf-8"))
    assert "'매출 구분\\u200b'" in refused.value.detail and "record_type" in refused.value.detail, refused.value.detail
    assert refused.value.extra["errors"][0]["line"] == 1 and "매출 구분" in refused.value.extra["errors"][0]["reason"]
    # A column of purchases alone (another column's P: a personal card's) reads the same
    # ignored: listed, not refused.
    cards = KOREAN.replace("거래일시\n", "거래일시,카드구분\n").replace("20261103120000\n", "20261103120000,P\n")
    cards = cards.replace("20261103130000\n", "20261103130000,P\n")
    frame, facts = rc.parse_clearing(cards.encode("cp949"))
    assert facts["ignored_columns"] == ["카드구분"] and frame["record_type"].to_list() == ["P", "R"]
    # 거래구분 is no name of the type (some files put 일시불/할부 there): holding 승인/취소
    # it refuses the file naming it; holding 일시불/할부 it is ignored.
    with pytest.raises(rc.ClearingFileInvalid) as refused:
        rc.parse_clearing(KOREAN.replace("구분", "거래구분", 1).encode("cp949"))
    assert "'거래구분'" in refused.value.detail, refused.value.detail
    plans = KOREAN.replace("거래일시\n", "거래일시,거래구분\n").replace("20261103120000\n", "20261103120000,일시불\n")
    plans = plans.replace("20261103130000\n", "20261103130000,할부\n")
    frame, facts = rc.parse_clearing(plans.encode("cp949"))
    assert facts["ignored_columns"] == ["거래구분"] and frame["record_type"].to_list() == ["P", "R"]


def test_a_header_of_more_columns_than_a_clearing_file_has_is_refused_at_once():
    """A header of 5,000 short names (37 kB) was read, every ignored column checked one
    at a time for record types, each lookup listing the frame's columns again: minutes
    of a worker's upload slot for a file under 1 MB (the security audit). More than
    HEADER_FIELDS_MAX fields is refused before the header is split; as many is read."""
    head = "approval_id,merchant_id,amount_won,transacted_at,"
    line = "p1,S1,1000,2026-11-03 12:00:00,"
    wide = rc.HEADER_FIELDS_MAX - 4
    frame, facts = rc.parse_clearing((head + ",".join(f"c{i}" for i in range(wide)) + "\n" + line
                                      + "," * (wide - 1) + "\n").encode())
    assert frame.height == 1 and len(facts["ignored_columns"]) == wide
    started = time.perf_counter()
    with pytest.raises(rc.ClearingFileInvalid) as refused:
        rc.parse_clearing((head + ",".join(f"c{i}" for i in range(5_000)) + "\n" + line + "," * 4_999
                           + "\n").encode())
    assert time.perf_counter() - started < 1, "refused before the columns are read"
    assert refused.value.status == 422 and "more than 1,000 fields" in refused.value.detail, refused.value.detail
    assert refused.value.extra["errors"] == [{"line": 1, "reason": "more than 1,000 fields"}]


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


def test_commas_in_an_amount_are_thousands_separators_or_the_lines_error():
    """Every comma of an amount was dropped wherever it stood: "12000,00" (a decimal comma,
    12,000 won) was read as 1,200,000 won, "12,00" as 1,200 and "1,2,000" as 12,000
    (clearing-file reconciliation audit). Commas group the digits by three, or the line
    is refused as "12000.00" is."""
    header = "approval_id,merchant_id,amount_won,transacted_at\n"
    good = ["12,000", "1,234,567", " 1,000 ", "999", "12000", "1000000"]
    frame, _ = rc.parse_clearing((header + "".join(f'p{i},S1,"{a}",2026-11-03 12:00:00\n'
                                                   for i, a in enumerate(good))).encode())
    assert frame["amount_won"].to_list() == [12_000, 1_234_567, 1_000, 999, 12_000, 1_000_000]
    bad = ["12000,00", "12,00", "1,2,000", ",000", "1,000,", "1000,000", "1,0000", "12,000.00", "-12,000"]
    with pytest.raises(rc.ClearingFileInvalid) as refused:
        rc.parse_clearing((header + "".join(f'p{i},S1,"{a}",2026-11-03 12:00:00\n'
                                            for i, a in enumerate(bad))).encode())
    reasons = [(e["line"], e["reason"]) for e in refused.value.extra["errors"]]
    assert reasons[:-1] == [(line, "amount_won is not a whole number of won") for line in range(2, 10)], reasons
    assert reasons[-1][0] == 10 and reasons[-1][1].startswith("amount_won out of 1..10^12 (negative"), reasons


def test_ragged_lines_missing_columns_and_bad_bytes_are_clear_errors():
    with pytest.raises(rc.ClearingFileInvalid) as ragged:
        rc.parse_clearing(b"approval_id,merchant_id,amount_won,transacted_at\np1,S1,1,2026-11-03 12:00:00\n"
                          b"p2,S1,1,2026-11-03 12:00:00,extra\n")
    assert ragged.value.extra["errors"][0]["line"] == 3
    with pytest.raises(rc.ClearingFileInvalid) as header:
        rc.parse_clearing(b"approval_id,amount_won\np1,1\n")
    assert "merchant_id" in header.value.detail and "transacted_at" in header.value.detail
    # A column named twice, or under two of its names (amount_won and 금액): one was read
    # and the other dropped, whichever the network meant.
    for head in ("approval_id,merchant_id,amount_won,transacted_at,amount_won", "approval_id,merchant_id,amount_won,"
                 "transacted_at,금액"):
        with pytest.raises(rc.ClearingFileInvalid) as twice:
            rc.parse_clearing(f"{head}\np1,S1,1,2026-11-03 12:00:00,9\n".encode())
        assert "amount_won" in twice.value.detail and twice.value.extra["errors"][0]["line"] == 1, twice.value.detail
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
    Told its business date, it covers that day, and the line past midnight still finds its
    payment by id: late."""
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
    # The line still finds its payment by id, and is reported late (another business date).
    assert by_date.counts()["matched"] == len(pays) + len(refunds) - 1 and by_date.exceptions == 1
    late = by_date.frames["late"].row(0, named=True)
    assert (late["approval_id"], late["ledger_business_date"], late["clearing_business_date"]) == (
        pays[-1].payment_id, day.isoformat(), (day + dt.timedelta(days=1)).isoformat())


# ---------------------------------------------------------------- readable times (RFC 3339, Seoul)


def _ledger(rows: list[tuple]) -> pl.DataFrame:
    """Approved payments (payment_id, merchant_id, amount_won, occurred_at_us)."""
    return pl.DataFrame([(*r, "approved") for r in rows], schema=rc.LEDGER_PAYMENTS_SCHEMA, orient="row")


def _refunds(rows: list[tuple]) -> pl.DataFrame:
    """Refunds (refund_id, payment_id, amount_won, occurred_at_us)."""
    return pl.DataFrame(rows, schema=rc.LEDGER_REFUNDS_SCHEMA, orient="row")


NOON_US = rc.to_us(dt.datetime(2026, 11, 3, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=9))))


@pytest.mark.parametrize("us", [NOON_US, NOON_US + 1, NOON_US + 250_000, NOON_US - 1, rc.SPAN_FIRST_US,
                                rc.SPAN_END_US - 1, 1_796_164_363_000_000, 1_796_164_363_000_001])
def test_the_vectorised_rfc3339_is_timeutils_text(us):
    frame = pl.DataFrame({"t": [us, None]}, schema={"t": pl.Int64})
    assert frame.select(rc.rfc3339_expr("t")).to_series().to_list() == [rfc3339(us), None]


def test_result_rows_carry_readable_times_beside_the_microseconds():
    text = _csv([["P", "p1", "S1", 10_000, "2026-11-03T12:00:00.5+09:00", None, None],
                 ["P", "p1", "S1", 10_000, "2026-11-03T12:00:00.5+09:00", None, None]])
    clearing, facts = rc.parse_clearing(text.encode())
    payments = _ledger([("p1", "S1", 10_000, NOON_US), ("p2", "S1", 3_000, NOON_US + 7)])
    refunds = _refunds([("r9", "p2", 1_000, NOON_US + 60_000_000)])
    result = rc.reconcile_frames(clearing, payments, refunds, declares_refunds=True)
    f = result.frames
    for name, column in (("duplicates", "transacted_at"), ("missing_in_clearing", "occurred_at")):
        columns = f[name].columns
        assert columns.index(column) == columns.index(f"{column}_us") + 1, (name, columns)
        assert f[name][column].to_list() == [rfc3339(v) for v in f[name][f"{column}_us"].to_list()]
    assert f["duplicates"]["transacted_at"].to_list() == ["2026-11-03T12:00:00.500000+09:00"]
    assert sorted(f["missing_in_clearing"]["occurred_at"].to_list()) == [
        "2026-11-03T12:00:00.000007+09:00", "2026-11-03T12:01:00+09:00"]
    body = result.body()
    row = body["missing_in_clearing"][0]
    assert isinstance(row["occurred_at_us"], int) and row["occurred_at"] == rfc3339(row["occurred_at_us"])
    assert body["duplicates"][0]["transacted_at"] == "2026-11-03T12:00:00.500000+09:00"


# ---------------------------------------------------------------- split_seq: parts of a split, or resends


SPLIT_HEADER = ("approval_id", "merchant_id", "amount_won", "transacted_at", "split_seq")
PLAIN_HEADER = ("approval_id", "merchant_id", "amount_won", "transacted_at")


def _run(rows, header, payments, refunds=None) -> rc.Reconciliation:
    clearing, facts = rc.parse_clearing(_csv(rows, header=header).encode())
    return rc.reconcile_frames(clearing, payments, _refunds(refunds or []),
                               declares_refunds=facts["declares_refunds"], declares_splits=facts["declares_splits"])


def test_a_resend_without_split_seq_in_a_file_declaring_it_is_a_duplicate_not_a_split():
    """The audit's case: 70,000 cleared twice (the second a second later), no split_seq, in a
    file with a split_seq column: matched once, the second line a duplicate of the first."""
    payments = _ledger([("p1", "S1", 70_000, NOON_US)])
    result = _run([["p1", "S1", "\"70,000\"", "2026-11-03 12:00:00", None],
                   ["p1", "S1", "\"70,000\"", "2026-11-03 12:00:01", None]], SPLIT_HEADER, payments)
    f = result.frames
    assert result.counts() == {"matched": 1, "missing_in_ledger": 0, "missing_in_clearing": 0, "amount_mismatch": 0,
                               "duplicates": 1, "merchant_mismatch": 0, "late": 0}
    assert f["matched"].select("approval_id", "clearing_amount_won", "clearing_rows", "split", "lines").rows() == [
        ("p1", 70_000, 1, False, [2])]
    dup = f["duplicates"].row(0, named=True)
    assert (dup["line"], dup["first_line"], dup["amount_won"]) == (3, 2, 70_000)
    assert dup["transacted_at"] == "2026-11-03T12:00:01+09:00" and "split_seq" in dup["reason"]


def test_resends_in_a_file_declaring_split_seq_each_name_the_first_line():
    payments = _ledger([("p1", "S1", 70_000, NOON_US), ("p2", "S1", 40_000, NOON_US)])
    result = _run([["p1", "S1", 70_000, "2026-11-03 12:00:00", None],
                   ["p2", "S1", 15_000, "2026-11-03 12:00:00", 1],
                   ["p1", "S1", 70_000, "2026-11-03 12:05:00", None],
                   ["p2", "S1", 25_000, "2026-11-03 12:00:00", 2],
                   ["p1", "S1", 70_000, "2026-11-03 12:09:00", None]], SPLIT_HEADER, payments)
    f = result.frames
    assert f["duplicates"].select("line", "first_line").rows() == [(4, 2), (6, 2)]
    assert f["matched"].select("approval_id", "clearing_amount_won", "split").sort("approval_id").rows() == [
        ("p1", 70_000, False), ("p2", 40_000, True)]
    assert result.exceptions == 2


def test_a_second_line_of_another_amount_without_split_seq_stays_an_amount_mismatch():
    payments = _ledger([("p1", "S1", 70_000, NOON_US), ("p2", "S1", 100_000, NOON_US)])
    result = _run([["p1", "S1", 70_000, "2026-11-03 12:00:00", None],
                   ["p1", "S1", 50_000, "2026-11-03 12:00:01", None],
                   # adding up to the payment, but without split_seq these are not parts of a split
                   ["p2", "S1", 70_000, "2026-11-03 12:00:00", None],
                   ["p2", "S1", 30_000, "2026-11-03 12:00:01", None]], SPLIT_HEADER, payments)
    f = result.frames
    assert f["duplicates"].height == 0 and f["matched"].height == 0
    assert f["amount_mismatch"].select("approval_id", "clearing_amount_won", "difference_won", "clearing_rows",
                                       "split").rows() == [("p1", 120_000, 50_000, 2, False),
                                                           ("p2", 100_000, 0, 2, False)]


def test_a_part_sent_again_under_its_split_seq_is_a_duplicate_not_a_third_part():
    """A split's part resent by the network (the same split_seq, a minute later) was summed
    as one more part: 40,000 cleared as 15,000 + 25,000 + 15,000 was an amount_mismatch of
    55,000, and part 1 sent twice with part 2 lost matched a 30,000 payment. It is a
    duplicate of the first, as a resend without split_seq is; a repeated split_seq of
    another amount is no split, whatever the lines add up to."""
    payments = _ledger([("p1", "S1", 40_000, NOON_US), ("p2", "S1", 30_000, NOON_US),
                        ("p3", "S1", 30_000, NOON_US)])
    result = _run([["p1", "S1", 15_000, "2026-11-03 12:00:00", 1],
                   ["p1", "S1", 25_000, "2026-11-03 12:00:00", 2],
                   ["p1", "S1", 15_000, "2026-11-03 12:01:00", 1],
                   ["p2", "S1", 15_000, "2026-11-03 12:00:00", 1],
                   ["p2", "S1", 15_000, "2026-11-03 12:01:00", 1],
                   ["p3", "S1", 10_000, "2026-11-03 12:00:00", 1],
                   ["p3", "S1", 20_000, "2026-11-03 12:01:00", 1]], SPLIT_HEADER, payments)
    f = result.frames
    assert f["matched"].select("approval_id", "clearing_amount_won", "split", "lines").rows() == [
        ("p1", 40_000, True, [2, 3])]
    assert f["duplicates"].select("line", "first_line", "approval_id").rows() == [(4, 2, "p1"), (6, 5, "p2")]
    assert all("split_seq again" in reason for reason in f["duplicates"]["reason"])
    assert f["amount_mismatch"].select("approval_id", "clearing_amount_won", "difference_won", "split").rows() == [
        ("p2", 15_000, -15_000, False), ("p3", 30_000, 0, False)]
    # Every line in exactly one category.
    assert sorted([*f["duplicates"]["line"], *[n for c in ("matched", "amount_mismatch")
                                               for lines in f[c]["lines"] for n in lines]]) == list(range(2, 9))


def test_a_refunds_part_sent_again_under_its_split_seq_is_a_duplicate():
    payments = _ledger([("p1", "S1", 100_000, NOON_US)])
    refunds = [("r1", "p1", 7_777, NOON_US + 3_600_000_000)]
    result = _run([["P", "p1", "S1", 100_000, "2026-11-03 12:00:05", None, None],
                   ["R", "p1", "S1", 7_000, "2026-11-03 13:00:05", "r1", 1],
                   ["R", "p1", "S1", 777, "2026-11-03 13:00:06", "r1", 2],
                   ["R", "p1", "S1", 7_000, "2026-11-03 13:05:05", "r1", 1]],
                  (*REFUND_HEADER, "split_seq"), payments, refunds)
    assert result.frames["matched"].filter(pl.col("record_type") == "R").select(
        "refund_id", "clearing_amount_won", "split", "lines").rows() == [("r1", 7_777, True, [3, 4])]
    assert result.frames["duplicates"].select("line", "first_line", "refund_id").rows() == [(5, 3, "r1")]
    assert "refund's part" in result.frames["duplicates"]["reason"][0] and result.exceptions == 1


def test_a_whole_line_beside_numbered_parts_is_no_split_even_when_they_add_up():
    """Finance audit: in a file declaring split_seq, a payment's line without it (the
    whole payment) beside numbered parts was summed with them: 30,000 whole with part 2
    of 10,000, part 1 lost, matched a 40,000 payment. A whole line and parts are no split
    (amount_mismatch), as two whole lines of other amounts are; the refunds' alike."""
    payments = _ledger([("p1", "S1", 40_000, NOON_US), ("p2", "S1", 40_000, NOON_US),
                        ("p3", "S1", 100_000, NOON_US)])
    refunds = [("r1", "p3", 9_000, NOON_US + 3_600_000_000)]
    result = _run([["P", "p1", "S1", 30_000, "2026-11-03 12:00:00", None, None],
                   ["P", "p1", "S1", 10_000, "2026-11-03 12:00:01", None, 2],
                   ["P", "p2", "S1", 30_000, "2026-11-03 12:00:00", None, 1],
                   ["P", "p2", "S1", 10_000, "2026-11-03 12:00:01", None, 2],
                   ["P", "p3", "S1", 100_000, "2026-11-03 12:00:00", None, None],
                   ["R", "p3", "S1", 4_000, "2026-11-03 13:00:00", "r1", None],
                   ["R", "p3", "S1", 5_000, "2026-11-03 13:00:01", "r1", 1]],
                  (*REFUND_HEADER, "split_seq"), payments, refunds)
    f = result.frames
    assert f["matched"].select("record_type", "approval_id", "split").sort("approval_id").rows() == [
        ("P", "p2", True), ("P", "p3", False)]
    assert f["amount_mismatch"].select("record_type", "approval_id", "refund_id", "clearing_amount_won",
                                       "difference_won", "split", "lines").sort("record_type").rows() == [
        ("P", "p1", None, 40_000, 0, False, [2, 3]), ("R", "p3", "r1", 9_000, 0, False, [7, 8])]
    assert f["duplicates"].height == 0


def test_a_refund_id_on_a_p_line_is_that_lines_error_not_a_part_of_the_payment():
    """Finance audit: a refund's line with its type left blank (P by default) and its
    refund_id given was summed with the payment's P lines (an amount_mismatch of the
    payment, the refund missing), its refund_id unread. It is the line's error, as any
    malformed line is: the file is refused naming it; written as an R line it matches."""
    payments = _ledger([("p1", "S1", 100_000, NOON_US)])
    refunds = _refunds([("r1", "p1", 7_000, NOON_US + 3_600_000_000)])
    rows = [["P", "p1", "S1", 100_000, "2026-11-03 12:00:05", None],
            [None, "p1", "S1", 7_000, "2026-11-03 13:00:05", "r1"],
            ["p", "p1", "S1", 7_000, "2026-11-03 13:00:06", " r1 "]]
    with pytest.raises(rc.ClearingFileInvalid) as refused:
        rc.parse_clearing(_csv(rows, header=REFUND_HEADER).encode())
    why = "refund_id is given on a P line: a refund is an R line (record_type R)"
    assert refused.value.extra["errors"] == [{"line": 3, "reason": why}, {"line": 4, "reason": why}]
    clearing, facts = rc.parse_clearing(_csv(rows[:1] + [["R", *rows[1][1:]]], header=REFUND_HEADER).encode())
    result = rc.reconcile_frames(clearing, payments, refunds, declares_refunds=facts["declares_refunds"])
    assert result.frames["matched"].select("record_type", "approval_id", "refund_id", "lines").sort(
        "record_type").rows() == [("P", "p1", None, [2]), ("R", "p1", "r1", [3])]
    assert result.exceptions == 0


def test_a_file_without_a_split_seq_column_still_sums_the_lines_of_an_approval():
    payments = _ledger([("p1", "S1", 70_000, NOON_US)])
    result = _run([["p1", "S1", 35_000, "2026-11-03 12:00:00"], ["p1", "S1", 35_000, "2026-11-03 12:00:01"]],
                  PLAIN_HEADER, payments)
    assert result.frames["matched"].select("clearing_amount_won", "clearing_rows", "split").rows() == [
        (70_000, 2, True)]
    assert result.exceptions == 0 and not result.facts.get("declares_splits")


def test_the_resend_rule_runs_through_the_database_too(book):
    day = dt.date(2026, 11, 3)
    p = _ledger_day(book.engine, day)[0][0]
    at = rfc3339(p.occurred_at_us)
    data = _csv([["P", p.payment_id, p.merchant_id, p.amount_won, at, None, None],
                 ["P", p.payment_id, p.merchant_id, p.amount_won, rfc3339(p.occurred_at_us + 1_000_000), None, None]])
    with reader(book.engine).connect() as conn:
        result = rc.reconcile(conn, data.encode(), business_date=day)
    assert result.facts["declares_splits"]
    assert result.counts()["amount_mismatch"] == 0 and result.frames["duplicates"]["first_line"].to_list() == [2]
    assert p.payment_id in result.frames["matched"]["approval_id"].to_list()


# ---------------------------------------------------------------- refunds: the merchant is checked


REFUND_HEADER = ("record_type", "approval_id", "merchant_id", "amount_won", "transacted_at", "refund_id")


@pytest.mark.parametrize("by_id", [True, False])
def test_a_refund_line_cleared_to_another_merchant_is_a_merchant_mismatch(by_id):
    payments = _ledger([("p1", "S1", 70_000, NOON_US), ("p2", "S2", 50_000, NOON_US)])
    refunds = [("r1", "p1", 20_000, NOON_US + 1_000_000), ("r2", "p2", 10_000, NOON_US + 1_000_000)]
    rows = [["P", "p1", "S1", 70_000, "2026-11-03 12:00:00", None], ["P", "p2", "S2", 50_000, "2026-11-03 12:00:00", None],
            ["R", "p1", "S9", 20_000, "2026-11-03 12:00:01", "r1" if by_id else None],
            ["R", "p2", "S2", 10_000, "2026-11-03 12:00:01", "r2" if by_id else None]]
    result = _run(rows, REFUND_HEADER, payments, refunds)
    f = result.frames
    wrong = f["merchant_mismatch"]
    assert wrong.select("record_type", "approval_id", "clearing_merchant_id", "ledger_merchant_id",
                        "clearing_amount_won", "ledger_amount_won").rows() == [("R", "p1", "S9", "S1", 20_000, 20_000)]
    assert f["matched"].filter(pl.col("record_type") == "R")["approval_id"].to_list() == ["p2"]
    assert result.exceptions == 1


def test_refund_lines_of_one_payment_naming_two_merchants_are_a_merchant_mismatch():
    payments = _ledger([("p1", "S1", 70_000, NOON_US)])
    refunds = [("r1", "p1", 20_000, NOON_US + 1), ("r2", "p1", 5_000, NOON_US + 2)]
    rows = [["P", "p1", "S1", 70_000, "2026-11-03 12:00:00", None],
            ["R", "p1", "S1", 20_000, "2026-11-03 12:00:01", None],
            ["R", "p1", "S2", 5_000, "2026-11-03 12:00:02", None]]
    result = _run(rows, REFUND_HEADER, payments, refunds)
    assert result.frames["merchant_mismatch"].select("record_type", "approval_id").rows() == [("R", "p1")]
    assert result.exceptions == 1


def test_a_refund_cleared_twice_is_not_matched_twice():
    """The audit's case: one refund's R line sent again a few minutes later was `matched`
    twice, duplicates 0, exit 0. The lines naming one refund_id are treated as a payment's
    P lines: summed as parts in a file without split_seq (here 15,554 for a refund of
    7,777: an amount_mismatch); in a file declaring split_seq, a line without it that
    repeats the amount is a duplicate of the first, and parts with it add up."""
    payments = _ledger([("p1", "S1", 100_000, NOON_US)])
    refunds = [("r1", "p1", 7_777, NOON_US + 3_600_000_000), ("r2", "p1", 1_000, NOON_US + 3_600_000_000)]
    twice = [["P", "p1", "S1", 100_000, "2026-11-03 12:00:05", None],
             ["R", "p1", "S1", 7_777, "2026-11-03 13:00:05", "r1"],
             ["R", "p1", "S1", 7_777, "2026-11-03 13:09:05", "r1"],
             ["R", "p1", "S1", 1_000, "2026-11-03 13:00:05", "r2"]]
    plain = _run(twice, REFUND_HEADER, payments, refunds)
    assert plain.frames["matched"].select("record_type", "refund_id").sort("refund_id").rows() == [
        ("P", None), ("R", "r2")]
    assert plain.frames["amount_mismatch"].select("refund_id", "clearing_amount_won", "difference_won",
                                                  "clearing_rows", "split", "lines").rows() == [
        ("r1", 15_554, 7_777, 2, True, [3, 4])]
    assert plain.exceptions == 1
    header = (*REFUND_HEADER, "split_seq")
    declared = _run([[*row, None] for row in twice], header, payments, refunds)
    assert declared.frames["matched"].filter(pl.col("record_type") == "R").select(
        "refund_id", "clearing_amount_won", "lines").sort("refund_id").rows() == [("r1", 7_777, [3]),
                                                                                 ("r2", 1_000, [5])]
    assert declared.frames["duplicates"].select("line", "first_line", "record_type", "refund_id").rows() == [
        (4, 3, "R", "r1")]
    assert "refund again" in declared.frames["duplicates"]["reason"][0] and declared.exceptions == 1
    parts = _run([[*twice[0], None], ["R", "p1", "S1", 7_000, "2026-11-03 13:00:05", "r1", 1],
                  ["R", "p1", "S1", 777, "2026-11-03 13:00:06", "r1", 2], [*twice[3], None],
                  ["R", "p1", "S1", 900, "2026-11-03 13:00:07", "r2", None]], header, payments, refunds)
    assert parts.frames["matched"].filter(pl.col("record_type") == "R").select(
        "refund_id", "clearing_amount_won", "split").rows() == [("r1", 7_777, True)]
    assert parts.frames["amount_mismatch"].select("refund_id", "clearing_amount_won", "split").rows() == [
        ("r2", 1_900, False)]  # another amount without split_seq: no resend, no split


def test_each_category_has_the_same_columns_whatever_the_file_holds():
    """`eum reconcile --out` files and the API's rows changed columns with the file's
    contents: matched.csv gained refund_id when an R line was there, missing_in_ledger five
    columns. Each category now has its documented columns, in order, empty where a row has
    no such value (docs/settlement.md)."""
    payments = _ledger([("p1", "S1", 100_000, NOON_US), ("p2", "S1", 5_000, NOON_US)])
    refunds = [("r1", "p1", 7_777, NOON_US + 60_000_000), ("r2", "p2", 500, NOON_US + 60_000_000)]
    plain = _run([["p1", "S1", 100_000, "2026-11-03 12:00:00"]], PLAIN_HEADER, payments, refunds)
    every = _run([["P", "p1", "S1", 100_000, "2026-11-03 12:00:00", None],
                  ["P", "p1", "S1", 100_000, "2026-11-03 12:00:00", None],
                  ["P", "p9", "S1", 1_000, "2026-11-03 12:00:00", None],
                  ["P", "p2", "S1", 5_000, "2026-11-04 12:00:00", None],
                  ["R", "p1", "S1", 7_000, "2026-11-03 12:01:00", "r1"],
                  ["R", "p1", "S1", 1_000, "2026-11-03 12:01:00", "r9"]], REFUND_HEADER, payments, refunds)
    assert all(every.counts()[name] for name in rc.CATEGORIES if name != "merchant_mismatch"), every.counts()
    compared = ["record_type", "approval_id", "refund_id", "clearing_amount_won", "ledger_amount_won",
                "difference_won", "clearing_rows", "split", "clearing_merchant_id", "ledger_merchant_id",
                "ledger_refund_ids", "lines"]
    expected = {
        "matched": compared, "amount_mismatch": compared, "merchant_mismatch": compared,
        "late": [*compared, "occurred_at_us", "occurred_at", "transacted_at_us", "transacted_at",
                 "ledger_business_date", "clearing_business_date"],
        "missing_in_ledger": [*compared, "reason"],
        "missing_in_clearing": ["record_type", "approval_id", "refund_id", "ledger_amount_won", "ledger_merchant_id",
                                "occurred_at_us", "occurred_at"],
        "duplicates": ["line", "first_line", "record_type", "approval_id", "refund_id", "merchant_id", "amount_won",
                       "transacted_at_us", "transacted_at", "reason"]}
    for result in (plain, every):
        assert {name: result.frames[name].columns for name in rc.CATEGORIES} == expected
    assert every.frames["missing_in_clearing"].select("approval_id", "refund_id", "ledger_merchant_id").rows() == [
        ("p2", "r2", "S1")]


# ---------------------------------------------------------------- refunds without refund_id: the file's dates


SEOUL = dt.timezone(dt.timedelta(hours=9))


def _seoul_us(day: str, clock: str = "11:00:00") -> int:
    return rc.to_us(dt.datetime.fromisoformat(f"{day}T{clock}").replace(tzinfo=SEOUL))


# The audit's case: one payment refunded in three parts on three days.
H2_PAYMENTS = [("P-H2-1", "H-BUP-WW", 50_000, _seoul_us("2026-11-28"))]
H2_REFUNDS = [("R-H2-1", "P-H2-1", 10_001, _seoul_us("2026-11-29")),
              ("R-H2-2", "P-H2-1", 7_777, _seoul_us("2026-12-02")),
              ("R-H2-3", "P-H2-1", 15_555, _seoul_us("2026-12-04"))]
H2_LINE = b"record_type,approval_id,merchant_id,amount_won,transacted_at\nR,P-H2-1,H-BUP-WW,7777,2026-12-02 11:00:00\n"


@pytest.mark.parametrize("dates", [["2026-12-02"], None])
def test_a_refund_line_without_refund_id_is_compared_with_the_refunds_of_the_files_dates_only(dates):
    """The 12-02 file's line for the 12-02 part of a refund in three parts matches that
    part (given the business date, or by its line's date), not the three parts' 33,333;
    the other days' parts are neither compared nor missing from this file."""
    clearing, facts = rc.parse_clearing(H2_LINE)
    result = rc.reconcile_frames(clearing, _ledger(H2_PAYMENTS), _refunds(H2_REFUNDS),
                                 declares_refunds=facts["declares_refunds"], dates=dates)
    assert result.exceptions == 0, result.counts()
    assert result.frames["matched"].select("record_type", "approval_id", "clearing_amount_won", "ledger_amount_won",
                                           "difference_won", "ledger_refund_ids").rows() == [
        ("R", "P-H2-1", 7_777, 7_777, 0, ["R-H2-2"])]


def test_refund_lines_without_refund_id_sum_against_the_parts_of_the_files_dates():
    """Two lines of 12-04 against that day's two parts; a wrong amount names the refunds it
    was compared with; a line on a day the payment had no refund is missing in the ledger,
    saying so."""
    refunds = H2_REFUNDS + [("R-H2-4", "P-H2-1", 1_000, _seoul_us("2026-12-04", "15:00:00"))]
    two_days = (b"record_type,approval_id,merchant_id,amount_won,transacted_at\n"
                b"R,P-H2-1,H-BUP-WW,15555,2026-12-04 11:00:00\nR,P-H2-1,H-BUP-WW,1000,2026-12-04 15:00:00\n")
    clearing, _ = rc.parse_clearing(two_days)
    result = rc.reconcile_frames(clearing, _ledger(H2_PAYMENTS), _refunds(refunds), declares_refunds=True)
    assert result.exceptions == 0 and result.frames["matched"]["ledger_amount_won"].to_list() == [16_555]
    clearing, _ = rc.parse_clearing(b"record_type,approval_id,merchant_id,amount_won,transacted_at\n"
                                    b"R,P-H2-1,H-BUP-WW,7000,2026-12-02 11:00:00\n")
    wrong = rc.reconcile_frames(clearing, _ledger(H2_PAYMENTS), _refunds(refunds), declares_refunds=True)
    assert wrong.frames["amount_mismatch"].select("ledger_amount_won", "difference_won",
                                                  "ledger_refund_ids").rows() == [(7_777, -777, ["R-H2-2"])]
    assert wrong.exceptions == 1
    clearing, _ = rc.parse_clearing(b"record_type,approval_id,merchant_id,amount_won,transacted_at\n"
                                    b"R,P-H2-1,H-BUP-WW,7777,2026-12-03 11:00:00\n")
    other_day = rc.reconcile_frames(clearing, _ledger(H2_PAYMENTS), _refunds(refunds), declares_refunds=True)
    assert other_day.frames["missing_in_ledger"].select("approval_id", "clearing_amount_won", "reason").rows() == [
        ("P-H2-1", 7_777, "no refund of this payment on the file's business dates (it has refunds of other dates)")]
    assert other_day.exceptions == 1


def test_a_refund_named_by_id_is_not_summed_again_for_a_line_without_one():
    payments = _ledger([("p1", "S1", 70_000, NOON_US)])
    refunds = [("r1", "p1", 20_000, NOON_US + 1), ("r2", "p1", 5_000, NOON_US + 2), ("r3", "p1", 1_000, NOON_US + 3)]
    result = _run([["R", "p1", "S1", 20_000, "2026-11-03 12:00:01", "r1"],
                   ["R", "p1", "S1", 5_000, "2026-11-03 12:00:02", None]], REFUND_HEADER, payments, refunds)
    # r3 is of the file's date and on no line: the line without an id is compared with r2 and r3.
    assert result.frames["amount_mismatch"].select("ledger_amount_won", "ledger_refund_ids").rows() == [
        (6_000, ["r2", "r3"])]
    assert result.counts()["matched"] == 1 and result.counts()["missing_in_clearing"] == 1  # p1's P line
    named = _run([["R", "p1", "S1", 20_000, "2026-11-03 12:00:01", "r1"],
                  ["R", "p1", "S1", 5_000, "2026-11-03 12:00:02", "r2"],
                  ["R", "p1", "S1", 1_000, "2026-11-03 12:00:03", "r3"],
                  ["R", "p1", "S1", 1_000, "2026-11-03 12:00:04", None]], REFUND_HEADER, payments, refunds)
    assert named.frames["missing_in_ledger"]["reason"].to_list() == [
        "its refunds of the file's business dates are all on lines with their refund_id"]


def test_a_refund_named_under_another_payment_is_still_missing_in_clearing():
    """An R line naming refund r1 of p1 under approval p2 (the network filed it under
    another payment) is missing_in_ledger: p2 has no refund r1. r1 itself was then on no
    line of its own payment, yet it was taken as cleared and reported nowhere (finance
    audit): a ledger refund the network never cleared went unseen. It is
    missing_in_clearing now, and the line's row carries no ledger amount: r1's 5,400 is
    not a refund of p2 (it read as 'ledger 5,400, difference 0')."""
    payments = _ledger([("p1", "S1", 70_000, NOON_US), ("p2", "S2", 50_000, NOON_US)])
    refunds = [("r1", "p1", 5_400, NOON_US + 1_000_000)]
    rows = [["P", "p1", "S1", 70_000, "2026-11-03 12:00:00", None],
            ["P", "p2", "S2", 50_000, "2026-11-03 12:00:00", None],
            ["R", "p2", "S2", 5_400, "2026-11-03 12:00:01", "r1"]]
    f = _run(rows, REFUND_HEADER, payments, refunds).frames
    assert f["missing_in_ledger"].select("approval_id", "refund_id", "clearing_amount_won", "ledger_amount_won",
                                         "difference_won", "reason").rows() == [
        ("p2", "r1", 5_400, None, None, "no such refund of this payment")]
    assert f["missing_in_clearing"].select("record_type", "approval_id", "refund_id", "ledger_amount_won",
                                           "ledger_merchant_id").rows() == [("R", "p1", "r1", 5_400, "S1")]
    # A line of p1 without a refund_id is compared with r1, which no line of p1 names.
    plain = _run([*rows, ["R", "p1", "S1", 5_400, "2026-11-03 12:00:02", None]], REFUND_HEADER, payments, refunds)
    assert plain.frames["matched"].filter(pl.col("record_type") == "R").select(
        "approval_id", "ledger_refund_ids").rows() == [("p1", ["r1"])]
    assert plain.counts()["missing_in_clearing"] == 0 and plain.counts()["missing_in_ledger"] == 1


def _reconcile_h2(data: bytes, day: dt.date, payments=H2_PAYMENTS) -> rc.Reconciliation:
    """`data` reconciled for `day` through the database, on a book of `payments` and H2_REFUNDS."""
    from sqlalchemy import insert

    from ledger.db import make_engine

    with temp_database("sqlite") as url:
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(insert(s.payments), [
                {"payment_id": pid, "request_hash": "h", "member_id": "M1", "merchant_id": merchant,
                 "amount_won": amount, "occurred_at_us": at, "month": "2026-11", "status": "approved",
                 "detail": "{}", "response": "{}", "recorded_at_us": at}
                for pid, merchant, amount, at in payments])
            conn.execute(insert(s.refunds), [
                {"refund_id": rid, "request_hash": "h", "payment_id": pid, "amount_won": amount,
                 "occurred_at_us": at, "clawback_won": 0, "response": "{}", "recorded_at_us": at}
                for rid, pid, amount, at in H2_REFUNDS])
        with reader(engine).connect() as conn:
            result = rc.reconcile(conn, data, business_date=day)
        engine.dispose()
    return result


def test_a_refund_in_parts_over_several_days_reconciles_through_the_database():
    """The audit's repro end to end: `load_ledger_side` reads every refund of the payment
    (a line with a refund_id matches it whatever day); the line without one is compared
    with the 12-02 part only."""
    result = _reconcile_h2(H2_LINE, dt.date(2026, 12, 2))
    assert result.exceptions == 0, result.counts()
    assert result.frames["matched"].select("approval_id", "ledger_amount_won", "difference_won").rows() == [
        ("P-H2-1", 7_777, 0)]


def test_a_refund_on_no_line_names_its_merchant_though_its_payment_is_of_another_day():
    """The 12-02 file clears another payment and no refund: the 12-02 part of P-H2-1 (paid
    11-28, a payment the file does not name) is missing_in_clearing with its payment's
    merchant. Only the payments of the file's dates and those it names were read, so the
    row's ledger_merchant_id was empty (finance audit): who to ask about it was not said."""
    other = ("P-H2-9", "H-JUNG", 9_000, _seoul_us("2026-12-02"))
    data = b"record_type,approval_id,merchant_id,amount_won,transacted_at\nP,P-H2-9,H-JUNG,9000,2026-12-02 12:00:00\n"
    result = _reconcile_h2(data, dt.date(2026, 12, 2), payments=[*H2_PAYMENTS, other])
    assert result.frames["missing_in_clearing"].select("record_type", "approval_id", "refund_id", "ledger_amount_won",
                                                       "ledger_merchant_id").rows() == [
        ("R", "P-H2-1", "R-H2-2", 7_777, "H-BUP-WW")]
    assert result.counts()["matched"] == 1 and result.exceptions == 1


# ---------------------------------------------------------------- blank lines, short lines, physical line numbers


PLAIN = "approval_id,merchant_id,amount_won,transacted_at"


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_blank_lines_are_skipped_at_the_end_and_in_the_middle(newline):
    """An Excel export ending in a blank line was refused whole ('approval_id is not a
    payment id'); a blank line is no record, and the lines after it keep their numbers."""
    for tail in (2, 3):
        text = newline.join([PLAIN, "p1,S1,1000,2026-11-03 12:00:00", "p2,S1,2000,2026-11-03 12:00:01"])
        text += newline * tail
        frame, facts = rc.parse_clearing(text.encode())
        assert frame.select("line", "approval_id").rows() == [(2, "p1"), (3, "p2")] and facts["lines"] == 2
    text = newline.join([PLAIN, "p1,S1,1000,2026-11-03 12:00:00", "", "p2,S1,2000,2026-11-03 12:00:01", "", "",
                         "p1,S1,1000,2026-11-03 12:00:00", ""])
    frame, facts = rc.parse_clearing(text.encode("cp949"))
    assert frame.select("line", "approval_id").rows() == [(2, "p1"), (4, "p2"), (7, "p1")] and facts["lines"] == 3
    result = rc.reconcile_frames(frame, _ledger([("p1", "S1", 1_000, NOON_US), ("p2", "S1", 2_000, NOON_US)]),
                                 _refunds([]))
    assert result.frames["duplicates"].select("line", "first_line").rows() == [(7, 2)]
    with pytest.raises(rc.ClearingFileInvalid) as bad:
        rc.parse_clearing(newline.join([PLAIN, "", "p1,S1,1000,2026-11-03 12:00:00", "",
                                        "bad id!,S1,1,2026-11-03 12:00:00", ""]).encode())
    assert [(e["line"], e["reason"]) for e in bad.value.extra["errors"]] == [(5, "approval_id is not a payment id")]
    with pytest.raises(rc.ClearingFileInvalid, match="no clearing lines"):
        rc.parse_clearing((PLAIN + newline * 3).encode())


def test_cr_cr_lf_line_ends_are_refused_as_line_ends_of_two_kinds():
    """A CRLF file converted once more (CR CR LF, as an FTP transfer in ASCII mode makes it)
    had its header's last name read without the CR by the csv module and with it by polars:
    a required last column was a ColumnNotFoundError (a 500, a traceback from eum
    reconcile), a last record_type was dropped and every R line read as a P line
    (clearing-file reconciliation audit). Its bare CR before each CRLF mixes line ends."""
    last_time = "\n".join([PLAIN, "p1,S1,12000,2025-09-30 12:00:00", ""])
    last_type = "\n".join([PLAIN + ",record_type", "p1,S1,12000,2025-09-30 12:00:00,P",
                           "p1,S1,2000,2025-09-30 15:00:00,R", ""])
    for text in (last_time, last_type):
        with pytest.raises(rc.ClearingFileInvalid) as mixed:
            rc.parse_clearing(text.replace("\n", "\r\r\n").encode(), SettlementConfig())
        assert "mixes line ends" in mixed.value.detail and "CR CR LF" in mixed.value.detail, mixed.value.detail
        assert mixed.value.extra["errors"] == [{"line": 1, "reason": "a bare carriage return in the header line"}]
    frame, facts = rc.parse_clearing(last_type.replace("\n", "\r\n").encode(), SettlementConfig())  # its CRLF twin
    assert facts["declares_refunds"] and frame["record_type"].to_list() == ["P", "R"]


def test_a_line_of_too_few_fields_says_so():
    text = "\n".join([PLAIN, "p1,S1,1000,2026-11-03 12:00:00", "p2,S1,2000", "p3", "p4,S1,3000,2026-11-03 12:00:00,x",
                      "p5,S1,,2026-11-03 12:00:00", ""])
    with pytest.raises(rc.ClearingFileInvalid) as short:
        rc.parse_clearing(text.encode())
    assert [(e["line"], e["reason"]) for e in short.value.extra["errors"]] == [
        (3, "3 fields where the header has 4"), (4, "1 field where the header has 4"),
        (5, "5 fields where the header has 4"), (6, "amount_won is not a whole number of won")]
    assert short.value.extra["invalid_line_count"] == 4
    assert "4 line(s) are malformed (3 of other than 4 fields): lines 3, 4, 5, 6" in short.value.detail
    with pytest.raises(rc.ClearingFileInvalid) as only_short:  # no line of too many fields: polars reads it
        rc.parse_clearing(f"{PLAIN}\np1,S1,1000,2026-11-03 12:00:00\np2,S1,2000\n".encode("utf-8-sig"))
    assert only_short.value.extra["errors"] == [{"line": 3, "reason": "3 fields where the header has 4"}]
    # An empty field is a field: the line is read, and its amount is what is wrong.
    with pytest.raises(rc.ClearingFileInvalid) as empty:
        rc.parse_clearing(f"{PLAIN}\np5,S1,,2026-11-03 12:00:00\n".encode())
    assert empty.value.extra["errors"] == [{"line": 2, "reason": "amount_won is not a whole number of won"}]


def test_a_line_of_the_wrong_count_of_fields_does_not_hide_the_other_faults():
    """The audit's file: seven bad lines, the last one short of fields. The file was refused
    naming that one only (invalid_line_count 1); docs/settlement.md lists the first bad
    lines and counts them all. Now every fault is listed in line order and counted, a
    line too long (the csv module's way) or too short (polars's) alike."""
    bad = ["p12,fa-gh,12.5,2026-11-28 12:00:05", "p12,fa-gh,0,2026-11-28 12:00:05",
           "p12,fa-gh,-500,2026-11-28 12:00:05", "p12,fa-gh,500,2026-11-28 24:00:00",
           "p12,fa-gh,500,2026-11-28T23:59:60+09:00", "p12,fa-gh,500,2026-11-28T12:00:00+0900",
           "p/12,fa-gh,500,2026-11-28 12:00:00"]
    for ragged, reason in (("p12,fa-gh,500", "3 fields"), ("p12,fa-gh,500,2026-11-28 12:00:00,x", "5 fields")):
        with pytest.raises(rc.ClearingFileInvalid) as caught:
            rc.parse_clearing("\n".join([PLAIN, *bad, ragged, ""]).encode())
        errors = caught.value.extra["errors"]
        assert [e["line"] for e in errors] == list(range(2, 10)) and errors[-1]["reason"].startswith(reason)
        assert caught.value.extra["invalid_line_count"] == 8, caught.value.detail
        # -500 is a whole number of won, out of range: the reason says so, as for 0
        assert errors[2]["reason"].startswith("amount_won out of 1..10^12 (negative"), errors[2]
    with pytest.raises(rc.ClearingFileInvalid) as listed:  # the first `clearing_errors_listed_max`, of all
        rc.parse_clearing("\n".join([PLAIN, "p1,S1,500", *bad, "p2,S1,500"]).encode(),
                          SettlementConfig(clearing_errors_listed_max=3))
    assert [e["line"] for e in listed.value.extra["errors"]] == [2, 3, 4]
    assert listed.value.extra["invalid_line_count"] == 9


def test_a_line_is_the_physical_line_its_record_starts_on_when_a_quoted_field_holds_a_newline():
    """docs/settlement.md: a line is its line number in the file (header = 1). A memo
    field over two lines once made every later line's number one too small."""
    header = PLAIN + ",memo"
    good = f'{header}\np1,S1,1000,2026-11-03 12:00:00,"two\nlines"\r\np2,S1,"2,000",2026-11-03 12:00:01,\n' \
           f'p1,S1,1000,2026-11-03 12:00:00,"two\nlines"\n'
    frame, _ = rc.parse_clearing(good.encode())
    assert frame.select("line", "approval_id", "amount_won").rows() == [(2, "p1", 1_000), (4, "p2", 2_000),
                                                                        (5, "p1", 1_000)]
    dup = rc.reconcile_frames(frame, _ledger([("p1", "S1", 1_000, NOON_US), ("p2", "S1", 2_000, NOON_US)]),
                              _refunds([]))
    assert dup.frames["duplicates"].select("line", "first_line").rows() == [(5, 2)]
    bad = f'{header}\np1,S1,1000,2026-11-03 12:00:00,"a\nb"\nbad id!,S1,1000,2026-11-03 12:00:00,\n'
    with pytest.raises(rc.ClearingFileInvalid) as caught:
        rc.parse_clearing(bad.encode())
    assert caught.value.extra["errors"] == [{"line": 4, "reason": "approval_id is not a payment id"}]
    ragged = f'{header}\np1,S1,1000,2026-11-03 12:00:00,"a\nb\nc"\n"p2\n",S1,1000,2026-11-03 12:00:00,,extra\n'
    with pytest.raises(rc.ClearingFileInvalid) as wide:
        rc.parse_clearing(ragged.encode())
    assert wide.value.extra["errors"] == [{"line": 5, "reason": "6 fields where the header has 5"}]


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from(["", "1000", '"1,000"']),
                          st.sampled_from(["", "memo", '"a,b"', '"two\nlines"', '"q""q"', '"\r\n\n"'])),
                max_size=8),
       st.sampled_from(["\n", "\r\n"]), st.integers(0, 3))
def test_each_line_is_numbered_as_the_csv_module_finds_its_first_line(rows, newline, tail):
    """Blank lines ("" amounts stand for one), quoted commas and line ends in any mix: the
    frame's lines are where the csv module starts each record."""
    lines = [PLAIN + ",memo"] + ["" if not amount else f"p{i},S1,{amount},2026-11-03 12:00:00,{memo}"
                                 for i, (amount, memo) in enumerate(rows)]
    text = newline.join(lines) + newline * tail
    if not any(amount for amount, _ in rows):
        return
    expected, start = [], 1
    reader = csv.reader(line + "\n" for line in text.split("\n"))
    for number, row in enumerate(reader):
        if number and row:
            expected.append((start, row[0]))
        start = reader.line_num + 1
    frame, facts = rc.parse_clearing(text.encode())
    assert frame.select("line", "approval_id").rows() == expected and facts["lines"] == len(expected)


# ---------------------------------------------------------------- transacted_at: the API's RFC 3339, no leap second


def test_a_leap_second_is_refused_with_its_line_and_lower_case_and_a_spaced_fraction_are_read():
    """2025-09-30T23:59:60+09:00 was read as 10-01's midnight (the file then covered 10-01
    too, all of it missing_in_clearing) while the API refuses it; `t`/`z` and a space before
    a fraction, which the API takes, made the whole file 422."""
    text = "\n".join([PLAIN, "p1,S1,1000,2025-09-30t23:59:59.5z", "p2,S1,1000,2025-09-30 23:59:59.25+09:00",
                      "p3,S1,1000,2025-09-30T23:59:59.123456789+09:00", "p4,S1,1000,20250930235959", ""])
    frame, _ = rc.parse_clearing(text.encode())
    assert [rfc3339(us) for us in frame["transacted_at_us"]] == [
        "2025-10-01T08:59:59.500000+09:00", "2025-09-30T23:59:59.250000+09:00", "2025-09-30T23:59:59.123456+09:00",
        "2025-09-30T23:59:59+09:00"]
    leap = "\n".join([PLAIN, "p1,S1,1000,2025-09-30T23:59:59+09:00", "p2,S1,1000,2025-09-30T23:59:60+09:00",
                      "p3,S1,1000,2025-09-30 23:59:60", "p4,S1,1000,2025-09-30T24:00:00+09:00", ""])
    with pytest.raises(rc.ClearingFileInvalid) as caught:
        rc.parse_clearing(leap.encode())
    assert caught.value.extra["errors"] == [{"line": 3, "reason": rc.TIME_LEAP}, {"line": 4, "reason": rc.TIME_LEAP},
                                            {"line": 5, "reason": rc.TIME_OUT_OF_RANGE}]
    assert "leap second" in rc.TIME_LEAP and caught.value.status == 422


def _two(low: int, high: int, valid: tuple[int, int] | None = None) -> st.SearchStrategy[str]:
    """Two digits, mostly in the `valid` range (so that most texts are times), else any."""
    numbers = st.integers(low, high) if valid is None else st.integers(*valid) | st.integers(*valid) | st.integers(low, high)
    return numbers.map(lambda n: f"{n:02d}")


_OFFSETS = st.one_of(st.sampled_from(["Z", "z", "", "", "+09:00", "-00:00", "+0900", "+09", "+23:59", "-23:59"]),
                     st.builds(lambda sign, h, m: f"{sign}{h}:{m}", st.sampled_from("+-"), _two(0, 25, (0, 23)),
                               _two(0, 61, (0, 59))))
_TIMES = st.builds(
    lambda y, mo, d, sep, h, mi, s, frac, off: (f"{y}-{mo}-{d}{sep}{h}:{mi}:{s}{frac}", off),
    st.one_of(st.sampled_from(["0000", "1999", "2000", "2024", "2025", "2099", "2100", "9999"]),
              st.integers(2000, 2099).map(str), st.integers(0, 9999).map(lambda n: f"{n:04d}")),
    _two(0, 13, (1, 12)), st.sampled_from(["28", "29", "30", "31"]) | _two(0, 32, (1, 28)),
    st.sampled_from(["T", "T", "t", " ", " ", "_"]), _two(0, 25, (0, 23)), _two(0, 61, (0, 59)),
    st.sampled_from(["23", "59", "60", "00"]) | _two(0, 61, (0, 59)),
    st.one_of(st.just(""), st.just(""), st.just("."), st.text("0123456789", min_size=1, max_size=10).map(lambda f: "." + f)),
    _OFFSETS)


def _api_us(text: str) -> int | None:
    """What the API's time type makes of the text (microseconds), or None: refused. A
    fraction of 7-9 digits cut to the microsecond first, as the clearing file's times are
    (the API refuses a digit other than 0 past the 6th, docs/settlement.md says why the
    file does not); one of 10 or more both refuse."""
    import re

    from pydantic import TypeAdapter, ValidationError

    from api.schemas import Rfc3339Time

    try:
        return rc.to_us(TypeAdapter(Rfc3339Time).validate_python(re.sub(r"(\.[0-9]{6})[0-9]{1,3}(?![0-9])", r"\1", text)))
    except ValidationError:
        return None


@settings(max_examples=120, deadline=None, database=None)
@given(st.lists(st.tuples(_TIMES, st.booleans()), min_size=1, max_size=20))
@example([(("2000-01-28T00:00:23.0000001", "Z"), False)])  # past the microsecond: cut here, refused by the API
@example([(("2000-01-28T00:00:23.0000000000", "Z"), False)])  # 10 digits: refused by both
def test_the_files_times_are_the_apis_and_the_seoul_local_forms(drawn):
    """RFC 3339 text: what the API's Rfc3339Time takes, at the same instant, and nothing
    else (a leap second, 24:00, +24:00, +0900 refused); without an offset, the documented
    Seoul local forms (YYYY-MM-DD HH:MM:SS, with a `T` too, and YYYYMMDDHHMMSS) as the
    API reads the same text at +09:00; within 2000-2099 as every time the engine takes."""
    texts, expected = [], []
    for (stem, offset), compact in drawn:
        local = offset == "" and stem[10] in "T " and len(stem) == 19
        text = stem + offset
        if local and compact:
            text = "".join(c for c in stem if c.isdigit())
        texts.append(text)
        expected.append(_api_us(stem + "+09:00") if local else _api_us(text) if offset else None)
    times = rc.parse_times(pl.Series(texts, dtype=pl.String))
    got = [us if us is not None and rc.SPAN_FIRST_US <= us < rc.SPAN_END_US else None for us in times["us"]]
    assert got == expected, [(t, g, e) for t, g, e in zip(texts, got, expected) if g != e]
    assert all((us is None) == (reason is not None) for us, reason in times.rows())


# ---------------------------------------------------------------- late: matched by id, on another business date


def test_a_line_on_another_business_date_than_its_payment_or_refund_is_late_with_both_times():
    """DOMAIN.md: differences are missing, duplicate, amount mismatch or late. A payment at
    2025-09-30T23:59:59.999999 cleared on 10-05 was simply matched, with no times."""
    payments = _ledger([("p1", "S1", 10_000, _seoul_us("2025-09-30", "23:59:59.999999")),
                        ("p2", "S1", 5_000, _seoul_us("2025-09-30", "11:00:00")),
                        ("p3", "S1", 8_000, _seoul_us("2025-09-30", "12:00:00"))])
    refunds = [("r1", "p2", 1_000, _seoul_us("2025-10-01", "23:00:00")), ("r2", "p3", 500, _seoul_us("2025-09-30"))]
    result = _run([["P", "p1", "S1", 10_000, "2025-10-05T12:00:00+09:00", None],
                   ["P", "p2", "S1", 5_000, "2025-09-30T11:00:05+09:00", None],
                   ["R", "p2", "S1", 1_000, "2025-10-02T00:00:00+09:00", "r1"],
                   ["P", "p3", "S1", 8_000, "2025-10-01T00:00:00+09:00", None],  # late, and 3,000 too much:
                   ["P", "p3", "S1", 3_000, "2025-10-01T00:00:00+09:00", None],  # an amount_mismatch, not late
                   ["R", "p3", "S1", 500, "2025-09-30T11:00:00+09:00", "r2"]],
                  REFUND_HEADER, payments, refunds)
    f = result.frames
    assert f["late"].select("record_type", "approval_id", "refund_id", "lines", "occurred_at", "transacted_at",
                            "ledger_business_date", "clearing_business_date").rows() == [
        ("P", "p1", None, [2], "2025-09-30T23:59:59.999999+09:00", "2025-10-05T12:00:00+09:00", "2025-09-30",
         "2025-10-05"),
        ("R", "p2", "r1", [4], "2025-10-01T23:00:00+09:00", "2025-10-02T00:00:00+09:00", "2025-10-01", "2025-10-02")]
    assert f["matched"].select("record_type", "approval_id").sort("record_type").rows() == [("P", "p2"), ("R", "p3")]
    assert f["amount_mismatch"]["approval_id"].to_list() == ["p3"]
    body = result.body(rows_max=1)
    assert body["counts"]["late"] == 2 and body["rows_truncated"]["late"] and len(body["late"]) == 1
    assert result.exceptions == 3  # two late, one amount mismatch


def test_a_line_of_a_payment_of_another_day_than_the_files_is_late_not_matched():
    """The e2e audit's case: with the business date 2025-11-14 given, a payment of 11-15
    timed 11-15 in the 14th's file reconciled clean (matched), and so did the same line
    in the 15th's file: one payment cleared in two days' files with no exception; a
    payment of 11-13 cleared in the 14th's file (late clearing, DOMAIN.md's fourth
    difference) was matched too. Both are late now, the file's date as their clearing
    date; in their own day's file they match."""
    payments = _ledger([("p13", "S1", 1_000, _seoul_us("2025-11-13", "08:39:37")),
                        ("p14", "S1", 2_000, _seoul_us("2025-11-14", "12:00:00")),
                        ("p15", "S1", 8_200, _seoul_us("2025-11-15", "00:01:44"))])
    refunds = [("r15", "p14", 500, _seoul_us("2025-11-15", "09:00:00"))]
    rows = [["P", "p13", "S1", 1_000, "2025-11-13T08:39:37+09:00", None],
            ["P", "p14", "S1", 2_000, "2025-11-14T12:00:00+09:00", None],
            ["P", "p15", "S1", 8_200, "2025-11-15T00:01:44+09:00", None],
            ["R", "p14", "S1", 500, "2025-11-15T09:00:00+09:00", "r15"]]
    clearing, facts = rc.parse_clearing(_csv(rows, header=REFUND_HEADER).encode())
    result = rc.reconcile_frames(clearing, payments, _refunds(refunds), dates=["2025-11-14"],
                                 declares_refunds=facts["declares_refunds"])
    f = result.frames
    assert f["matched"].select("record_type", "approval_id").rows() == [("P", "p14")]
    assert f["late"].select("record_type", "approval_id", "ledger_business_date", "clearing_business_date").rows() == [
        ("P", "p13", "2025-11-13", "2025-11-14"), ("P", "p15", "2025-11-15", "2025-11-14"),
        ("R", "p14", "2025-11-15", "2025-11-14")]
    assert result.exceptions == 3
    own = rc.reconcile_frames(clearing, payments, _refunds(refunds), dates=None,
                              declares_refunds=facts["declares_refunds"])
    assert own.counts()["late"] == 0 and own.counts()["matched"] == 4


def test_a_split_with_a_part_on_another_date_is_late_and_shows_that_parts_time():
    payments = _ledger([("p1", "S1", 10_000, _seoul_us("2025-09-30", "23:59:00")),
                        ("p2", "S1", 10_000, _seoul_us("2025-09-30", "00:00:30"))])
    result = _run([["p1", "S1", 6_000, "2025-09-30 23:59:30", 1], ["p1", "S1", 4_000, "2025-10-01 00:00:10", 2],
                   ["p2", "S1", 6_000, "2025-09-29 23:59:59", 1], ["p2", "S1", 4_000, "2025-10-01 00:00:10", 2]],
                  SPLIT_HEADER, payments)
    assert result.frames["late"].select("approval_id", "split", "lines", "transacted_at").rows() == [
        ("p1", True, [2, 3], "2025-10-01T00:00:10+09:00"), ("p2", True, [4, 5], "2025-09-29T23:59:59+09:00")]
    assert result.counts()["matched"] == 0


LEDGER_DAY = "2025-09-30"
P_LEDGER = [("p0", "S1", 1_000, _seoul_us(LEDGER_DAY, "00:00:00"), "approved"),
            ("p1", "S2", 2_000, _seoul_us(LEDGER_DAY, "23:59:59.999999"), "approved"),
            ("p2", "S1", 3_000, _seoul_us(LEDGER_DAY, "12:00:00"), "declined"),
            ("p3", "S1", 4_000, _seoul_us("2025-10-01", "09:00:00"), "approved")]
R_LEDGER = [("r0", "p0", 500, _seoul_us(LEDGER_DAY, "13:00:00")), ("r1", "p1", 700, _seoul_us("2025-10-01", "00:00:01")),
            ("r2", "p3", 1_000, _seoul_us("2025-10-01", "10:00:00")), ("r3", "p0", 200, _seoul_us("2025-10-02"))]
CLEARING_TIMES = ["2025-09-29 23:59:59", "2025-09-30 00:00:00", "2025-09-30 12:00:00", "2025-09-30 23:59:59",
                  "2025-10-01 00:00:00", "2025-10-01 10:00:00", "2025-10-05 12:00:00"]
_LINE = st.tuples(st.sampled_from(["P", "P", "R"]), st.sampled_from(["p0", "p1", "p2", "p3", "p9"]),
                  st.sampled_from(["S1", "S2"]), st.sampled_from([200, 500, 700, 1_000, 2_000, 3_000, 4_000, 1_001]),
                  st.sampled_from(CLEARING_TIMES), st.sampled_from([None, None, 1, 2]),
                  st.sampled_from([None, None, "r0", "r1", "r2", "r3", "r9"]))


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.tuples(_LINE, st.integers(0, 30)), min_size=1, max_size=12), st.booleans(), st.booleans(),
       st.sampled_from([None, [LEDGER_DAY], [LEDGER_DAY, "2025-10-01"]]), st.integers(0, 1))
def test_every_clearing_line_is_in_exactly_one_category(drawn, with_types, with_splits, dates, tolerance):
    """The categories partition the file's lines: each line is in one row of one category
    (`lines`, or `line` for a duplicate), so late ones are not matched as well; a late row's
    dates differ, and a matched P row's lines are on its payment's date."""
    header = ("approval_id", "merchant_id", "amount_won", "transacted_at") + (("split_seq",) if with_splits else ()) \
        + (("record_type", "refund_id") if with_types else ())
    rows = []
    for (kind, approval, merchant, amount, at, seq, refund), repeat in drawn:
        if repeat < len(rows) and repeat % 3 == 0:  # a line again, as the network resends
            rows.append(list(rows[repeat]))
            continue
        rows.append([approval, merchant, amount, at] + ([seq] if with_splits else [])
                    + ([kind, refund if kind == "R" else None] if with_types else []))
    clearing, facts = rc.parse_clearing(_csv(rows, header=header).encode())
    result = rc.reconcile_frames(clearing, pl.DataFrame(P_LEDGER, schema=rc.LEDGER_PAYMENTS_SCHEMA, orient="row"),
                                 _refunds(R_LEDGER), tolerance_won=tolerance, dates=dates,
                                 declares_refunds=facts["declares_refunds"], declares_splits=facts["declares_splits"])
    f = result.frames
    placed = [n for name in rc.CATEGORIES if name not in ("duplicates", "missing_in_clearing")
              for lines in f[name]["lines"].to_list() for n in lines] + f["duplicates"]["line"].to_list()
    assert sorted(placed) == list(range(2, len(rows) + 2)), {n: f[n].height for n in rc.CATEGORIES}
    assert result.counts() == {name: f[name].height for name in rc.CATEGORIES}
    if f["late"].height:
        assert (f["late"]["ledger_business_date"] != f["late"]["clearing_business_date"]).all()
    line_day = dict(zip(clearing["line"].to_list(), (rfc3339(us)[:10] for us in clearing["transacted_at_us"])))
    ledger_day = {pid: rfc3339(at)[:10] for pid, _, _, at, _ in P_LEDGER}
    for approval, lines in f["matched"].filter(pl.col("record_type") == "P").select("approval_id", "lines").rows():
        assert {line_day[n] for n in lines} == {ledger_day[approval]}, (approval, lines)
        # and of a day the file clears: one of another day's file is late, never matched there too
        assert dates is None or ledger_day[approval] in dates, (approval, dates)


# ---------------------------------------------------------------- the ledger side read: the file's dates only


def test_the_ledger_side_reads_the_files_dates_not_the_days_between(book):
    """A file of lines on 11-02 and 11-04 (no business date given: the days of its lines)
    read every payment and refund from 11-02 to 11-04, 11-03's too: one range from the
    first date to the last. Each run of consecutive dates is its own range now; 11-03's
    payments are neither read nor missing_in_clearing (they were not that either: they are
    for 11-03's file), but those the file's dates' refunds are of, by id (their merchants)."""
    from rules.timeutil import local_midnight_us

    first, last = dt.date(2026, 11, 2), dt.date(2026, 11, 4)
    (p1, *_), _ = _ledger_day(book.engine, first)
    (p3, *_), _ = _ledger_day(book.engine, last)
    data = _csv([["P", p.payment_id, p.merchant_id, p.amount_won, rfc3339(p.occurred_at_us), None, None]
                 for p in (p1, p3)]).encode()
    between = (local_midnight_us(dt.date(2026, 11, 3)), local_midnight_us(last))
    in_between = pl.col("occurred_at_us").is_between(*between, closed="left")
    with reader(book.engine).connect() as conn:
        clearing, facts = rc.parse_clearing(data)
        dates = rc.business_dates(clearing)
        assert dates == ["2026-11-02", "2026-11-04"]
        payments, refunds = rc.load_ledger_side(conn, clearing, dates)
        result = rc.reconcile(conn, data)
    assert _ledger_day(book.engine, dt.date(2026, 11, 3))[0], "the generated book has payments on 11-03"
    refunded = refunds.get_column("payment_id").implode()
    assert payments.filter(in_between & ~pl.col("payment_id").is_in(refunded)).height == 0
    assert refunds.filter(in_between).height == 0
    for day in (first, last):  # every payment and refund of the file's dates is read
        pays, day_refunds = _ledger_day(book.engine, day)
        assert {p.payment_id for p in pays} <= set(payments["payment_id"])
        assert {r.refund_id for r in day_refunds} <= set(refunds["refund_id"])
    assert result.frames["missing_in_clearing"].filter(in_between).height == 0
    assert result.frames["matched"]["approval_id"].sort().to_list() == sorted([p1.payment_id, p3.payment_id])


def test_the_days_read_are_the_runs_of_consecutive_dates():
    from rules.timeutil import local_midnight_us

    day = local_midnight_us
    assert rc._day_ranges(["2026-11-30", "2026-12-01", "2026-12-02", "2026-12-20", "2027-01-01"]) == [
        (day(dt.date(2026, 11, 30)), day(dt.date(2026, 12, 3))),
        (day(dt.date(2026, 12, 20)), day(dt.date(2026, 12, 21))),
        (day(dt.date(2027, 1, 1)), day(dt.date(2027, 1, 2)))]
    assert rc._day_ranges(["2026-11-03"]) == [(day(dt.date(2026, 11, 3)), day(dt.date(2026, 11, 4)))]


# ---------------------------------------------------------------- matching in parts: the same result as whole


def _assert_same_result(parts: rc.Reconciliation, whole: rc.Reconciliation) -> None:
    from polars.testing import assert_frame_equal

    assert parts.facts == whole.facts
    for name in rc.CATEGORIES:
        a, b = parts.frames[name], whole.frames[name]
        if name == "duplicates":
            assert_frame_equal(a, b, check_exact=True)
            continue
        # P rows (the ones matched in parts) in the same order; R rows come in the order of
        # a group-by, which no run fixes: compared as sets.
        key = [pl.col(c) for c in ("approval_id", "refund_id", "occurred_at_us") if c in a.columns] + (
            [pl.col("lines").list.first()] if "lines" in a.columns else [])
        assert_frame_equal(a.filter(pl.col("record_type") == "P"), b.filter(pl.col("record_type") == "P"),
                           check_exact=True)
        assert_frame_equal(a.filter(pl.col("record_type") == "R").sort(key, nulls_last=True),
                           b.filter(pl.col("record_type") == "R").sort(key, nulls_last=True), check_exact=True)


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.tuples(_LINE, st.integers(0, 30)), min_size=1, max_size=12), st.booleans(), st.booleans(),
       st.sampled_from([None, [LEDGER_DAY], [LEDGER_DAY, "2025-10-01"]]), st.integers(1, 3))
def test_matching_purchases_in_parts_of_approval_ids_is_exact(drawn, with_types, with_splits, dates, part_lines):
    """The P lines are matched a range of approval ids at a time (MATCH_PART_LINES, for
    memory): ranges of one to three lines give every row, column and order the whole gives."""
    header = ("approval_id", "merchant_id", "amount_won", "transacted_at") + (("split_seq",) if with_splits else ()) \
        + (("record_type", "refund_id") if with_types else ())
    rows = []
    for (kind, approval, merchant, amount, at, seq, refund), repeat in drawn:
        if repeat < len(rows) and repeat % 3 == 0:
            rows.append(list(rows[repeat]))
            continue
        rows.append([approval, merchant, amount, at] + ([seq] if with_splits else [])
                    + ([kind, refund if kind == "R" else None] if with_types else []))
    clearing, facts = rc.parse_clearing(_csv(rows, header=header).encode())
    payments = pl.DataFrame(P_LEDGER, schema=rc.LEDGER_PAYMENTS_SCHEMA, orient="row")

    def run(part: int) -> rc.Reconciliation:
        saved, rc.MATCH_PART_LINES = rc.MATCH_PART_LINES, part
        try:
            return rc.reconcile_frames(clearing, payments, _refunds(R_LEDGER), dates=dates,
                                       declares_refunds=facts["declares_refunds"],
                                       declares_splits=facts["declares_splits"])
        finally:
            rc.MATCH_PART_LINES = saved

    _assert_same_result(run(part_lines), run(10**9))


def test_a_generated_day_reconciles_the_same_in_parts_as_whole():
    """20,000 generated payments and a file of them with planted differences of each kind
    (missing, unknown, amounts, merchants, duplicates, resends, splits, late lines, refunds
    by id and without): matched in ranges of 1,000 approval ids, as whole."""
    from settlement import datagen

    day = dt.date(2026, 11, 20)
    frames = datagen.day_frames(day, datagen.merchant_frame(2_000), payments=20_000, members=50_000)
    payments = frames.payments.select("payment_id", "merchant_id", "amount_won", "occurred_at_us",
                                      pl.lit("approved").alias("status"))
    refunds = frames.refunds.select("refund_id", "payment_id", "amount_won", "occurred_at_us")
    assert refunds.height > 10
    rows = []
    for i, (pid, merchant, amount, at, _) in enumerate(payments.rows()):
        if i % 97 == 0:
            continue  # missing in the clearing
        amount += 10 if i % 89 == 0 else 0
        merchant = "S999999" if i % 83 == 0 else merchant
        at += 86_400_000_000 if i % 79 == 0 else 0  # late: the next day
        if i % 73 == 0:  # split in two parts
            rows += [["P", pid, merchant, amount // 2, rfc3339(at), 1, None],
                     ["P", pid, merchant, amount - amount // 2, rfc3339(at), 2, None]]
            continue
        rows.append(["P", pid, merchant, amount, rfc3339(at), None, None])
        if i % 71 == 0:
            rows.append(list(rows[-1]))  # the same line again
        if i % 67 == 0:
            rows.append(["P", pid, merchant, amount + (i % 2), rfc3339(at + 1), None, None])  # resend, or not
    for i, (rid, pid, amount, at) in enumerate(refunds.rows()):
        merchant = payments.filter(pl.col("payment_id") == pid)["merchant_id"].item()
        if i % 5:
            rows.append(["R", pid, merchant, amount, rfc3339(at), None, rid if i % 2 else None])
    rows += [["P", f"UNKNOWN-{k}", "S000001", 5_000, f"{day} 12:00:00", None, None] for k in range(50)]
    order = sorted(range(len(rows)), key=lambda k: (hash(str(rows[k][1])) % 1_000, k))  # approvals interleaved
    clearing, facts = rc.parse_clearing(_csv([rows[k] for k in order]).encode())

    def run(part: int) -> rc.Reconciliation:
        saved, rc.MATCH_PART_LINES = rc.MATCH_PART_LINES, part
        try:
            return rc.reconcile_frames(clearing, payments, refunds, dates=[day.isoformat()],
                                       declares_refunds=facts["declares_refunds"],
                                       declares_splits=facts["declares_splits"])
        finally:
            rc.MATCH_PART_LINES = saved

    parts, whole = run(1_000), run(10**9)
    counts = whole.counts()
    assert all(counts[name] for name in rc.CATEGORIES), counts  # every kind of row is there
    _assert_same_result(parts, whole)


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.tuples(_LINE, st.integers(0, 30)), min_size=0, max_size=15))
def test_the_first_of_identical_lines_is_found_as_by_hashing_every_line(drawn):
    rows = []
    for (kind, approval, merchant, amount, at, seq, refund), repeat in drawn:
        rows.append(list(rows[repeat]) if repeat < len(rows) and repeat % 2 == 0
                    else [approval, merchant, amount, at, seq, kind, refund if kind == "R" else None])
    header = ("approval_id", "merchant_id", "amount_won", "transacted_at", "split_seq", "record_type", "refund_id")
    if not rows:
        lines = pl.DataFrame(schema=rc.CLEARING_SCHEMA)
    else:
        lines, _ = rc.parse_clearing(_csv(rows, header=header).encode())
    expected = lines.select(pl.struct(rc.IDENTICAL_KEYS).is_first_distinct()).to_series()
    assert rc._first_of_identical(lines, rc.IDENTICAL_KEYS).to_list() == expected.to_list()


_ANY_LINE = st.tuples(st.sampled_from(["p1", "p2", "", "p 3", "p1 "]), st.sampled_from(["S1", "", "S 2"]),
                      st.sampled_from(["1000", '"12,000"', "-5", "0", '"12000,00"', "x"]),
                      st.sampled_from(["2025-09-30 12:00:00", "2025-09-30T23:59:60+09:00", "20250930120000",
                                       "2025-02-29 00:00:00", "yesterday", "2025-09-30T12:00:00.5Z"]),
                      st.sampled_from(["", "1", "0", "x"]), st.sampled_from(["P", "R", "", "Q"]))


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(_ANY_LINE, min_size=1, max_size=12), st.integers(1, 3))
@example([("p1", "S1", "1000", "2025-09-30 12:00:00", "", "P"), ("p2", "S1", '"12,000"', "20250930120000", "1", "R"),
          ("p1 ", "S1", "1000", "2025-09-30T12:00:00.5Z", "", "")], 2)
def test_lines_validated_in_parts_read_and_refuse_as_whole(rows, part_lines):
    """parse_clearing checks the lines VALIDATE_PART_LINES at a time (for memory): parts of
    one to three lines give the same frame, or the same refusal (its words, the lines
    listed, their count), as the whole file at once."""
    data = _csv([list(r) for r in rows], header=("approval_id", "merchant_id", "amount_won", "transacted_at",
                                                  "split_seq", "record_type")).encode()
    config = SettlementConfig(clearing_errors_listed_max=2)

    def run(part: int):
        saved, rc.VALIDATE_PART_LINES = rc.VALIDATE_PART_LINES, part
        try:
            frame, facts = rc.parse_clearing(data, config)
            return frame.rechunk().to_dicts(), facts
        except rc.ClearingFileInvalid as refused:
            return refused.detail, refused.extra
        finally:
            rc.VALIDATE_PART_LINES = saved

    assert run(part_lines) == run(10**9)


def test_a_file_of_a_thousand_scattered_dates_is_read(book):
    """One OR of every run of dates in one statement: a file whose lines fell on ~1,000
    dates apart was past SQLite's expression depth (1,000), and the reconciliation a 503
    "retry" for good (review). The ranges are read RANGES_PER_READ at a time."""
    start = dt.date(2020, 1, 1)
    rows = [["P", f"nowhere-{i}", "S1", 1_000, f"{(start + dt.timedelta(days=2 * i)).isoformat()}T12:00:00+09:00",
             None, None] for i in range(1_001)]
    with reader(book.engine).connect() as conn:
        result = rc.reconcile(conn, _csv(rows).encode())
    assert len(result.facts["business_dates"]) == 1_001
    assert result.frames["missing_in_ledger"].height == 1_001
