"""merchants.flags: the 상생 flag `winwin` follows `merchant_share_bp`

From this revision a merchant that shares (merchant_share_bp > 0) carries `winwin`, and
one that shares nothing does not (`ledger.registry.merchant_flags`). A merchant `PUT`
with a share and no flag used to earn neither the share nor the district top-up, and a
flag with no share drew the district top-up for a merchant paying nothing itself. This
revision makes the stored rows agree, changing flags only (never a share): it prints the
merchants it changed and sets their `updated_at` to its time. It writes no audit entry:
a migration cannot sign the keyed log (the upgrade's printed output is the record).

Revision ID: 0012
Revises: 0011
"""
import time

import sqlalchemy as sa
from alembic import context, op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

WINWIN = "winwin"


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT merchant_id, flags, merchant_share_bp FROM merchants")).all()
    changed = []
    for merchant_id, flags, share in rows:
        kept = set(f for f in flags.split(",") if f) - {WINWIN}
        if share > 0:
            kept.add(WINWIN)
        fixed = ",".join(sorted(kept))
        if fixed != flags:
            changed.append({"merchant_id": merchant_id, "flags": fixed, "now": time.time_ns() // 1000})
    if changed:
        bind.execute(sa.text("UPDATE merchants SET flags = :flags, updated_at_us = :now "
                             "WHERE merchant_id = :merchant_id"), changed)
        names = ", ".join(c["merchant_id"] for c in changed[:50]) + (" ..." if len(changed) > 50 else "")
        context.config.print_stdout(f"0012: the winwin flag now follows merchant_share_bp; flags changed for "
                                    f"{len(changed)} merchants: {names}")


def downgrade() -> None:
    pass  # the flags stay as they are: every earlier revision reads them the same way
