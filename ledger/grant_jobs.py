"""Grant programs in bulk: disbursement from a CSV of recipients, and expiry.

Disbursement goes through the bulk writer (`ledger/bulk.py`: one ledger transaction
per chunk of up to 10,000 recipients, one credit leg each, one debit leg per funder);
expiry through the book in batches. Both take the book's locks in the book's order and
keep its invariant; both are idempotent (per row, and by state)."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import structlog
from sqlalchemy import Connection, Engine, select

import ledger.book

from eum.textfiles import decode_text, won_digits
from ledger import accounts as acct
from ledger import audit
from ledger import schema as s
from ledger.book import Book
from ledger.bulk import CHUNK_ROWS_MAX, BulkGrantWriter, BulkRow, chunks
from ledger.commands import FUTURE_SKEW_S, FUTURE_SKEW_US, ExpireLot, request_hash
from ledger.errors import OccurredInFuture, ProgramNotExpired, ProgramNotFound
from rules.document import CALLER_ID_PATTERN
from rules.grants import ATTRIBUTE_INT_MAX, INT_ATTRIBUTES, GrantProgramDocument, check_attributes
from rules.timeutil import rfc3339

log = structlog.get_logger("grants")

BATCH_SIZE_MAX = 2_000  # expiry: lots per book batch
ROWS_MAX = 5_000_000
ERRORS_KEPT_MAX = 10_000


@dataclass
class BulkReport:
    rows: int = 0
    disbursed: int = 0
    replayed: int = 0
    amount_won: int = 0
    errors: list[dict] = field(default_factory=list)
    error_count: int = 0
    seconds: float = 0.0

    def error(self, line: int, disbursement_id: str | None, reason: str) -> None:
        self.error_count += 1
        if len(self.errors) < ERRORS_KEPT_MAX:
            self.errors.append({"line": line, "disbursement_id": disbursement_id, "error": reason})

    def as_dict(self) -> dict:
        # By line: a file's rows refused as it is read come before those its chunks refuse
        # (a member already given, unknown or of another district), and the list read
        # lines 5, 6, 2, 3, 4 for an officer mending the file top to bottom.
        errors = sorted(self.errors, key=lambda e: e["line"])  # stable: a line's own order kept
        return {"rows": self.rows, "disbursed": self.disbursed, "replayed": self.replayed,
                "amount": self.amount_won, "errors": errors, "error_count": self.error_count,
                "seconds": round(self.seconds, 3)}


def load_program(conn: Connection, program_id: str) -> GrantProgramDocument:
    from ledger.programs import require_approved

    require_approved(conn, program_id)  # 404, or 409 for a draft: no money moves before approval
    text = conn.execute(select(s.grant_programs.c.document)
                        .where(s.grant_programs.c.program_id == program_id)).scalar_one_or_none()
    if text is None:
        raise ProgramNotFound(f"no grant program {program_id!r}")
    return GrantProgramDocument.model_validate_json(text)


COLUMNS = ("disbursement_id", "member_id", "amount")  # besides district and the attributes the rules read


def _rows(text: str, program: GrantProgramDocument) -> Iterator[tuple[int, dict]]:
    # newline="": the csv module reads CR, LF and CRLF line ends itself (a bare CR in a file
    # of LF or CRLF lines is refused first, `_check_csv`).
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        names = [name.strip() for name in reader.fieldnames or ()]  # as every row's keys are read
        if "disbursement_id" not in names or "member_id" not in names:
            raise ValueError("the CSV needs a header with at least disbursement_id and member_id "
                             "(and amount, or the attributes the program's amount rules read)")
        if twice := sorted(name for name, count in Counter(names).items() if count > 1):
            # A row would read one of them and drop the other: which was meant is not known.
            # (Counted once: `names.count` for each name took seconds for 20,000 columns, and
            # minutes for a header of 100,000 under 1 MB, the security audit.)
            raise ValueError(f"column(s) named twice in the header: {', '.join(twice)}")
        # A column the rules do not read would be dropped from every row (`income_stauts`, a
        # typo, was paid the rules' fallback amount): the file is refused before any row.
        program.check_attribute_names(names, COLUMNS)
        for count, row in enumerate(reader, start=1):
            if count > ROWS_MAX:
                raise ValueError(f"more than {ROWS_MAX} rows; split the file")
            # Fields past the header's come under no name (None): kept so the row is refused.
            # The row's line in the file (its last, for a quoted field over several lines):
            # the reader skips blank lines, so a count of rows would name the wrong one.
            yield reader.line_num, {(k.strip() if k is not None else None): (v if k is None else (v or "").strip())
                          for k, v in row.items()}
    except csv.Error as error:
        raise ValueError(f"line {reader.line_num + 1}: not CSV ({error})") from None


def member_districts(conn: Connection, member_ids: list[str]) -> dict[str, str]:
    """The registry's district of each member named (those it knows)."""
    m = s.members
    return dict(conn.execute(select(m.c.member_id, m.c.district).where(m.c.member_id.in_(member_ids))).all())


