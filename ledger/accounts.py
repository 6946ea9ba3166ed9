"""Account names and types of the chart of accounts.

Ids use "/" as separator: caller ids are restricted to `[A-Za-z0-9._:-]`, so no id can
forge another account's name.
"""

from __future__ import annotations

ASSET, LIABILITY, EXPENSE = "asset", "liability", "expense"
DEBIT_NORMAL = frozenset({"asset", "expense"})

OPERATOR_CASH = "operator/cash"  # bank money the operator holds for members' charged balances


def member_charged(member_id: str) -> str:
    return f"member/{member_id}/charged"


def member_points(member_id: str) -> str:
    return f"member/{member_id}/points"


def member_grant(member_id: str, program_id: str) -> str:
    return f"member/{member_id}/grant/{program_id}"


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
