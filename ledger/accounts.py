"""Account names and types of the chart of accounts.

Ids use "/" as separator: caller ids are restricted to `[A-Za-z0-9._:-]`, so no id can
forge another account's name.
"""

from __future__ import annotations

ASSET, LIABILITY, EXPENSE = "asset", "liability", "expense"
DEBIT_NORMAL = frozenset({"asset", "expense"})

# A member's own accounts (charged money, points, grant lots) begin so; only a
# transaction holding the member's row writes them (`pgstore.split_member_accounts`).
MEMBER_PREFIX = "member/"
OPERATOR_CASH = "operator/cash"  # bank money the operator holds for members' charged balances


def member_charged(member_id: str) -> str:
    return f"member/{member_id}/charged"


def member_points(member_id: str) -> str:
    return f"member/{member_id}/points"


def member_grant(member_id: str, program_id: str) -> str:
    return f"member/{member_id}/grant/{program_id}"


def lot_program(account_id: str) -> str | None:
    """The program of a member's grant lot (`member/{id}/grant/{program}`), else None. By
    the name's parts: a member may be called "grant" (`member/grant/charged` is no lot).
    """
    parts = account_id.split("/")
    return parts[3] if len(parts) == 4 and parts[0] == "member" and parts[2] == "grant" else None


LOT_NAME = r"^member/[^/]+/grant/[^/]+$"  # `lot_program`'s test, as a regular expression


def _like_literal(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def program_lots_sql(account, program_id: str):
    """SQL: `account` is a member's lot of `program_id`, exactly. LIKE alone read a `_` in
    the id as any character (`relief_x` took in `relief-x`'s lots) and, on SQLite, any
    case: the end of the name is compared as well, case and all."""
    from sqlalchemy import and_, func

    suffix = f"/grant/{program_id}"
    return and_(account.like(f"member/%{_like_literal(suffix)}", escape="\\"),
                func.substr(account, func.length(account) - len(suffix) + 1) == suffix)


def program_funds_sql(account, program_id: str):
    """SQL: `account` is one of `program_id`'s fund accounts (`grant_fund`,
    `grant_unspent`), exactly, as `program_lots_sql`."""
    from sqlalchemy import and_, func

    prefix = f"grantfund/{program_id}/"
    return and_(account.like(f"{_like_literal(prefix)}%", escape="\\"),
                func.substr(account, 1, len(prefix)) == prefix)


def merchant_payable(merchant_id: str) -> str:
    return f"merchant/{merchant_id}/payable"


def funder_cashback(source: str, month: str) -> str:
    """Cashback paid by one funder in one month (the budget's book account)."""
    return f"funder/{source}/{month}"


def grant_fund(program_id: str, source: str) -> str:
    """Grant money one funder put into a program, net of what came back."""
    return f"grantfund/{program_id}/{source}"


def grant_unspent(program_id: str, source: str) -> str:
    """A program's unspent money that went to its one named funder (`unspent: {return_to}`),
    whoever's share it was: a credit that may exceed what that funder put in, so not
    floored at zero. The funder's net in the program is this and `grant_fund` together."""
    return f"grantfund/{program_id}/{source}/unspent"


def member_receivable(member_id: str) -> str:
    """Clawback a member could not cover (points and charged money both spent)."""
    return f"receivable/{member_id}"


def account_type(account_id: str) -> tuple[str, bool]:
    """(type, floor_zero) of an account, from its name."""
    head = account_id.split("/", 1)[0]
    if head == "member":
        return LIABILITY, True
    if head == "merchant":
        return LIABILITY, False  # a day of refunds can exceed a day of sales
    if head in ("funder", "grantfund"):
        return EXPENSE, not (head == "grantfund" and account_id.endswith("/unspent"))  # see grant_unspent
    if account_id == OPERATOR_CASH:
        return ASSET, False
    if head == "receivable":
        return ASSET, True
    raise ValueError(f"unknown account {account_id!r}")


def natural_delta(account_id: str, signed_legs_won: int) -> int:
    """Change of an account's balance (normal sign) for a sum of debit-positive legs."""
    kind, _ = account_type(account_id)
    return signed_legs_won if kind in DEBIT_NORMAL else -signed_legs_won
