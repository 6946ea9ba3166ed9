"""audit_log.chain: the kind of each entry's link (legacy, v2, or v2 keyed with an HMAC)

Entries before this revision keep their legacy links (NULL): rewriting them would break
every head kept outside the database. New entries use length-prefixed fields, and an
HMAC under `EUM_AUDIT_KEYS` where a key is set (ledger/audit.py). Adding a nullable
column rewrites nothing, and the append-only triggers stay as they are.

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit_log", sa.Column("chain", sa.String(40), nullable=True))


def downgrade() -> None:
    # Entries written since carry links the old verifier cannot recompute: refuse rather
    # than leave a log that no longer verifies.
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM audit_log WHERE chain IS NOT NULL")).scalar():
        raise RuntimeError("audit_log holds v2 links; downgrading below 0011 would leave them unverifiable")
    # Not batch mode: on SQLite that copies the table and loses its append-only triggers.
    op.execute("ALTER TABLE audit_log DROP COLUMN chain")  # SQLite 3.35 and later