_ID = re.compile(CALLER_ID_PATTERN)


def _bulk_row(program: GrantProgramDocument, reads_district: bool, line: int, row: dict, sent_at_us: int | None
             ) -> BulkRow:
    """The disbursement a row asks for. Its amount is worked out here from what it sends,
    or, when the rules read a district and the row sends none, by the writer from the
    registry's district of the member it locks (as one disbursement takes it). A
    ValueError says what is wrong with the row."""
    disbursement_id, member_id = row.get("disbursement_id", ""), row.get("member_id", "")
    if None in row:  # which member or amount the extra fields meant is not known
        raise ValueError(f"{len(row[None])} more fields than the header has columns")
    if not all(len(v) <= 64 and _ID.fullmatch(v) for v in (disbursement_id, member_id)):  # api.schemas.CallerId
        raise ValueError("disbursement_id and member_id are required: 1-64 letters, digits, and . _ : -")
    attributes: dict[str, object] = {}
    for key, value in row.items():
        if key in COLUMNS or value == "":
            continue
        if key in INT_ATTRIBUTES:
            if not value.isdigit() or not value.isascii():
                raise ValueError(f"{key} must be a whole number, not {_shown(value)!r}")
            if len(value.lstrip("0")) > 18:  # int() of more than 4,300 digits raises Python's own message
                raise ValueError(f"attribute {key!r} must be a whole number from 0 to {ATTRIBUTE_INT_MAX:,}, "
                                 f"not {_shown(value)!r}")
            attributes[key] = int(value)
        else:
            # NFC: a file saved on macOS holds its Hangul decomposed (NFD), and "일반" so
            # was no status the rules name, though it looks the same in the row's error.
            attributes[key] = unicodedata.normalize("NFC", value)
    amount = None
    if row.get("amount"):
        text = row["amount"]
        digits = won_digits(text)  # "100,000" as Korean Excel writes it, read as the clearing file reads it
        # The length first: int() of more than 4,300 digits raises Python's own message.
        if not (digits is not None and len(digits.lstrip("0")) <= 13 and 1 <= int(digits) <= 10**12):
            raise ValueError(f"amount must be a whole number of won from 1 to 10^12, not {_shown(text)!r}")
        amount = int(digits)
    fingerprint = disbursement_fingerprint(program.program_id, member_id, amount, attributes, sent_at_us)
    if not reads_district:
        return BulkRow(line, disbursement_id, member_id, program.disbursement_amount(amount, attributes), fingerprint)
    if "district" in attributes or (amount is not None and not attributes):  # as `with_registry_district`
        return BulkRow(line, disbursement_id, member_id, program.disbursement_amount(amount, attributes), fingerprint,
                       attributes.get("district"))
    check_attributes(attributes)  # a bad attribute is the row's error now, not the writer's
    return BulkRow(line, disbursement_id, member_id, 0, fingerprint,
                   amount_for_district=partial(_amount_for_district, program, amount, attributes))


def _amount_for_district(program: GrantProgramDocument, amount: int | None, attributes: dict, district: str) -> int:
    return program.disbursement_amount(amount, {**attributes, "district": district})


def _shown(text: str) -> str:
    """A field as a row's error quotes it: whole, or its start and length when long."""
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def disbursement_fingerprint(program_id: str, member_id: str, amount: int | None, attributes: dict | None,
                             occurred_at_us: int | None) -> str:
    """A disbursement's request as sent, one row of a file or one call alike (the same id
    either way is one disbursement): the amount and time sent, not the amount the rules
    worked out nor the time the service filled in. A resend after the registry moved the
    member is the same request (its answer is what was given); another time or amount under
    the same id is a conflict."""
    return request_hash("disbursement", {"program_id": program_id, "member_id": member_id, "amount": amount,
                                         "attributes": attributes or None, "occurred_at_us": occurred_at_us})


