"""The book of record's tables (SQLAlchemy Core). Alembic migrations are generated from
this and carry, besides, the triggers that make the ledger append-only and balanced.

Conventions:
- money is BigInteger won; time is BigInteger microseconds since the epoch (UTC);
  `month` is "YYYY-MM" and `business_date` "YYYY-MM-DD", both Asia/Seoul.
- a leg's `amount_won` is signed: debit positive, credit negative; the legs of a
  transaction sum to zero.
- an account's `balance_won` is in its normal sign: Σ legs for debit-normal types
  (asset, expense), −Σ legs for credit-normal types (liability, income, equity).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

ID = 64  # caller-chosen ids: 1–64 characters

members = Table(
    "members", metadata,
    Column("member_id", String(ID), primary_key=True),
    Column("district", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    CheckConstraint("status IN ('active', 'suspended')", name="status"),
)

merchants = Table(
    "merchants", metadata,
    Column("merchant_id", String(ID), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("district", String(16), nullable=False),
    Column("category", String(64), nullable=False),
    Column("annual_sales_won", BigInteger, nullable=False),
    Column("registered_from", String(10), nullable=False),
    Column("flags", String(400), nullable=False, server_default=""),
    Column("merchant_share_bp", Integer, nullable=False, server_default="0"),
    Column("updated_at_us", BigInteger, nullable=False),
    CheckConstraint("annual_sales_won >= 0", name="sales"),
    CheckConstraint("merchant_share_bp BETWEEN 0 AND 10000", name="share"),
)

# The registry's facts that rules read, dated (migration 0022): one row per change, append
# only, valid from the instant the registry write that made it took (`valid_from_us`,
# strictly increasing per merchant or member; the rows a book had before 0022 are valid
# from 0). Corrections and the policy preview judge a payment by the version in force
# when the book recorded it (`settlement.simulate`, "registry facts"); the book itself
# reads `merchants` and `members` as they stand. The name, the only other column of
# `merchants`, is read by no rule, so a change of it alone adds no version.
merchant_facts = Table(
    "merchant_facts", metadata,
    Column("merchant_id", String(ID), primary_key=True),
    Column("valid_from_us", BigInteger, primary_key=True, autoincrement=False),
    Column("district", String(16), nullable=False),
    Column("category", String(64), nullable=False),
    Column("annual_sales_won", BigInteger, nullable=False),
    Column("registered_from", String(10), nullable=False),
    Column("flags", String(400), nullable=False, server_default=""),
    Column("merchant_share_bp", Integer, nullable=False, server_default="0"),
)

member_facts = Table(
    "member_facts", metadata,
    Column("member_id", String(ID), primary_key=True),
    Column("valid_from_us", BigInteger, primary_key=True, autoincrement=False),
    Column("district", String(16), nullable=False),
    Column("status", String(16), nullable=False),
)

accounts = Table(
    "accounts", metadata,
    Column("account_id", String(200), primary_key=True),
    Column("type", String(16), nullable=False),
    Column("owner_id", String(ID), nullable=True),  # member id for member accounts
    Column("balance_won", BigInteger, nullable=False, server_default="0"),
    Column("floor_zero", Boolean, nullable=False),
    CheckConstraint("type IN ('asset', 'liability', 'income', 'expense', 'equity')", name="type"),
    CheckConstraint("NOT floor_zero OR balance_won >= 0", name="floor"),
    Index("ix_accounts_owner", "owner_id"),
)

ledger_txns = Table(
    "ledger_txns", metadata,
    Column("txn_id", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(32), nullable=False),
    Column("ref", String(200), nullable=False),  # a command's key: an id, or program/member, correction/member/month (0018)
    Column("member_id", String(ID), nullable=True),
    Column("merchant_id", String(ID), nullable=True),
    Column("occurred_at_us", BigInteger, nullable=False),
    Column("business_date", String(10), nullable=False),
    Column("recorded_at_us", BigInteger, nullable=False),
    Column("leg_count", SmallInteger, nullable=False),
    Column("memo", Text, nullable=True),
    Index("ix_ledger_txns_member", "member_id", "txn_id"),
    Index("ix_ledger_txns_date_txn", "business_date", "txn_id"),
)

ledger_legs = Table(
    "ledger_legs", metadata,
    Column("txn_id", BigInteger, primary_key=True, autoincrement=False),
    Column("leg_no", SmallInteger, primary_key=True, autoincrement=False),
    Column("account_id", String(200), nullable=False),
    Column("amount_won", BigInteger, nullable=False),
    CheckConstraint("amount_won <> 0", name="nonzero"),
    # Legs are written first, the transaction row seals them: the deferred key makes
    # a leg without its sealed transaction fail at commit.
    ForeignKeyConstraint(["txn_id"], ["ledger_txns.txn_id"], deferrable=True, initially="DEFERRED"),
    ForeignKeyConstraint(["account_id"], ["accounts.account_id"], deferrable=True, initially="DEFERRED"),
)

member_months = Table(
    "member_months", metadata,
    Column("member_id", String(ID), primary_key=True),
    Column("month", String(7), primary_key=True),
    Column("eligible_spend_won", BigInteger, nullable=False, server_default="0"),
    Column("cashback_won", BigInteger, nullable=False, server_default="0"),
    Column("topped_up_won", BigInteger, nullable=False, server_default="0"),
    Column("component_cashback", Text, nullable=False, server_default="{}"),
    CheckConstraint("eligible_spend_won >= 0 AND cashback_won >= 0 AND topped_up_won >= 0", name="nonneg"),
)

budgets = Table(
    "budgets", metadata,
    Column("source", String(16), primary_key=True),
    Column("period", String(7), primary_key=True),  # "2026" or "2026-11"
    Column("limit_won", BigInteger, nullable=True),  # null: no limit set
    Column("committed_won", BigInteger, nullable=False, server_default="0"),
    Column("updated_at_us", BigInteger, nullable=False),
    CheckConstraint("committed_won >= 0", name="committed"),
    CheckConstraint("limit_won IS NULL OR committed_won <= limit_won", name="within_limit"),
)

# What each budget committed per day: every batch that moves a budget row adds its delta
# here in the same transaction, under the day of the batch's clock in Seoul (when the
# money was committed; a refund's clawback or a correction that gives money back is a
# negative delta on its own day). A budget's days sum to its `committed_won` (the book
# check); `GET /v1/budgets` forecasts from the recent ones (`ledger.queries.recent_burn`).
budget_days = Table(
    "budget_days", metadata,
    Column("source", String(16), primary_key=True),
    Column("period", String(7), primary_key=True),
    Column("day", String(10), primary_key=True),  # "2026-12-20", Seoul
    Column("committed_won", BigInteger, nullable=False),
)

# A budget limit asked for by one person and set when another approves it
# (`ledger.budget_requests`; the only way with EUM_BUDGET_APPROVAL=second_person, where
# `PUT /v1/budgets/...` is refused). At most one pending request per budget.
budget_requests = Table(
    "budget_requests", metadata,
    Column("request_id", String(ID), primary_key=True),
    Column("source", String(16), nullable=False),
    Column("period", String(7), nullable=False),
    Column("amount_won", BigInteger, nullable=False),
    Column("limit_before_won", BigInteger, nullable=True),  # the limit when asked for (null: none set)
    Column("reason", Text, nullable=True),
    Column("requested_by", String(200), nullable=False),
    Column("requested_at_us", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # pending | approved | withdrawn
    Column("decided_by", String(200), nullable=True),
    Column("decided_at_us", BigInteger, nullable=True),
    CheckConstraint("status IN ('pending', 'approved', 'withdrawn')", name="status"),
    CheckConstraint("status <> 'approved' OR decided_by <> requested_by", name="second_person"),
    Index("uq_budget_requests_pending", "source", "period", unique=True,
          postgresql_where=text("status = 'pending'"), sqlite_where=text("status = 'pending'")),
    Index("ix_budget_requests_requested_at_us", "requested_at_us"),
)

payments = Table(
    "payments", metadata,
    Column("payment_id", String(ID), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("member_id", String(ID), nullable=False),
    Column("merchant_id", String(ID), nullable=False),
    Column("amount_won", BigInteger, nullable=False),
    Column("occurred_at_us", BigInteger, nullable=False),
    Column("month", String(7), nullable=False),
    Column("status", String(16), nullable=False),
    Column("decline_code", String(64), nullable=True),
    Column("policy_id", String(ID), nullable=True),
    Column("base_won", BigInteger, nullable=False, server_default="0"),
    Column("counts_toward_month", Boolean, nullable=False, server_default="0"),
    Column("cashback_won", BigInteger, nullable=False, server_default="0"),
    # JSON: what was spent and earned, needed by refunds (and replays).
    Column("detail", Text, nullable=False),
    Column("refunded_won", BigInteger, nullable=False, server_default="0"),
    Column("refund_state", Text, nullable=False, server_default="{}"),
    Column("response", Text, nullable=False),
    Column("recorded_at_us", BigInteger, nullable=False),
    CheckConstraint("refunded_won >= 0 AND refunded_won <= amount_won", name="refunded"),
    Index("ix_payments_member", "member_id"),
)

topups = Table(
    "topups", metadata,
    Column("topup_id", String(ID), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("member_id", String(ID), nullable=False),
    Column("amount_won", BigInteger, nullable=False),
    Column("occurred_at_us", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("decline_code", String(64), nullable=True),
    Column("response", Text, nullable=False),
    Column("recorded_at_us", BigInteger, nullable=False),
)

# A member's withdrawal of unspent charged money (migration 0016): approved ones moved
# `amount_won` from the member's charged money back to the operator's cash (a ledger
# transaction of kind `withdrawal`); declined ones are recorded with 0 and a decline code.
withdrawals = Table(
    "withdrawals", metadata,
    Column("withdrawal_id", String(ID), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("member_id", String(ID), nullable=False),
    Column("requested_won", BigInteger, nullable=True),  # the amount the member confirmed, if sent
    Column("amount_won", BigInteger, nullable=False),  # withdrawn: 0 when declined
    Column("charged_in_won", BigInteger, nullable=False),  # put in since the previous withdrawal
    Column("occurred_at_us", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("decline_code", String(64), nullable=True),
    Column("policy_id", String(ID), nullable=True),
    Column("response", Text, nullable=False),
    Column("recorded_at_us", BigInteger, nullable=False),
    CheckConstraint("amount_won >= 0 AND amount_won <= charged_in_won", name="amount"),
    Index("ix_withdrawals_member", "member_id"),
)

refunds = Table(
    "refunds", metadata,
    Column("refund_id", String(ID), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("payment_id", String(ID), nullable=False),
    Column("amount_won", BigInteger, nullable=False),
    Column("occurred_at_us", BigInteger, nullable=False),
    Column("clawback_won", BigInteger, nullable=False),
    Column("response", Text, nullable=False),
    Column("recorded_at_us", BigInteger, nullable=False),
    Index("ix_refunds_payment", "payment_id"),
)

grant_programs = Table(
    "grant_programs", metadata,
    Column("program_id", String(ID), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("document", Text, nullable=False),
    Column("valid_from_us", BigInteger, nullable=False),
    Column("valid_until_us", BigInteger, nullable=False),
    Column("status", String(16), nullable=False, server_default="open"),
    Column("created_by", String(200), nullable=False),  # an actor, as wide as the others (0010)
    Column("created_at_us", BigInteger, nullable=False),
)

grant_disbursements = Table(
    "grant_disbursements", metadata,
    Column("disbursement_id", String(ID), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("program_id", String(ID), nullable=False),
    Column("member_id", String(ID), nullable=False),
    Column("amount_won", BigInteger, nullable=False),
    Column("response", Text, nullable=False),
    Column("recorded_at_us", BigInteger, nullable=False),
    # Set by the bulk writer (ledger/bulk.py): the batch transaction holding this
    # recipient's credit leg. NULL when the disbursement has a transaction of its own.
    Column("txn_id", BigInteger, nullable=True),
    # Who disbursed it: the key's holder, or the operator of `eum grants disburse` (0009).
    Column("actor", String(200), nullable=True),  # 64 in 0009, 200 since 0010
    Index("ix_grant_disbursements_program", "program_id"),
    Index("ix_grant_disbursements_member", "member_id"),
)

api_keys = Table(
    "api_keys", metadata,
    Column("key_id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("role", String(32), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at_us", BigInteger, nullable=False),
    Column("expires_at_us", BigInteger, nullable=True),
    Column("revoked_at_us", BigInteger, nullable=True),
)

policies = Table(
    "policies", metadata,
    Column("policy_id", String(ID), primary_key=True),
    Column("document", Text, nullable=False),
    Column("status", String(16), nullable=False),  # draft|approved|activated|withdrawn (scheduled/active/superseded: activated, by date)
    Column("origin", String(16), nullable=False),  # file|api
    Column("author", String(200), nullable=False),
    Column("approver", String(200), nullable=True),
    Column("effective_from_us", BigInteger, nullable=True),
    Column("supersedes", String(ID), nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
)

audit_log = Table(
    "audit_log", metadata,
    Column("entry_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at_us", BigInteger, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(64), nullable=False),
    Column("object_type", String(32), nullable=False),
    Column("object_id", String(200), nullable=False),
    Column("detail", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("entry_hash", String(64), nullable=False),
    Column("chain", String(40), nullable=True),  # the kind of link: NULL legacy, "v2", "v2:<key id>" (ledger.audit)
)

corrections = Table(
    "corrections", metadata,
    Column("correction_id", String(ID), primary_key=True),
    Column("wrong_policy_id", String(ID), nullable=False),
    Column("right_policy_id", String(ID), nullable=False),
    Column("from_us", BigInteger, nullable=False),
    Column("to_us", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # proposed|approved|posted|rejected
    Column("author", String(200), nullable=False),
    Column("approver", String(200), nullable=True),
    Column("summary", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    # the highest ledger transaction id the plan saw (0019; NULL before): posting refuses a
    # line whose month has a payment above it that the plan did not take in
    Column("planned_txn_id", BigInteger, nullable=True),
)

# One member-month of a correction; `response` is set when it is posted (and is the
# idempotency record of that posting).
correction_lines = Table(
    "correction_lines", metadata,
    Column("line_id", String(200), primary_key=True),  # correction_id/member_id/month
    Column("correction_id", String(ID), nullable=False),
    Column("member_id", String(ID), nullable=False),
    Column("month", String(7), nullable=False),
    Column("delta_won", BigInteger, nullable=False),
    Column("by_funder", Text, nullable=False),
    Column("by_component", Text, nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("response", Text, nullable=True),
    Column("posted_at_us", BigInteger, nullable=True),
    Index("ix_correction_lines_correction", "correction_id"),
)

# The payments that make up a correction line, each with its own part of the line by
# (component, funder) and the refunded amount the plan saw (migration 0014). Posting the
# line re-bases each payment's cashback on them (`ledger.book.correct_payment`), so a
# later refund claws back what the payment holds after the correction. Lines proposed
# before 0014 have none. `corrections_seen` (migration 0015): how many corrections had
# re-based the payment when it was planned; posting refuses the line if another has
# since (NULL: planned before 0015, not checked). `base` (migration 0017): whether the
# right policy counts the payment toward the month and the balances it earns cashback
# on; posting re-bases the payment's base and its month's eligible spend on them (NULL:
# planned before 0017, the base left as it was).
correction_payments = Table(
    "correction_payments", metadata,
    Column("line_id", String(200), primary_key=True),
    Column("payment_id", String(ID), primary_key=True),
    Column("refunded_won", BigInteger, nullable=False),
    Column("deltas", Text, nullable=False),  # JSON [[component_id, funder, won], ...]
    Column("corrections_seen", Integer, nullable=True),
    Column("base", Text, nullable=True),  # JSON {"counts_toward_month": bool, "cashback_on": [balance, ...]}
    Index("ix_correction_payments_payment", "payment_id"),
)
