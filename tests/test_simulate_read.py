"""The simulation's bulk read of the book (`settlement.simulate.load_range`: columnar,
the payments' JSON taken apart with vectorised string operations) equals the row-by-row
reference (`load_range_rows`: each payment's JSON parsed in Python), on a generated book
with points, grant money (of a program that earns cashback and one that does not),
partial and whole refunds, a range starting mid-month, and on both backends; and on
that book after a correction re-based hundreds of its payments (refunds before and after
it), where the months' start and the actual figures are what the payments hold."""

from __future__ import annotations

import datetime as dt
import sys
from urllib.parse import parse_qs, urlsplit
from pathlib import Path

import orjson
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from sqlalchemy import select

from ledger import schema as s
from ledger.book import cashback_held
from rules.compiled import compile_policy
from rules.loader import load_policy_file
from rules.simulate import evaluate_frame
from rules.timeutil import local_date, local_midnight_us
from settlement.points_model import evaluate_with_points
from settlement.simulate import _read_compact, costs_of, load_range, load_range_rows, simulate, summarise
from tests.book_helpers import generated_book


def _sorted(frame: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    value = [c for c in frame.columns if c not in keys][0]
    return frame.filter(pl.col(value) != 0).sort(keys)


@pytest.mark.parametrize("corrected, backdated, moved", [(False, False, False), (True, False, False),
                                                          (False, True, False), (False, True, True)],
                         ids=["as recorded", "corrected", "backdated", "backdated-moved"])
def test_bulk_read_equals_the_row_reader(db_url, monkeypatch, corrected, backdated, moved):
    engine, timeline, start = generated_book(db_url, corrected=corrected, backdated=backdated, moved=moved)
    earning = moved = 0
    for first, end in ((start, start + dt.timedelta(days=4)),                        # from a day's start
                       (start + dt.timedelta(days=2), start + dt.timedelta(days=3))):  # mid-month: earlier rows start it
        from_us, to_us = local_midnight_us(first), local_midnight_us(end)
        with engine.connect() as conn:
            fast, slow = load_range(conn, from_us, to_us), load_range_rows(conn, from_us, to_us)
            small = load_range(conn, from_us, to_us, chunk_rows=97)  # streamed in many chunks
            with monkeypatch.context() as patch:  # PostgreSQL without ADBC: COPY as CSV, cut at line ends
                patch.setitem(sys.modules, "adbc_driver_postgresql", None)
                csv = load_range(conn, from_us, to_us, chunk_rows=97)
        assert_frame_equal(csv.payments, fast.payments)
        assert_frame_equal(csv.recorded.payments, fast.recorded.payments)
        assert_frame_equal(small.payments, fast.payments)
        assert_frame_equal(small.recorded.payments, fast.recorded.payments)
        assert_frame_equal(csv.held.payments, fast.held.payments)
        assert_frame_equal(small.held.payments, fast.held.payments)
        assert small.recorded_policy_ids == fast.recorded_policy_ids
        assert fast.payments.height > 100 and fast.refunded_payments > 0
        # The payments before `from` recorded with or after the range's first of their
        # month are read with the range (`_recorded_late`), in the order recorded.
        early = set(fast.payments.filter(pl.col("occurred_at_us") < from_us)["payment_id"].to_list())
        with engine.connect() as conn:
            assert early == _recorded_with_or_after_the_range(conn, from_us, to_us)
        assert (len(early) > 100) == (backdated and first > start), len(early)
        if corrected:  # the correction moved the cashback of its range (the first two days)
            held, recorded = fast.held.payments["cashback_won"], fast.recorded.payments["cashback_won"]
            moved += int((held != recorded).sum())
            assert held.sum() <= recorded.sum()
            with engine.connect() as conn:
                assert _start_held(conn, from_us, early) == dict(
                    fast.start.months.select("member_id", "cashback_won").iter_rows())
        else:
            assert_frame_equal(fast.held.payments, fast.recorded.payments)
            # Only refunded payments are parsed one by one; the rest take the vectorised path.
            assert 0 < fast.row_reader_payments <= fast.refunded_payments + 50
        assert int(fast.payments["spent_grants_won"].sum()) > 0 and int(fast.payments["spent_points_won"].sum()) > 0
        earning += int(fast.payments["grant_cashback_won"].sum())
        assert_frame_equal(fast.payments, slow.payments)
        assert_frame_equal(fast.recorded.payments, slow.recorded.payments)
        assert_frame_equal(fast.held.payments, slow.held.payments)
        for costs in ("recorded", "held"):
            fast_costs, slow_costs = getattr(fast, costs), getattr(slow, costs)
            for frame_fast, frame_slow, key in ((fast_costs.by_component, slow_costs.by_component, ["component_id"]),
                                                (fast_costs.by_funder, slow_costs.by_funder, ["source"])):
                assert_frame_equal(_sorted(frame_fast, key), _sorted(frame_slow, key))
        months = ["member_id", "month_key"]
        assert_frame_equal(fast.start.months.sort(months), slow.start.months.sort(months), check_row_order=False)
        assert_frame_equal(_sorted(fast.start.components, [*months, "component_id"]),
                           _sorted(slow.start.components, [*months, "component_id"]))
        assert fast.recorded_policy_ids == slow.recorded_policy_ids
        assert fast.refunded_payments == slow.refunded_payments
    assert earning > 0 and (moved > 50) == corrected
    report = simulate(engine, timeline, local_midnight_us(start + dt.timedelta(days=1)),
                      local_midnight_us(start + dt.timedelta(days=3)))
    assert report["payments"]["count"] > 100 and report["totals"]["actual_won"] > 0


def _recorded_with_or_after_the_range(conn, from_us: int, to_us: int) -> set[str]:
    """The approved payments of `from`'s month before it recorded in or after the batch
    of the first of the range's payments of their member."""
    p = s.payments
    rows = conn.execute(select(p.c.payment_id, p.c.member_id, p.c.occurred_at_us, p.c.recorded_at_us)
                        .where(p.c.status == "approved", p.c.occurred_at_us < to_us)).all()
    month_start = local_midnight_us(local_date(from_us).replace(day=1))
    month_end = local_midnight_us((local_date(from_us).replace(day=28) + dt.timedelta(days=4)).replace(day=1))
    first: dict[str, int] = {}
    for _, member_id, occurred, recorded in rows:
        if from_us <= occurred < month_end:
            first[member_id] = min(first.get(member_id, recorded), recorded)
    return {payment_id for payment_id, member_id, occurred, recorded in rows
            if month_start <= occurred < from_us and member_id in first and recorded >= first[member_id]}


def _start_held(conn, from_us: int, read_with_the_range: set[str]) -> dict[str, int]:
    """Per member, what their payments of `from`'s month before it hold (`cashback_held`),
    but those read with the range."""
    held: dict[str, int] = {}
    for payment_id, member_id, detail, state in conn.execute(
            select(s.payments.c.payment_id, s.payments.c.member_id, s.payments.c.detail, s.payments.c.refund_state)
            .where(s.payments.c.status == "approved", s.payments.c.occurred_at_us < from_us)):
        if payment_id in read_with_the_range:
            continue
        won = sum(cashback_held(orjson.loads(detail), orjson.loads(state or "{}")).values())
        held[member_id] = held.get(member_id, 0) + won
    return held


def _whole_range(engine, policy, from_us, to_us, actual_timeline, member_differences_max):
    """The report as evaluated on the whole range at once (`load_range` as a simulation
    reads it: one frame)."""
    with engine.connect() as conn:
        loaded = load_range(conn, from_us, to_us, recorded_late=False)  # as a simulation reads it
    actual = (loaded.held if actual_timeline is None
              else costs_of(evaluate_frame(actual_timeline, loaded.payments, loaded.start, as_given=True)))
    held = pl.repeat(0, loaded.payments.height, dtype=pl.Int64, eager=True).scatter(
        actual.payments["row"], actual.payments["cashback_won"])
    simulated, _ = evaluate_with_points(policy, loaded.payments, loaded.start, held, loaded.payments["member_id"],
                                        actual_timeline, as_given=True)
    report = summarise(simulated, actual, member_differences_max=member_differences_max)
    recorded = {"cashback_won": int(loaded.recorded.payments["cashback_won"].sum()),
                "held_won": int(loaded.held.payments["cashback_won"].sum()),
                "policy_ids": loaded.recorded_policy_ids, "refunded_payments": loaded.refunded_payments}
    return report, recorded


# No longer 3 rows a group (more groups than members, some empty): each group runs the
# points model's evaluations, ~30 s a backend, and CI took 16.9 min against its 15; nor 40
# (CI took 15.7 min): 90 rows a group over ~750 payments still makes eight groups and
# more; a group with no member in it is no longer exercised.
@pytest.mark.parametrize(("chunk_rows", "group_rows", "corrected", "backdated", "moved"),
                         [(97, 90, False, False, False), (97, 90, True, False, False),
                          (1_000_000, 4_000_000, False, False, False), (1_000_000, 4_000_000, True, False, False),
                          (97, 90, False, True, False), (1_000_000, 4_000_000, False, True, False),
                          (97, 90, False, True, True)],
                         ids=["97-90-as recorded", "97-90-corrected", "whole-as recorded", "whole-corrected",
                              "97-90-backdated", "whole-backdated", "97-90-backdated-moved"])
def test_streamed_simulation_equals_the_whole_range(db_url, chunk_rows, group_rows, corrected, backdated, moved):
    """`simulate` reads the range narrow and evaluates one member group at a time; its
    report is the whole-range evaluation's, figure for figure, whatever the read's
    chunk and the group size (90 rows a group: many groups),
    against what the payments hold and against a timeline, with the member list cut;
    and so after a correction, and with backdated payments (each member's evaluated in
    the order the book paid them: the streamed read reorders only those members, the
    whole range is read in that order)."""
    engine, timeline, start = generated_book(db_url, corrected=corrected, backdated=backdated, moved=moved)
    draft = compile_policy(load_policy_file(Path(__file__).parents[1] / "policies" / "2025-09-all-under-30eok.yaml"))
    for first, end, actual_timeline, shown in (
            (start + dt.timedelta(days=1), start + dt.timedelta(days=4), None, 3),   # mid-month: earlier rows start it
            (start, start + dt.timedelta(days=4), timeline, 1_000)):
        from_us, to_us = local_midnight_us(first), local_midnight_us(end)
        whole, recorded = _whole_range(engine, draft, from_us, to_us, actual_timeline, shown)
        streamed = simulate(engine, draft, from_us, to_us, actual_timeline, member_differences_max=shown,
                            chunk_rows=chunk_rows, group_rows=group_rows)
        assert {k: streamed[k] for k in whole} == whole
        assert streamed["recorded"] == recorded
        assert whole["members"]["affected"] > 3 and whole["payments"]["count"] > 4 * 90, whole["payments"]["count"]
        assert len(whole["member_differences"]) == min(shown, whole["members"]["affected"])
        if backdated:  # the members the book paid out of their time order are reordered
            with engine.connect() as conn:
                assert _read_compact(conn, from_us, to_us).reordered.len() > 5


def test_time_order_breaks_ties_by_payment_id():
    """The narrow read orders rows by (occurred_at, payment_id) sorting only the times,
    then the rows that share a time by their id."""
    from settlement.simulate import _in_time_order

    rows = pl.DataFrame({"occurred_at_us": [5, 3, 5, 1, 5, 3, 9],
                         "payment_id": ["c", "z", "a", "q", "b", "y", "a"], "v": list(range(7))})
    assert_frame_equal(_in_time_order(rows), rows.sort("occurred_at_us", "payment_id"))
    untied = rows.head(2)
    assert_frame_equal(_in_time_order(untied), untied.sort("occurred_at_us"))


def test_streamed_simulation_refuses_a_range_too_large(db_url):
    """More payments than allowed: refused with a clear error while the read streams
    (PostgreSQL: its two reading threads stopped, nothing left hanging)."""
    engine, timeline, start = generated_book(db_url)
    from_us, to_us = local_midnight_us(start), local_midnight_us(start + dt.timedelta(days=4))
    with pytest.raises(ValueError, match="more than 50 payments"):
        simulate(engine, timeline, from_us, to_us, payments_max=50, chunk_rows=7)
    assert simulate(engine, timeline, from_us, to_us)["payments"]["count"] > 50


def test_narrow_read_nets_refunds_vectorised(db_url):
    """The narrow read nets the book's refund states (partial, whole, grant money given
    back) with column operations: no payment of this book is parsed one by one, and the
    states it netted include restored grants and clawed cashback."""
    from settlement.simulate import _read_compact

    engine, _, start = generated_book(db_url)
    with engine.connect() as conn:
        states = [r[0] for r in conn.exec_driver_sql("SELECT refund_state FROM payments WHERE refund_state <> '{}'")]
        compact = _read_compact(conn, local_midnight_us(start + dt.timedelta(days=1)),
                                local_midnight_us(start + dt.timedelta(days=3)), chunk_rows=50)
    assert any('"grants":{"' in s for s in states) and any('"clawed":{"' in s for s in states)
    assert compact.refunded > 0 and compact.row_reader_payments == 0


@pytest.mark.postgres
def test_each_read_of_the_book_connects_once_with_bounded_waits(pg_url, monkeypatch):
    """A simulation's reads one after another share one ADBC connection (each costs the
    driver's type-catalog read, ~50 ms), and every connection it opens carries the
    engine's bounded waits, so that a lost server cannot hang a read; the two threads of
    the streamed read each have their own."""
    pytest.importorskip("adbc_driver_postgresql")
    from adbc_driver_postgresql import dbapi as adbc

    engine, timeline, start = generated_book(pg_url)
    opened: list[str] = []
    connect = adbc.connect

    def counted(uri, *args, **kwargs):
        opened.append(uri)
        return connect(uri, *args, **kwargs)

    monkeypatch.setattr(adbc, "connect", counted)
    from_us, to_us = local_midnight_us(start), local_midnight_us(start + dt.timedelta(days=4))
    with engine.connect() as conn:
        assert load_range(conn, from_us, to_us).payments.height > 100
    assert len(opened) == 1  # the members, the merchants and the payments
    opened.clear()
    assert simulate(engine, timeline, from_us, to_us)["payments"]["count"] > 100
    assert len(opened) == 3  # the registry's facts, then the payments' two halves side by side
    for uri in opened:
        assert {"connect_timeout", "tcp_user_timeout", "keepalives"} <= set(parse_qs(urlsplit(uri).query)), uri