def check_upload(engine: Engine, program_id: str, data: bytes, occurred_at_us: int | None = None,
                 bytes_max: int | None = None) -> tuple[GrantProgramDocument, int, str]:
    """Everything that refuses a recipients' file whole, checked before anything is
    written (a caller checks it before it records new policy files, as `eum grants
    disburse` does): the program (ProgramNotFound, ProgramNotApproved), a time ahead of the
    book's clock (OccurredInFuture), and the file (a ValueError: not text, no header with
    disbursement_id and member_id, a column named twice or one the rules do not read, a
    line that is not CSV, more than ROWS_MAX rows). Returns the program, the time the
    rows are given at, and the file's text."""
    with engine.connect() as conn:
        program = load_program(conn, program_id)
    now = ledger.book.now_us()  # the clock the book stamps its rows with
    occurred = occurred_at_us or now
    if occurred > now + FUTURE_SKEW_US:  # the book's own check of each event, made for the whole file first
        raise OccurredInFuture(f"occurred_at {rfc3339(occurred)} is more than {FUTURE_SKEW_S} s ahead of the book's "
                               f"clock ({rfc3339(now)}); nothing was recorded")
    text = decode_text(data, bytes_max)[0]
    next(_rows(text, program), None)  # the header (and the first row's CSV) refuse the file whole
    _check_csv(text)
    return program, occurred, text


def _check_csv(text: str) -> None:
    """The whole file read as CSV before anything is written: a line that is not CSV (a
    field over the csv module's limit), a carriage return not ending a line in a file of
    LF or CRLF lines, or a row past ROWS_MAX refuses the file whole (a ValueError naming
    the line), as its header does. (Read as it was written, one chunk at a time, such a
    line came after the chunks before it had paid: the API answered 422 "cannot be read"
    with 4 rows, 450,007 won, paid and no summary entry. And the csv module ends a
    record at a bare CR: `c1,m1,7<CR>7777` was paid 7 won.) A file of CR line ends
    alone (an old Mac's) is read as it is. Rows are counted as `_rows` counts them:
    blank lines are none."""
    if "\n" in text and (bare := re.search("\r(?!\n)", text)) is not None:
        raise ValueError(f"line {text.count(chr(10), 0, bare.start()) + 1}: a carriage return (CR) inside the "
                         "line: lines end with LF or CRLF")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = sum(1 for row in reader if row) - 1  # the header
    except csv.Error as error:  # (the line it was reading: counted already)
        raise ValueError(f"line {reader.line_num}: not CSV ({error})") from None
    if rows > ROWS_MAX:
        raise ValueError(f"more than {ROWS_MAX} rows; split the file")


