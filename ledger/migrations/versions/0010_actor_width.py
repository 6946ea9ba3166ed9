"""grant_programs.created_by and grant_disbursements.actor as wide as every other actor

An actor is "holder name (key id)", and key names may be 200 characters; these two
columns held 64, so on PostgreSQL a program created or a grant disbursed by a key with a
long name failed with a 500 (string data right truncation). Widening a varchar does not
rewrite the table on PostgreSQL; SQLite does not enforce the length, so nothing changes
there.

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

COLUMNS = (("grant_programs", "created_by", False), ("grant_disbursements", "actor", True))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=sa.String(200), existing_type=sa.String(64), existing_nullable=nullable)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=sa.String(64), existing_type=sa.String(200), existing_nullable=nullable)
