"""corrections: proposed, approved and posted corrections of past cashback

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('corrections',
    sa.Column('correction_id', sa.String(length=64), nullable=False),
    sa.Column('wrong_policy_id', sa.String(length=64), nullable=False),
    sa.Column('right_policy_id', sa.String(length=64), nullable=False),
    sa.Column('from_us', sa.BigInteger(), nullable=False),
    sa.Column('to_us', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('approver', sa.String(length=200), nullable=True),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('created_at_us', sa.BigInteger(), nullable=False),
    sa.Column('updated_at_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('correction_id', name=op.f('pk_corrections'))
    )
    op.create_table('correction_lines',
    sa.Column('line_id', sa.String(length=200), nullable=False),
    sa.Column('correction_id', sa.String(length=64), nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('month', sa.String(length=7), nullable=False),
    sa.Column('delta_won', sa.BigInteger(), nullable=False),
    sa.Column('by_funder', sa.Text(), nullable=False),
    sa.Column('by_component', sa.Text(), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('response', sa.Text(), nullable=True),
    sa.Column('posted_at_us', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('line_id', name=op.f('pk_correction_lines'))
    )
    op.create_index('ix_correction_lines_correction', 'correction_lines', ['correction_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_correction_lines_correction', table_name='correction_lines')
    op.drop_table('correction_lines')
    op.drop_table('corrections')