def bulk_disburse(book: Book, engine: Engine, program_id: str, data: bytes,
                  occurred_at_us: int | None = None, progress=None, actor: str | None = None,
                  bytes_max: int | None = None, on_behalf_of: str | None = None) -> BulkReport:
    """Disburse every row; a bad row is reported with its line and does not stop the rest.
    `engine` reads the program; the book's engine and program cache write; every row
    records `actor` as who disbursed it. `bytes_max`: the caller's file limit (the API's
    EUM_UPLOAD_BYTES_MAX, the command line's own); by default an upload's. An
    `occurred_at_us` more than FUTURE_SKEW_S ahead of the book's clock refuses the whole
    file (OccurredInFuture) before anything is written, as the book refuses one event.
    `on_behalf_of`: whom the command line says it ran for, a detail of the audit entry
    (never its actor)."""
    started = time.perf_counter()
    report = BulkReport()
    program, occurred, text = check_upload(engine, program_id, data, occurred_at_us, bytes_max)
    with book.engine.connect() as conn:
        audit.check_appendable(conn)  # the entries are written with the chunks: one that cannot sign pays nothing
    writer = BulkGrantWriter(book.engine, book.programs)
    pending: list[BulkRow] = []
    # What each chunk's audit entry and the upload's summary say of the upload.
    upload = {"file_sha256": hashlib.sha256(data).hexdigest(),
              **({"on_behalf_of": on_behalf_of} if on_behalf_of else {})}

    def flush() -> None:
        refused = []  # a repeat's round comes after the rest: named in the file's order
        for chunk in chunks(pending):
            for row, outcome in zip(chunk, writer.write(program_id, chunk, occurred, actor, upload)):
                if outcome.error is not None:
                    refused.append((row.line, row.disbursement_id, f"{outcome.error.code}: {outcome.error.detail}"))
                elif outcome.status == "replayed":
                    report.replayed += 1
                else:
                    report.disbursed += 1
                    report.amount_won += outcome.amount_won
            if progress is not None:
                progress(len(chunk))
        for line, disbursement_id, reason in sorted(refused, key=lambda e: e[0]):
            report.error(line, disbursement_id, reason)
        pending.clear()

    reads_district = program.reads_district
    for line, row in _rows(text, program):
        report.rows += 1
        try:
            # A district the rules read is the registry's: the writer checks one sent, or
            # works the amount out with it, from the members it locks (no read of its own).
            pending.append(_bulk_row(program, reads_district, line, row, occurred_at_us))
        except (ValueError, TypeError) as error:
            report.error(line, row.get("disbursement_id") or None, str(error))
            continue
        if len(pending) >= CHUNK_ROWS_MAX:
            flush()
    if pending:
        flush()
    report.seconds = time.perf_counter() - started
    with book.engine.begin() as conn:  # who gave how much to how many: the rows name them one by one
        audit.append(conn, at_us=time.time_ns() // 1000, actor=actor or "unknown", action="grant_program.disburse_bulk",
                     object_type="grant_program", object_id=program_id,
                     detail={"rows": report.rows, "disbursed": report.disbursed, "replayed": report.replayed,
                             "amount_won": report.amount_won, "errors": report.error_count,
                             "occurred_at": rfc3339(occurred), **upload})
    return report


def _restore_unless_returned(book: Book, program_id: str, before: str, first: list[ExpireLot],
                             started_us: int, actor: str) -> None:
    """Put the program's status back to `before` if its first batch (`first`) returned
    no lot, as the book shows (audited beside its closing); otherwise, or if the book
    cannot be read, leave it expired (running the expiry again returns the rest)."""
    x, t = s.ledger_txns, s.grant_programs
    try:
        with book.engine.begin() as conn:
            went_back = bool(first) and conn.execute(
                select(x.c.txn_id).where(x.c.kind == "grant_expiry")
                .where(x.c.member_id.in_([c.member_id for c in first]))
                .where(x.c.ref.in_([c.key for c in first])).where(x.c.recorded_at_us >= started_us).limit(1)
            ).first() is not None
            if went_back:
                log.warning("grant_expiry.partly_done", program_id=program_id,
                            detail="lots went back before the failure: the program stays expired; "
                                   "run the expiry again to return the rest")
                return
            if conn.execute(t.update().where((t.c.program_id == program_id) & (t.c.status == "expired"))
                            .values(status=before)).rowcount:
                audit.append(conn, at_us=time.time_ns() // 1000, actor=actor, action="grant_program.reopen",
                             object_type="grant_program", object_id=program_id,
                             detail={"status": before, "reason": "the expiry failed before any lot went back"})
    except Exception as error:  # noqa: BLE001 - the first failure is the one raised
        log.error("grant_expiry.status_left_expired", program_id=program_id, error=f"{type(error).__name__}: {error}"[:300])


def check_expiry(engine: Engine, program_id: str, as_of_us: int | None = None
                 ) -> tuple[GrantProgramDocument, int, int]:
    """What refuses an expiry before anything is written (a caller checks it before it
    records new policy files, as `eum grants expire` does): an unknown program or a draft,
    one that has not ended, an `as_of` ahead of the book's clock. Returns the program, the
    book's clock and the date the lots go back at."""
    with engine.connect() as conn:
        program = load_program(conn, program_id)
    now = ledger.book.now_us()  # the clock the book stamps its rows with
    as_of = as_of_us or min(now, program.valid_until_us)
    if as_of < program.valid_until_us:
        raise ProgramNotExpired(f"grant program {program_id!r} runs until {rfc3339(program.valid_until_us)}")
    if as_of > now + FUTURE_SKEW_US:  # the book's own check of each lot, made before the status changes
        raise OccurredInFuture(f"as_of {rfc3339(as_of)} is more than {FUTURE_SKEW_S} s ahead of the book's clock "
                               f"({rfc3339(now)}); nothing was recorded")
    if now < program.valid_until_us:  # ended now, not only by the date given: an as_of at the end (within
        # the skew ahead) would take back lots the member may still spend until the end
        raise ProgramNotExpired(f"grant program {program_id!r} runs until {rfc3339(program.valid_until_us)} "
                                f"(the book's clock: {rfc3339(now)}); nothing was returned")
    return program, now, as_of


