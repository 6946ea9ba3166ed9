"""A correction's plan read and evaluated one member group at a time
(`settlement.simulate.correction_plan`, `group_rows`) is the plan read whole, field by
field and line by line, and so is what a proposal stores from it: member-months are
independent in the plan (each one's payments, month start, corrections posted and
history are its own), so the plan of the whole is the merge of its groups' plans.

The book: four generated days with points, grant money, partial and whole refunds, a quarter of its first two
days' payments recorded after all the rest (out of their time order, some before the
range recorded after the range's first), and a correction of its first two days posted
between two halves of its refunds; the plan is of another correction over a range
starting mid-month, read on to the month's end, on both backends."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
from sqlalchemy import select

from ledger import corrections
from ledger import schema as s
from ledger.keys import Principal
from ledger.policies import create_draft
from rules.document import PolicyDocument
from rules.timeutil import local_midnight_us
from settlement import datagen
from settlement import simulate as sim
from tests.book_helpers import city_policy, generated_book

EDITOR = Principal("k1", "editor", "policy-editor")


def _book(url: str):
    """`generated_book` backdated and corrected, and a policy paying 12% on the first 30만
    drafted as the right policy of the plans tried here."""
    engine, timeline, start = generated_book(url, corrected=True, backdated=True)
    with engine.begin() as conn:
        create_draft(conn, PolicyDocument.model_validate(city_policy("city-12", 300_000, 1_200)), EDITOR)
    return engine, timeline, start


def _members(loaded) -> set[str]:
    return set(loaded.payments["member_id"].to_list())


def _stored(engine, correction_id: str) -> tuple[dict, list, list]:
    c, l, p = s.corrections, s.correction_lines, s.correction_payments
    with engine.connect() as conn:
        summary = conn.execute(select(c.c.summary).where(c.c.correction_id == correction_id)).scalar_one()
        lines = conn.execute(select(l.c.member_id, l.c.month, l.c.delta_won, l.c.by_funder, l.c.by_component,
                                    l.c.request_hash).where(l.c.correction_id == correction_id)
                             .order_by(l.c.line_id)).all()
        payments = conn.execute(select(p.c.line_id, p.c.payment_id, p.c.refunded_won, p.c.deltas,
                                       p.c.corrections_seen, p.c.base)
                                .where(p.c.line_id.like(f"{correction_id}/%")).order_by(p.c.line_id, p.c.payment_id)
                                ).all()
    return summary, [tuple(row) for row in lines], [(row[0].split("/", 1)[1], *row[1:]) for row in payments]


def test_a_plan_in_member_groups_is_the_plan_read_whole(db_url, monkeypatch):
    engine, timeline, start = _book(db_url)
    from_us = local_midnight_us(start + dt.timedelta(days=1))  # mid-month: the month's start before it
    to_us = local_midnight_us(start + dt.timedelta(days=3))
    timelines = corrections._timelines(engine, timeline, "city-12", from_us, to_us)
    wrong, right = timelines(())
    reads: list[tuple[object, set[str]]] = []
    read_for_plan = sim._read_for_plan

    def spied(*args, **kwargs):
        found = read_for_plan(*args, **kwargs)
        reads.append((kwargs.get("member_group"), _members(found[0])))
        return found

    monkeypatch.setattr(sim, "_read_for_plan", spied)
    whole = sim.correction_plan(engine, wrong, right, from_us, to_us, rest_of_month=True, timelines=timelines,
                                group_rows=10 ** 9)
    assert len(reads) == 1 and reads[0][0] is None
    everyone = reads[0][1]
    reads.clear()
    grouped = sim.correction_plan(engine, wrong, right, from_us, to_us, rest_of_month=True, timelines=timelines,
                                  group_rows=250)
    # Several groups, each read apart: disjoint members, all of them in all.
    assert len(reads) >= 4, len(reads)
    assert all(group is not None for group, _ in reads)
    assert sum(len(members) for _, members in reads) == len(everyone)
    assert set().union(*(members for _, members in reads)) == everyone
    assert max(len(members) for _, members in reads) < len(everyone) // 2

    # The book is as described: a plan over corrected payments, late ones and refunds.
    assert whole.payments > 500 and whole.payments_already_corrected > 50, whole
    assert len(whole.lines) > 30 and whole.recorded_mismatch_payments > 0
    with engine.connect() as conn:
        loaded = sim.load_range(conn, from_us, sim._month_end_us(to_us))
    assert loaded.payments.filter(pl.col("occurred_at_us") < from_us).height > 20  # recorded late
    assert loaded.refunded_payments > 10 and int(loaded.payments["spent_grants_won"].sum()) > 0
    for name in ("wrong_won", "right_won", "recorded_won", "recorded_mismatch_payments", "payments",
                 "payments_already_corrected", "held_won"):
        assert getattr(grouped, name) == getattr(whole, name), name
    assert [(line.member_id, line.month) for line in grouped.lines] == [(line.member_id, line.month)
                                                                        for line in whole.lines]
    for mine, theirs in zip(grouped.lines, whole.lines):
        assert mine == theirs, (mine.member_id, mine.month)
    assert grouped == whole

    # What a proposal stores from it: the same, line for line and payment for payment.
    monkeypatch.setattr(sim, "_read_for_plan", read_for_plan)
    proposals = {}
    for correction_id, group_rows in (("whole", 10 ** 9), ("grouped", 250)):
        monkeypatch.setattr(sim, "PLAN_GROUP_ROWS", group_rows)
        proposals[correction_id] = corrections.propose(
            engine, timeline, correction_id=correction_id, wrong_policy_id="datagen-2026",
            right_policy_id="city-12", from_us_=from_us, to_us_=to_us, author=EDITOR)
    assert proposals["grouped"]["summary"] == proposals["whole"]["summary"]
    assert proposals["whole"]["summary"]["payments_changed"] > 100
    assert _stored(engine, "grouped") == _stored(engine, "whole")


def test_a_plan_in_groups_refuses_a_range_too_large_as_read_whole(db_url):
    """The range's bound counts its payments over all groups (`payments_max`), not per
    group, as the range read whole counts them (those of the range, not the month's
    earlier ones read with it), and the refusal names the bound asked for."""
    from ledger.errors import RangeTooLarge

    engine, timeline, start = _book(db_url)
    from_us = local_midnight_us(start + dt.timedelta(days=1))
    to_us = local_midnight_us(start + dt.timedelta(days=3))
    with engine.connect() as conn:
        loaded = sim.load_range(conn, from_us, to_us)
    in_range = loaded.payments.filter(pl.col("occurred_at_us") >= from_us).height
    assert in_range > 300
    policy = datagen.demo_timeline()
    for group_rows in (10 ** 9, 100):
        plan = sim.correction_plan(engine, policy, policy, from_us, to_us, payments_max=in_range,
                                   group_rows=group_rows)
        assert plan.lines == [] and plan.payments == loaded.payments.height
        with pytest.raises(RangeTooLarge, match=f"more than {in_range - 1:,} payments"):
            sim.correction_plan(engine, policy, policy, from_us, to_us, payments_max=in_range - 1,
                                group_rows=group_rows)


def test_a_plan_that_changes_more_payments_than_a_proposal_holds_is_refused(db_url, monkeypatch):
    """The plan's lines, a row per payment changed, are kept whole over the groups: more
    than `payments_changed_max` of them is 422 `range_too_large` (`CorrectionTooLarge`),
    nothing proposed, however the range is grouped."""
    from ledger.errors import CorrectionTooLarge

    engine, timeline, start = _book(db_url)
    from_us = local_midnight_us(start + dt.timedelta(days=1))
    to_us = local_midnight_us(start + dt.timedelta(days=3))
    timelines = corrections._timelines(engine, timeline, "city-12", from_us, to_us)
    wrong, right = timelines(())
    plan = sim.correction_plan(engine, wrong, right, from_us, to_us, rest_of_month=True, timelines=timelines)
    changed = sum(len(line.payments) for line in plan.lines)
    assert changed > 100
    for group_rows in (10 ** 9, 250):
        kept = sim.correction_plan(engine, wrong, right, from_us, to_us, rest_of_month=True, timelines=timelines,
                                   group_rows=group_rows, payments_changed_max=changed)
        assert kept == plan
        with pytest.raises(CorrectionTooLarge, match=f"changes more than {changed - 1:,} payments") as refused:
            sim.correction_plan(engine, wrong, right, from_us, to_us, rest_of_month=True, timelines=timelines,
                                group_rows=group_rows, payments_changed_max=changed - 1)
        assert refused.value.code == "range_too_large" and refused.value.status == 422
        assert refused.value.extra == {"payments_changed_max": changed - 1}
    monkeypatch.setattr(sim, "PLAN_PAYMENTS_CHANGED_MAX", changed - 1)
    with pytest.raises(CorrectionTooLarge):
        corrections.propose(engine, timeline, correction_id="too-many", wrong_policy_id="datagen-2026",
                            right_policy_id="city-12", from_us_=from_us, to_us_=to_us, author=EDITOR)
    with engine.connect() as conn:
        assert conn.execute(select(s.corrections.c.correction_id)
                            .where(s.corrections.c.correction_id == "too-many")).first() is None
        assert conn.execute(select(s.correction_lines.c.line_id)
                            .where(s.correction_lines.c.correction_id == "too-many")).first() is None
