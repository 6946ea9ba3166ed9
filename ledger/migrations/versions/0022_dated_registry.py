"""merchant_facts, member_facts: the registry's facts dated, one row per change

Corrections and the policy preview re-evaluated past payments on the merchants' and
members' facts as they stood at the time of the re-evaluation: a Ganghwa pharmacy's
payment (15%) whose merchant the registry later moved to Seo-gu was corrected as a
Seo-gu pharmacy's, 3,000 clawed back where the right policy keeps 15% (the review of
2026-12-07). Each registry write that changes a fact a rule reads now appends a
version, valid from the write's time; re-evaluation takes, per payment, the version in
force when the book recorded it (`settlement.simulate`).

Seeded from the rows as they stand, valid from 0: payments recorded before this
revision are judged by the registry as it stands at the upgrade, as before it.
Append-only, as the ledger and the audit log are (a changed fact is a new version).

Revision ID: 0022
Revises: 0021
"""
import sqlalchemy as sa
from alembic import op

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None

TABLES = ("merchant_facts", "member_facts")


def upgrade() -> None:
    op.create_table('merchant_facts',
    sa.Column('merchant_id', sa.String(length=64), nullable=False),
    sa.Column('valid_from_us', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('district', sa.String(length=16), nullable=False),
    sa.Column('category', sa.String(length=64), nullable=False),
    sa.Column('annual_sales_won', sa.BigInteger(), nullable=False),
    sa.Column('registered_from', sa.String(length=10), nullable=False),
    sa.Column('flags', sa.String(length=400), server_default='', nullable=False),
    sa.Column('merchant_share_bp', sa.Integer(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('merchant_id', 'valid_from_us', name=op.f('pk_merchant_facts'))
    )
    op.create_table('member_facts',
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('valid_from_us', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('district', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.PrimaryKeyConstraint('member_id', 'valid_from_us', name=op.f('pk_member_facts'))
    )
    op.execute("INSERT INTO merchant_facts (merchant_id, valid_from_us, district, category, annual_sales_won, "
               "registered_from, flags, merchant_share_bp) SELECT merchant_id, 0, district, category, "
               "annual_sales_won, registered_from, flags, merchant_share_bp FROM merchants")
    op.execute("INSERT INTO member_facts (member_id, valid_from_us, district, status) "
               "SELECT member_id, 0, district, status FROM members")
    bind = op.get_bind()
    for table in TABLES:
        if bind.dialect.name == "postgresql":  # append_only(): migration 0001's guards
            op.execute(f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {table} "
                       "FOR EACH STATEMENT EXECUTE FUNCTION append_only()")
        else:
            for event in ("UPDATE", "DELETE"):
                op.execute(f"CREATE TRIGGER {table}_no_{event.lower()} BEFORE {event} ON {table} "
                           f"BEGIN SELECT RAISE(ABORT, 'registry facts: append-only'); END")


def downgrade() -> None:
    # The rows as they stand stay in `merchants` and `members`; the dates go: upgraded
    # again, every payment recorded until then is judged by the registry as it stands.
    for table in TABLES:
        op.drop_table(table)
