"""correction_payments.corrections_seen: how many corrections a payment had when planned

The same correction could be posted twice: two proposals of one range with the same
wrong and right policy (two staff at once, or the same correction proposed again after
the first was posted) each planned right − wrong on every payment, and both posted in
full, cutting the member's cashback twice. From this revision a plan moves a payment an
earlier correction re-based from what it holds to what the right policy gives, and
records per payment how many corrections had re-based it then (`corrections_seen`, the
length of its refund state's `corrected.lines`). Posting refuses a line one of whose
payments has been corrected since (`payment_corrected_since_planned`): its plan is
stale, and a new proposal corrects the rest (docs/design.md, "Corrections").

Rows planned before this revision have NULL there and post as before.

Revision ID: 0015
Revises: 0014
"""
import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('correction_payments') as batch:
        batch.add_column(sa.Column('corrections_seen', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('correction_payments') as batch:
        batch.drop_column('corrections_seen')
