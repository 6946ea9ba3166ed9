"""Grant programs as evaluation facts, cached per process.

A program's validity, restrictions and funding never change once created (a change is
a new program), so a cached copy cannot go stale; an unknown id is read from the
database, which is how a program created by another worker becomes known."""

from __future__ import annotations

import threading

from sqlalchemy import Connection, select

from ledger import schema as s
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
                            .where(s.grant_programs.c.program_id.in_(missing))).scalars()
        loaded = [GrantProgramDocument.model_validate_json(document).facts() for document in rows]
        with self._lock:
            for facts in loaded:
                self._facts[facts.program_id] = facts
