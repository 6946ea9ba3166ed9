"""budget_days: what each budget committed per day, for the forecast's recent burn

`forecast_exhausted_on` (GET /v1/budgets, the reports) projected a budget's run-out from
its period's average daily burn so far: after a mid-period rise (a promotion from the
20th of a year budget) the year's average hid the new burn and the date came months
late. From this revision the book keeps, in the same transaction as each budget row it
moves, that move under the day of the batch's clock (Seoul), and the forecast reads the
last 7 days of the period (docs/design.md, "Budgets").

Back-filled from the ledger: each `funder/{source}/{month}` leg counts against its
month's and its year's budget (as `budgets.committed_won` counts it, the book check
"budgets equal funder accounts"), under the Seoul day its transaction was recorded
(`ledger_txns.recorded_at_us`, the batch's clock, which the book writes the new rows
by). Days whose moves sum to 0 get no row. One pass over the funder legs, grouped by
account and day in the database.

Revision ID: 0021
Revises: 0020
"""
import datetime as dt

import sqlalchemy as sa
from alembic import context, op

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None

_US_PER_DAY = 86_400_000_000
_SEOUL_OFFSET_US = 9 * 3_600_000_000  # Asia/Seoul has kept +09:00 since 1988 (rules.timeutil.local_date)
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def upgrade() -> None:
    op.create_table('budget_days',
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('period', sa.String(length=7), nullable=False),
    sa.Column('day', sa.String(length=10), nullable=False),
    sa.Column('committed_won', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('source', 'period', 'day', name=op.f('pk_budget_days'))
    )
    bind = op.get_bind()
    # Funder accounts are debit-normal (expense): the legs' sum is what was committed.
    day_of = f"(t.recorded_at_us + {_SEOUL_OFFSET_US}) / {_US_PER_DAY}"  # integer division on both dialects
    rows = bind.execute(sa.text(
        f"SELECT l.account_id, {day_of}, sum(l.amount_won) FROM ledger_legs l JOIN ledger_txns t "
        f"ON t.txn_id = l.txn_id WHERE l.account_id LIKE 'funder/%' GROUP BY l.account_id, {day_of}"))
    days: dict[tuple[str, str, str], int] = {}
    for account_id, day_number, won in rows:
        _, source, month = account_id.split("/")
        day = dt.date.fromordinal(_EPOCH_ORDINAL + int(day_number)).isoformat()
        for period in (month, month[:4]):
            days[(source, period, day)] = days.get((source, period, day), 0) + int(won)
    values = [{"source": src, "period": per, "day": day, "won": won}
              for (src, per, day), won in sorted(days.items()) if won]
    if values:
        bind.execute(sa.text("INSERT INTO budget_days (source, period, day, committed_won) "
                             "VALUES (:source, :period, :day, :won)"), values)
        context.config.print_stdout(f"0021: budget_days back-filled from the funder legs by the day their "
                                    f"transactions were recorded: {len(values)} rows")


def downgrade() -> None:
    op.drop_table('budget_days')
