"""Settlement tables, on the book of record's `metadata` (migration 0002).

A settlement never changes the ledger: it reads it and writes these rows. Every row a
settlement writes stays; a correction is a later settlement whose payout rows carry the
difference, so Σ payout rows per (merchant, business date) over all settlements that
are not `failed` is always the current truth.

Watermark: each successful run R stores `watermark_us` (inclusive) and the previous run's
`prev_watermark_us`; the windows (prev, watermark] of successive runs partition time.
See settlement/service.py for the rule that makes every ledger transaction land once.
"""

from __future__ import annotations

from sqlalchemy import (BigInteger, CheckConstraint, Column, Index, Integer, LargeBinary, String, Table, Text,
                        UniqueConstraint)

from ledger import schema as ls
from ledger.schema import ID, metadata

STATUSES = ("settled", "failed", "reopened", "superseded")

settlements = Table(
    "settlements", metadata,
    Column("settlement_id", String(ID), primary_key=True),
    Column("business_date", String(10), nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # day | correction
    Column("status", String(16), nullable=False),
    Column("watermark_us", BigInteger, nullable=False),  # recorded_at_us covered, inclusive
    Column("prev_watermark_us", BigInteger, nullable=False),  # late window start, exclusive
    Column("watermark_txn_id", BigInteger, nullable=True),  # highest txn id covered (information)
    Column("payout_date", String(10), nullable=False),
    Column("totals", Text, nullable=False),
    Column("checks", Text, nullable=False),
    Column("config", Text, nullable=False),
    Column("run_by", String(200), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    CheckConstraint("status IN ('settled', 'failed', 'reopened', 'superseded')", name="status"),
    CheckConstraint("kind IN ('day', 'correction')", name="kind"),
    CheckConstraint("watermark_us >= prev_watermark_us", name="window"),
    UniqueConstraint("business_date", "version", name="uq_settlements_date_version"),
    Index("ix_settlements_status", "status", "watermark_us"),
)

settlement_coverage = Table(
    "settlement_coverage", metadata,
    Column("settlement_id", String(ID), primary_key=True),
    Column("business_date", String(10), primary_key=True),
    Column("kind", String(16), nullable=False),  # day | adjustment | correction
    Column("txn_count", BigInteger, nullable=False),
    Column("from_us", BigInteger, nullable=True),  # exclusive; null: from the beginning
    Column("to_us", BigInteger, nullable=False),  # inclusive
)

settlement_payouts = Table(
    "settlement_payouts", metadata,
    Column("settlement_id", String(ID), primary_key=True),
    Column("for_business_date", String(10), primary_key=True),
    Column("merchant_id", String(ID), primary_key=True),
    Column("kind", String(16), nullable=False),  # day | adjustment | correction
    Column("payment_count", BigInteger, nullable=False),
    Column("refund_count", BigInteger, nullable=False),
    Column("sales_won", BigInteger, nullable=False),
    Column("refunds_won", BigInteger, nullable=False),
    Column("net_sales_won", BigInteger, nullable=False),
    Column("fee_bp", Integer, nullable=False),
    Column("fee_won", BigInteger, nullable=False),
    Column("merchant_share_won", BigInteger, nullable=False),
    Column("net_payable_won", BigInteger, nullable=False),
    Column("payout_date", String(10), nullable=False),
    CheckConstraint("net_payable_won = net_sales_won - fee_won - merchant_share_won", name="net"),
    Index("ix_settlement_payouts_merchant", "merchant_id", "for_business_date"),
)

settlement_reopen_requests = Table(
    "settlement_reopen_requests", metadata,
    Column("request_id", String(ID), primary_key=True),
    Column("settlement_id", String(ID), nullable=False),
    Column("reason", Text, nullable=False),
    Column("requested_by", String(200), nullable=False),
    Column("requested_at_us", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # pending | approved | rejected
    Column("decided_by", String(200), nullable=True),
    Column("decided_at_us", BigInteger, nullable=True),
    CheckConstraint("status IN ('pending', 'approved', 'rejected')", name="status"),
    CheckConstraint("decided_by IS NULL OR decided_by <> requested_by", name="second_person"),
    Index("ix_settlement_reopen_requests_settlement", "settlement_id"),
)

# A clearing file's reconciliation, as run (migration 0020): what it covered, who ran it on
# which file (its SHA-256 and size), the summary (facts, counts, amounts, rows_truncated)
# and the exception rows, gzip-compressed JSON of at most `rows_stored` a category (the
# matched rows are not kept). The reports show the latest run covering their dates.
reconciliations = Table(
    "reconciliations", metadata,
    Column("reconciliation_id", String(ID), primary_key=True),
    Column("first_business_date", String(10), nullable=False),
    Column("last_business_date", String(10), nullable=False),
    Column("run_by", String(200), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("file_sha256", String(64), nullable=False),
    Column("file_bytes", BigInteger, nullable=False),
    Column("rows_max", Integer, nullable=False),  # the rows of each category the answer listed
    Column("rows_stored", Integer, nullable=False),  # the exception rows of each category kept
    Column("exception_count", BigInteger, nullable=False),
    Column("summary", Text, nullable=False),
    Column("exceptions", LargeBinary, nullable=False),
    Index("ix_reconciliations_created", "created_at_us", "reconciliation_id"),
)

# The business dates each run compared (a file's dates need not be consecutive): the
# reports' and `GET /v1/reconciliations?date=`'s look-up.
reconciliation_dates = Table(
    "reconciliation_dates", metadata,
    Column("business_date", String(10), primary_key=True),
    Column("reconciliation_id", String(ID), primary_key=True),
    Column("created_at_us", BigInteger, nullable=False),
)

# Read paths of settlement and reconciliation over the book of record's tables.
ix_ledger_txns_recorded = Index("ix_ledger_txns_recorded", ls.ledger_txns.c.recorded_at_us)
ix_payments_occurred = Index("ix_payments_occurred", ls.payments.c.occurred_at_us)
