"""The bulk grant writer: many disbursements of one program in one ledger transaction.

`Book.execute` posts a disbursement as a transaction of its own (one credit leg on the
member's grant lot, one debit leg per funder), which at ~3-4 legs and a sealed
transaction per recipient is what made a million recipients take minutes. Here a chunk
of up to `CHUNK_ROWS_MAX` recipients of one program is one database transaction holding
ONE ledger transaction (kind `grant`, no single member):

    Dr grantfund/{program}/{source}   Σ over the chunk of each row's floored share
    Cr member/{id}/grant/{program}    each recipient's amount (one leg per recipient)

plus one `grant_disbursements` row per recipient naming that `txn_id` (its idempotency
record and stored answer, exactly as the book writes it). What stays exactly as before:

- each row's funding split is `split_floor(amount, funding, remainder_to)`, the same
  function the book uses, summed per funder: the funder legs equal the per-row book
  legs' totals to the won;
- idempotency per `disbursement_id`: rows are read back after the members are locked;
  the same id and request hash is a replay, another hash a conflict; the primary key
  refuses a racing duplicate (the chunk is then read again and the row replays);
- the database guards hold unchanged: legs first, then the sealing `ledger_txns` row
  (balanced, `leg_count` legs), append-only; deferred foreign keys to the accounts and
  to the seal; account balances move by the legs' sum in the same transaction;
- lock order is the book's: members (sorted, `FOR UPDATE` on PostgreSQL; SQLite's
  `BEGIN IMMEDIATE`), then the shared accounts (sorted: the program's fund accounts),
  taken by the chunk's last statement; the members' lots, which only the holder of
  their member writes, before the chunk's rows;
- a recipient appears at most once per chunk (the caller starts a new chunk when a
  member or id repeats), so a member's history shows one item per disbursement.

Readers that need the member of a bulk leg get it from the account name
(`member/{id}/grant/{program}`) or from `grant_disbursements.member_id`/`txn_id`:
`ledger.queries.member_transactions` and settlement's grant flows do.

PostgreSQL: reads are three statements with arrays; writes are one multi-row statement
per table (`unnest` of array literals, as `ledger/pgstore.py`), so each statement-level
guard fires once per chunk. SQLite: `executemany` inside the chunk's one transaction.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import orjson
import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from ledger import accounts as acct
from ledger import audit, pgstore
from ledger.db import error_kind
from ledger.errors import (AlreadyDisbursed, AmountNotComputable, DistrictMismatch, EumError, IdempotencyConflict,
                           MemberNotFound, ProgramClosed, ProgramNotFound, Unavailable)
from ledger.book import program_statuses
from ledger.programs import ProgramCache
from rules.evaluate import split_floor
from rules.grants import district_mismatch
from rules.timeutil import local_date, rfc3339

log = structlog.get_logger("ledger.bulk")

CHUNK_ROWS_MAX = 10_000  # legs per transaction = rows + funders; leg_count is a SMALLINT
RETRIES_MAX = 3


@dataclass(frozen=True, slots=True)
class BulkRow:
    line: int
    disbursement_id: str
    member_id: str
    amount_won: int
    request_hash: str
    district: str | None = None  # the district the amount was worked out for, when the rules read one
    # When the rules read a district and the row sent none: the amount for a district (a
    # ValueError says why none), worked out with the registry's district of the member the
    # writer locks, as one disbursement takes it; `amount_won` is 0 until then.
    amount_for_district: Callable[[str], int] | None = None


@dataclass(frozen=True, slots=True)
class RowOutcome:
    status: str  # disbursed | replayed | error
    error: EumError | None = None
    amount_won: int = 0  # what a disbursed row gave


def now_us() -> int:
    return time.time_ns() // 1000


class BulkGrantWriter:
    def __init__(self, engine: Engine, programs: ProgramCache | None = None):
        self.engine = engine
        self.programs = programs or ProgramCache()
        self.dialect = engine.dialect.name
        # The transaction the chunk being written took, and its time: (txn_id, recorded_at_us).
        self._attempt: tuple[int, int] | None = None

    def write(self, program_id: str, rows: Sequence[BulkRow], occurred_at_us: int,
              actor: str | None = None, upload: dict | None = None) -> list[RowOutcome]:
        """One chunk in one database transaction, its audit entry in it (`upload`: what
        the entry says of the upload it is part of). Members and ids must be unique within
        `rows` (see `chunks`). Transient failures and a racing duplicate id retry."""
        assert len(rows) <= CHUNK_ROWS_MAX
        assert len({r.member_id for r in rows}) == len(rows) == len({r.disbursement_id for r in rows})
        last: Exception | None = None
        unconfirmed: set[tuple[int, int]] = set()  # attempts whose COMMIT may have gone through
        for attempt in range(RETRIES_MAX):
            self._attempt = None
            try:
                with self.engine.begin() as conn:
                    return self._chunk(conn, program_id, rows, occurred_at_us, actor, upload, unconfirmed)
            except IntegrityError as exc:  # an id committed meanwhile by someone else: read again
                last = exc
                log.info("bulk.integrity_retry", attempt=attempt, error=error_kind(exc))
            except OperationalError as exc:
                last = exc
                if self._attempt is not None:  # the connection may have broken during its COMMIT
                    unconfirmed.add(self._attempt)
                log.warning("bulk.transient_retry", attempt=attempt, error=error_kind(exc))
                time.sleep(0.01 * (attempt + 1))
        raise Unavailable("the book of record could not be written; upload the file again") from last

    # -- one chunk

    def _chunk(self, conn: Connection, program_id: str, rows: Sequence[BulkRow], occurred_at_us: int,
               actor: str | None = None, upload: dict | None = None,
               unconfirmed: set[tuple[int, int]] = frozenset()) -> list[RowOutcome]:
        """`unconfirmed`: this chunk's earlier attempts that failed after writing (the
        connection broken, perhaps during their COMMIT), as (txn_id, recorded_at_us). A
        row found written by one of them is this upload's own, its COMMIT gone through:
        counted as disbursed, with its amount, not as a replay of someone else's (the
        summary and the answer read 0 disbursed, 2 replayed, for an upload's own
        200,002). Its chunk entry was written with it. The time as well as the id: on
        SQLite an attempt rolled back frees its id (max + 1), and another upload of the
        same rows may take it; both then counted the rows as theirs."""
        pg = self.dialect == "postgresql"
        member_ids = sorted({r.member_id for r in rows})
        found = self._lock_members(conn, member_ids, pg)  # member id -> the registry's district
        existing = self._existing(conn, [r.disbursement_id for r in rows], pg)
        self.programs.ensure(conn, {program_id})
        program = self.programs.get(program_id)
        if program is None:
            raise ProgramNotFound(f"no grant program {program_id!r}")
        closed = occurred_at_us >= program.valid_until_us
        # share-locked as the book's disbursements: an expiry waits for this chunk, or it sees the program expired
        expired = program_statuses(conn, {program_id}).get(program_id) == "expired"

        outcomes: list[RowOutcome] = []
        todo: list[BulkRow] = []
        for r in rows:
            prior, prior_txn, prior_recorded, prior_amount = existing.get(r.disbursement_id, (None, None, None, 0))
            if prior is not None:
                if prior == r.request_hash and (prior_txn, prior_recorded) in unconfirmed:
                    outcomes.append(RowOutcome("disbursed", amount_won=prior_amount))
                elif prior != r.request_hash:
                    outcomes.append(RowOutcome("error", IdempotencyConflict(
                        f"disbursement id {r.disbursement_id!r} was used with a different request")))
                else:
                    outcomes.append(RowOutcome("replayed"))
            elif r.member_id not in found:
                outcomes.append(RowOutcome("error", MemberNotFound(f"no member {r.member_id!r}")))
            elif r.district is not None and r.district != found[r.member_id]:
                outcomes.append(RowOutcome("error", DistrictMismatch(district_mismatch(found[r.member_id], r.district))))
            else:
                if r.amount_for_district is not None:  # the registry's district, as one disbursement's
                    try:
                        district = found[r.member_id]
                        r = BulkRow(r.line, r.disbursement_id, r.member_id, r.amount_for_district(district),
                                    r.request_hash, district)
                    except ValueError as error:
                        outcomes.append(RowOutcome("error", AmountNotComputable(str(error))))
                        continue
                if closed or expired:
                    outcomes.append(RowOutcome("error", ProgramClosed(
                        f"grant program {program_id!r} ended {rfc3339(program.valid_until_us)}" if closed else
                        f"grant program {program_id!r} has expired: its unspent money went back to its funders")))
                else:
                    outcomes.append(RowOutcome("disbursed", amount_won=r.amount_won))
                    todo.append(r)
        if not todo:
            return outcomes

        balances = self._balances(conn, sorted({r.member_id for r in todo}), pg)
        if program.once_per_member:  # a lot account of this program: the member has received it before
            had = {r.member_id for r in todo if acct.member_grant(r.member_id, program_id) in balances}
            if had:
                for n, r in enumerate(rows):
                    if r.member_id in had and outcomes[n].status == "disbursed":
                        outcomes[n] = RowOutcome("error", AlreadyDisbursed(
                            f"member {r.member_id!r} has already received {program_id!r}; the program gives "
                            "each member once"))
                todo = [r for r in todo if r.member_id not in had]
                if not todo:
                    return outcomes
        lot_programs = {acct.lot_program(account_id) for account_id in balances} - {None}
        self.programs.ensure(conn, lot_programs)

        # Legs: one credit per recipient, one debit per funder (Σ of each row's floored split).
        funders: dict[str, int] = {}
        for r in todo:
            for source, part in split_floor(r.amount_won, program.funding, program.remainder_to).items():
                if part:
                    funders[source] = funders.get(source, 0) + part
        legs = [(acct.member_grant(r.member_id, program_id), -r.amount_won) for r in todo]
        legs += [(acct.grant_fund(program_id, source), amount) for source, amount in sorted(funders.items())]
        total = sum(r.amount_won for r in todo)
        assert sum(funders.values()) == total and sum(v for _, v in legs) == 0, "unbalanced bulk disbursement"

        recorded = now_us()
        txn_id = self._txn_id(conn, pg)
        self._attempt = (txn_id, recorded)
        new_lots = [(account_id, amount) for account_id, amount in legs[:len(todo)] if account_id not in balances]
        moved = {account_id: acct.natural_delta(account_id, amount) for account_id, amount in legs
                 if account_id in balances or account_id.startswith("grantfund/")}
        by_member: dict[str, dict[str, int]] = {}
        for account_id, balance in balances.items():
            _, member_id, tail = account_id.split("/", 2)
            by_member.setdefault(member_id, {})[tail] = balance
        responses = [self._response(r, program_id, by_member.get(r.member_id, {})) for r in todo]
        txn = (txn_id, "grant", _ref(todo), None, None, occurred_at_us, local_date(occurred_at_us).isoformat(),
               recorded, len(legs), f"bulk: {len(todo)} disbursements of {program_id}")
        disbursements = [(r.disbursement_id, r.request_hash, program_id, r.member_id, r.amount_won, response,
                          recorded, txn_id, actor) for r, response in zip(todo, responses)]
        if pg:
            self._write_pg(conn, txn, legs, new_lots, moved, disbursements)
        else:
            self._write_sqlite(conn, txn, legs, new_lots, moved, disbursements)
        # In the chunk's transaction, after its row locks: the chunk's money has its entry
        # even if the upload stops before its last chunk (its summary is written after it).
        audit.append(conn, at_us=recorded, actor=actor or "unknown", action="grant_program.disburse_chunk",
                     object_type="grant_program", object_id=program_id,
                     detail={"txn_id": txn_id, "disbursed": len(todo), "amount_won": total, **(upload or {})})
        return outcomes

    def _response(self, r: BulkRow, program_id: str, held: dict[str, int]) -> str:
        """The answer the book would have stored: the member's balances after the row.
        `held`: the member's accounts before it, by their tail (charged, points, grant/P)."""
        lots = {program_id: r.amount_won}
        charged, points = held.get("charged", 0), held.get("points", 0)
        for tail, balance in held.items():
            if tail.startswith("grant/"):
                lot = tail[len("grant/"):]
                lots[lot] = lots.get(lot, 0) + balance
        grants = []
        for lot in sorted(lots):
            if lots[lot] > 0:
                facts = self.programs.get(lot)
                grants.append({"program_id": lot, "amount": lots[lot],
                               "expires_at": rfc3339(facts.valid_until_us) if facts else None})
        body = {"disbursement_id": r.disbursement_id, "program_id": program_id, "member_id": r.member_id,
                "amount": r.amount_won, "status": "disbursed",
                "balances": {"charged": charged, "points": points, "grants": grants}}
        return orjson.dumps(body).decode()

    # -- reads

    def _lock_members(self, conn: Connection, member_ids: list[str], pg: bool) -> dict[str, str]:
        """The members named, locked: id -> the registry's district."""
        if pg:
            with pgstore.translated_errors(pgstore.SQL_LOCK_MEMBERS):
                cur = pgstore.driver(conn).execute(pgstore.SQL_LOCK_MEMBERS, (pgstore._text_array(member_ids),))
                return {row[0]: row[1] for row in cur.fetchall()}
        out: dict[str, str] = {}
        for i in range(0, len(member_ids), 900):  # SQLite's bound-parameter limit
            part = member_ids[i:i + 900]
            out.update(conn.exec_driver_sql(
                f"SELECT member_id, district FROM members WHERE member_id IN ({','.join('?' * len(part))})",
                tuple(part)).all())
        return out

    def _existing(self, conn: Connection, ids: list[str], pg: bool) -> dict[str, tuple[str, int, int, int]]:
        """disbursement_id -> (request_hash, txn_id, recorded_at_us, amount_won) of those written."""
        columns = "disbursement_id, request_hash, txn_id, recorded_at_us, amount_won"
        sql = f"SELECT {columns} FROM grant_disbursements WHERE disbursement_id = ANY(%s::text[])"
        if pg:
            with pgstore.translated_errors(sql):
                rows = pgstore.driver(conn).execute(sql, (pgstore._text_array(ids),)).fetchall()
            return {row[0]: tuple(row[1:]) for row in rows}
        out: dict[str, tuple[str, int, int, int]] = {}
        for i in range(0, len(ids), 900):
            part = ids[i:i + 900]
            out.update((row[0], tuple(row[1:])) for row in conn.exec_driver_sql(
                f"SELECT {columns} FROM grant_disbursements "
                f"WHERE disbursement_id IN ({','.join('?' * len(part))})", tuple(part)).all())
        return out

    def _balances(self, conn: Connection, member_ids: list[str], pg: bool) -> dict[str, int]:
        """Every account of these members: account_id -> balance (for the stored answers,
        and to know which grant lots exist already)."""
        if pg:
            with pgstore.translated_errors(pgstore.SQL_BALANCES):
                rows = pgstore.driver(conn).execute(pgstore.SQL_BALANCES, (pgstore._text_array(member_ids),)).fetchall()
            return {account_id: balance for account_id, _, balance in rows}
        out: dict[str, int] = {}
        for i in range(0, len(member_ids), 900):
            part = member_ids[i:i + 900]
            out.update(conn.exec_driver_sql(
                f"SELECT account_id, balance_won FROM accounts WHERE owner_id IN ({','.join('?' * len(part))})",
                tuple(part)).all())
        return out

    def _txn_id(self, conn: Connection, pg: bool) -> int:
        if pg:
            return conn.exec_driver_sql("SELECT nextval('ledger_txn_id_seq')").scalar_one()
        # SQLite: BEGIN IMMEDIATE holds the only write lock, so max+1 is ours.
        return conn.exec_driver_sql("SELECT coalesce(max(txn_id), 0) + 1 FROM ledger_txns").scalar_one()

    # -- writes

    def _write_pg(self, conn: Connection, txn: tuple, legs: list, new_lots: list, moved: dict,
                  disbursements: list) -> None:
        d = pgstore.driver(conn)
        txn_id = txn[0]
        fund_rows = sorted(a for a in moved if a.startswith("grantfund/"))
        with pgstore.translated_errors("bulk disbursement"):
            with d.pipeline():
                if fund_rows:
                    d.execute(pgstore.SQL_ENSURE_ACCOUNTS, pgstore.ensure_accounts_params(fund_rows))
                if new_lots:  # new grant lots are created with their balance: the legs below move them
                    ids = sorted(a for a, _ in new_lots)
                    amount = dict(new_lots)
                    d.execute(
                        "INSERT INTO accounts (account_id, type, owner_id, balance_won, floor_zero) "
                        "SELECT a, 'liability', o, b, true FROM unnest(%s::text[], %s::text[], %s::int8[]) AS v(a, o, b)",
                        (pgstore._text_array(ids), pgstore._text_array([a.split("/", 2)[1] for a in ids]),
                         pgstore._int_array([-amount[a] for a in ids])))
                # The members' lots first: only this chunk (holding their members) writes
                # them. The program's fund accounts, which online disbursements of the
                # program also move, are taken last, after the chunk's rows, so they are
                # held for their own statement and the COMMIT only (as `pgstore.write_batch`).
                own, shared = pgstore.split_member_accounts(sorted(moved.items()))
                if own:
                    d.execute(pgstore.SQL_MOVE_ACCOUNTS, (pgstore._text_array([a for a, _ in own]),
                                                          pgstore._int_array([v for _, v in own])))
                d.execute(
                    "INSERT INTO ledger_legs (txn_id, leg_no, account_id, amount_won) "
                    "SELECT %s::int8, n - 1, a, v FROM unnest(%s::text[], %s::int8[]) WITH ORDINALITY AS u(a, v, n)",
                    (txn_id, pgstore._text_array([a for a, _ in legs]), pgstore._int_array([v for _, v in legs])))
                d.execute(
                    "INSERT INTO ledger_txns (txn_id, kind, ref, member_id, merchant_id, occurred_at_us, business_date, "
                    "recorded_at_us, leg_count, memo) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", txn)
                columns = list(zip(*disbursements))
                d.execute(
                    "INSERT INTO grant_disbursements (disbursement_id, request_hash, program_id, member_id, amount_won, "
                    "response, recorded_at_us, txn_id, actor) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], "
                    "%s::text[], %s::int8[], %s::text[], %s::int8[], %s::int8[], %s::text[])",
                    (pgstore._text_array(columns[0]), pgstore._text_array(columns[1]), pgstore._text_array(columns[2]),
                     pgstore._text_array(columns[3]), pgstore._int_array(columns[4]), pgstore._text_array(columns[5]),
                     pgstore._int_array(columns[6]), pgstore._int_array(columns[7]), pgstore._text_array(columns[8])))
                if shared:
                    ids = pgstore._text_array([a for a, _ in shared])
                    d.execute(pgstore.SQL_LOCK_ACCOUNTS, (ids,))
                    d.execute(pgstore.SQL_MOVE_ACCOUNTS, (ids, pgstore._int_array([v for _, v in shared])))

    def _write_sqlite(self, conn: Connection, txn: tuple, legs: list, new_lots: list, moved: dict,
                      disbursements: list) -> None:
        txn_id = txn[0]
        fund_rows = sorted(a for a in moved if a.startswith("grantfund/"))
        if fund_rows:
            conn.exec_driver_sql("INSERT OR IGNORE INTO accounts (account_id, type, owner_id, balance_won, floor_zero) "
                                 "VALUES (?, ?, NULL, 0, ?)", [(a, *acct.account_type(a)) for a in fund_rows])
        if new_lots:
            conn.exec_driver_sql("INSERT INTO accounts (account_id, type, owner_id, balance_won, floor_zero) "
                                 "VALUES (?, 'liability', ?, ?, 1)",
                                 [(a, a.split("/", 2)[1], -v) for a, v in sorted(new_lots)])
        if moved:
            conn.exec_driver_sql("UPDATE accounts SET balance_won = balance_won + ? WHERE account_id = ?",
                                 [(moved[a], a) for a in sorted(moved)])
        conn.exec_driver_sql("INSERT INTO ledger_legs (txn_id, leg_no, account_id, amount_won) VALUES (?, ?, ?, ?)",
                             [(txn_id, n, a, v) for n, (a, v) in enumerate(legs)])
        conn.exec_driver_sql("INSERT INTO ledger_txns (txn_id, kind, ref, member_id, merchant_id, occurred_at_us, "
                             "business_date, recorded_at_us, leg_count, memo) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             txn)
        conn.exec_driver_sql("INSERT INTO grant_disbursements (disbursement_id, request_hash, program_id, member_id, "
                             "amount_won, response, recorded_at_us, txn_id, actor) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             disbursements)


def _ref(rows: Sequence[BulkRow]) -> str:
    """The batch transaction's ref: `bulk:` and a digest of its disbursement ids."""
    digest = hashlib.sha256("\n".join(r.disbursement_id for r in rows).encode()).hexdigest()[:32]
    return f"bulk:{digest}"


def chunks(rows: Sequence[BulkRow], size: int = CHUNK_ROWS_MAX) -> list[list[BulkRow]]:
    """Chunks of at most `size` rows in which no member and no id repeats, and in which a
    row sharing a member or an id with an earlier row of `rows` comes in a later chunk
    (where it meets that row as recorded). Rows are laid in rounds: a row goes to the round
    after the last one its member or id was given in, and each round is cut into chunks in
    the file's order. So one member's rows, and one id's, keep their order, and a file
    where 2% of the rows repeat a member is two rounds, not a new chunk at each repeat
    (which made such a file ~7x slower to disburse)."""
    rounds: list[list[BulkRow]] = []
    member_round: dict[str, int] = {}
    id_round: dict[str, int] = {}
    for r in rows:
        n = max(member_round.get(r.member_id, -1), id_round.get(r.disbursement_id, -1)) + 1
        member_round[r.member_id] = id_round[r.disbursement_id] = n
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(r)
    return [laid[i:i + size] for laid in rounds for i in range(0, len(laid), size)]
