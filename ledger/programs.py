"""Grant programs as evaluation facts, cached per process.

A program's validity, restrictions and funding never change once created (a change is
a new program), so a cached copy cannot go stale; an unknown id is read from the
database, which is how a program created by another worker becomes known.

Only approved programs are loaded: a `draft` (created, not yet approved by a second
person: ledger.registry.approve_grant_program) is unknown to the book, so no path can
move its money; the API names it with 409 `grant_program_not_approved` first."""

from __future__ import annotations

import threading

from sqlalchemy import Connection, select

from ledger import schema as s
from ledger.errors import Conflict, ProgramNotFound, SelfApproval
from rules.facts import GrantProgramFacts
from rules.grants import GrantProgramDocument


class ProgramCache:
    def __init__(self) -> None:
        self._facts: dict[str, GrantProgramFacts] = {}
        self._lock = threading.Lock()

    def get(self, program_id: str) -> GrantProgramFacts | None:
        """From the cache only; `ensure` first within the transaction that needs it."""
        return self._facts.get(program_id)

    def ensure(self, conn: Connection, program_ids: set[str]) -> None:
        missing = [p for p in program_ids if p not in self._facts]
        if not missing:
            return
        rows = conn.execute(select(s.grant_programs.c.document)
                            .where(s.grant_programs.c.program_id.in_(missing))
                            .where(s.grant_programs.c.status != "draft")).scalars()
        loaded = [GrantProgramDocument.model_validate_json(document).facts() for document in rows]
        with self._lock:
            for facts in loaded:
                self._facts[facts.program_id] = facts


class ProgramNotApproved(Conflict):
    code, title = "grant_program_not_approved", "The grant program awaits a second person's approval"


class ProgramStateConflict(Conflict):
    code, title = "grant_program_state_conflict", "The grant program is not in a state that allows this"


class ProgramSelfApproval(SelfApproval):
    """The creator of a grant program cannot approve it."""


def require_approved(conn: Connection, program_id: str) -> str:
    """The program's status, when it exists and has been approved; else the error that says why."""
    status = conn.execute(select(s.grant_programs.c.status)
                          .where(s.grant_programs.c.program_id == program_id)).scalar_one_or_none()
    if status is None:
        raise ProgramNotFound(f"no grant program {program_id!r}")
    if status == "draft":
        raise ProgramNotApproved(f"grant program {program_id!r} is a draft: a policy-approver other than its "
                                 f"creator must approve it (POST /v1/grant-programs/{program_id}/approve)")
    return status
