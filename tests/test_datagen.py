"""The data generator: deterministic from a seed, realistic shapes, a balanced book."""

from __future__ import annotations

import datetime as dt

import polars as pl

from rules.timeutil import local_date
from settlement import datagen
from settlement.compute import checks, compute, movements_from_legs
from settlement.config import SettlementConfig

DAY = dt.date(2026, 11, 20)


def test_merchants_have_the_sales_distribution_of_incheon():
    m = datagen.merchant_frame(20_000, seed=3)
    assert m.height == 20_000 and m["merchant_id"].n_unique() == 20_000
    assert set(m["district"].unique()) == set(datagen.DISTRICTS)
    sales = m["annual_sales_won"]
    assert 0.15 < (sales > 300_000_000).mean() < 0.35  # some 3–30억
    assert 0.001 < (sales > 3_000_000_000).mean() < 0.02  # a few above 30억
    assert (sales < 300_000_000).mean() > 0.6  # most small
    assert m.equals(datagen.merchant_frame(20_000, seed=3))


def test_day_frames_are_deterministic_realistic_and_balanced():
    merchants = datagen.merchant_frame(5_000)
    a = datagen.day_frames(DAY, merchants, payments=50_000, members=20_000, seed=5)
    b = datagen.day_frames(DAY, merchants, payments=50_000, members=20_000, seed=5)
    assert a.legs.equals(b.legs) and a.payments.equals(b.payments)
    amounts = a.payments["amount_won"]
    assert 15_000 < amounts.mean() < 19_000 and amounts.median() < amounts.mean()
    assert amounts.dtype == pl.Int64 and (amounts % 100 == 0).all()
    hours = a.payments.select(((pl.col("occurred_at_us") + 9 * 3_600_000_000) // 3_600_000_000 % 24)
                              .alias("h"))["h"].value_counts().sort("count", descending=True)
    assert set(hours["h"].head(4).to_list()) & {12, 13} and set(hours["h"].head(6).to_list()) & {18, 19}
    assert {local_date(t) for t in a.payments["occurred_at_us"].sample(200, seed=1)} == {DAY}
    assert 0.02 < a.refunds.height / a.payments.height < 0.04
    c = compute(a.legs, merchants, config=SettlementConfig(), payout_date=DAY, primary_date=DAY.isoformat())
    assert all(x.ok for x in checks(c, *movements_from_legs(a.legs)))
    assert c.totals["run"]["payment_count"] == 50_000


def test_command_plan_is_deterministic_and_orders_refunds_after_payments():
    one = datagen.command_plan(4, DAY, 2, members=30, merchants=10, payments_per_day=40)
    two = datagen.command_plan(4, DAY, 2, members=30, merchants=10, payments_per_day=40)
    assert one.commands == two.commands and one.members == two.members
    paid_at = {c.payment_id: c.occurred_at_us for c in one.commands if c.kind == "payment"}
    refunds = [c for c in one.commands if c.kind == "refund"]
    assert all(r.occurred_at_us > paid_at[r.payment_id] for r in refunds)
    for batch in one.batches(size_max=16):
        in_batch = {c.payment_id for c in batch if c.kind == "payment"}
        assert not any(c.kind == "refund" and c.payment_id in in_batch for c in batch)
    assert {m["district"] for m in one.members} <= set(datagen.DISTRICTS)