def expire_program(book: Book, engine: Engine, program_id: str, as_of_us: int | None = None,
                   actor: str = "unknown", on_behalf_of: str | None = None) -> dict:
    """Return every unspent lot of an ended program to its funders by their split. With
    no `as_of`, the return is dated when the program ended (its money's business date,
    whenever the job runs), or now if it has not ended (which is refused). A program that
    has not ended by the book's clock is refused whatever the `as_of`. `on_behalf_of`: as
    `bulk_disburse`'s, a detail of the audit entry."""
    a = s.accounts
    program, now, as_of = check_expiry(engine, program_id, as_of_us)
    # Closed first: from this commit no disbursement gets in (they share-lock the program's
    # row and read its status, so this waits for those that read it open), and only then
    # are the lots chosen; a run cut short is run again for the rest.
    t = s.grant_programs
    behalf = {"on_behalf_of": on_behalf_of} if on_behalf_of else {}
    with book.engine.begin() as conn:
        before = conn.execute(select(t.c.status).where(t.c.program_id == program_id)).scalar_one()
        conn.execute(t.update().where(t.c.program_id == program_id).values(status="expired"))
        # Audited with the status change (a process that cannot sign changes nothing), so a
        # run cut short after its first lots went back is on the log; the totals follow.
        audit.append(conn, at_us=time.time_ns() // 1000, actor=actor, action="grant_program.close",
                     object_type="grant_program", object_id=program_id,
                     detail={"status_before": before, "as_of": rfc3339(as_of), **behalf})
    returned: dict[str, int] = {}
    total = lots = batches = 0
    first: list[ExpireLot] = []

    def batch_entry(commands, outcomes) -> dict:
        """What one batch of lots returned, written in its transaction: a run cut short
        (the database gone mid-way) leaves every won it returned in an entry, and the
        entries of a run and of the one that finishes it add up to the whole."""
        done = [o.body for o in outcomes if o.error is None and o.body["returned"]]
        by_funder: dict[str, int] = {}
        for body in done:
            for source, amount in body["returned_by_funder"].items():
                by_funder[source] = by_funder.get(source, 0) + amount
        return {"actor": actor, "action": "grant_program.expire_lots", "object_type": "grant_program",
                "object_id": program_id,
                "detail": {"lots": len(commands), "lots_expired": len(done),
                           "returned": sum(body["returned"] for body in done), "returned_by_funder": by_funder,
                           "as_of": rfc3339(as_of), **behalf}}

    try:
        with engine.connect() as conn:
            members = conn.execute(select(a.c.owner_id).where(acct.program_lots_sql(a.c.account_id, program_id))
                                   .where(a.c.balance_won > 0).order_by(a.c.owner_id)).scalars().all()
        for i in range(0, len(members), BATCH_SIZE_MAX):
            commands = [ExpireLot(program_id, member_id, as_of) for member_id in members[i:i + BATCH_SIZE_MAX]]
            first = first or commands
            outcomes = book.execute(commands, audit_entry=batch_entry)
            batches += 1
            for outcome in outcomes:
                if outcome.error is not None:
                    raise outcome.error
                if outcome.body["returned"]:
                    lots += 1
                    total += outcome.body["returned"]
                    for source, amount in outcome.body["returned_by_funder"].items():
                        returned[source] = returned.get(source, 0) + amount
    except Exception:
        # Nothing went back: the program is as it was. Once a lot went back it stays
        # expired, and running the expiry again returns the rest. The first batch can
        # fail after its COMMIT went through (the connection broke during it), so
        # whether a lot went back is read from the book, not from the failure.
        if not batches and before != "expired":
            _restore_unless_returned(book, program_id, before, first, now, actor)
        raise
    out = {"program_id": program_id, "lots_expired": lots, "returned": total, "returned_by_funder": returned}
    with book.engine.begin() as conn:
        audit.append(conn, at_us=time.time_ns() // 1000, actor=actor, action="grant_program.expire",
                     object_type="grant_program", object_id=program_id,
                     detail={**out, "as_of": rfc3339(as_of), **behalf})
    return out
