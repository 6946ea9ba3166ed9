"""audit_log: a new entry must name its chain

Since 0011 every entry this code writes carries `chain` (v2 or v2 keyed). A process of
an older release still running during a rolling deploy wrote legacy links (`chain`
NULL) after the new ones, and a legacy link after a stronger one is a break the verifier
can never clear (`ledger.audit`): a routine upgrade left the auditor's check red for
good. From this revision the database refuses such an insert; the old process's change
rolls back with it (its caller gets an error and retries against a new process).
Stop every process of a release before 0011 before upgrading (README, Upgrading).

Revision ID: 0013
Revises: 0012
"""
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

MESSAGE = "audit log: an entry without chain is from a release before 0011; stop it"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""CREATE FUNCTION audit_log_chain_required() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE EXCEPTION '{MESSAGE}' USING ERRCODE = 'check_violation';
        END $$""")
        op.execute("""CREATE TRIGGER audit_log_chain_required BEFORE INSERT ON audit_log
        FOR EACH ROW WHEN (NEW.chain IS NULL) EXECUTE FUNCTION audit_log_chain_required()""")
    else:
        op.execute(f"""CREATE TRIGGER audit_log_chain_required BEFORE INSERT ON audit_log
        WHEN NEW.chain IS NULL BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_chain_required ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_chain_required()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_chain_required")
