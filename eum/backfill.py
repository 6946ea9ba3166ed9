"""A file of payments for the bulk payment writer (`eum payments replay FILE`): a
backfill, or the card app's payments of a period the book missed.

Two formats, told apart by the first character that is not white space:
- JSON lines (`{`): one `POST /v1/payments` body per line (a line ends at a newline),
  exactly as the card app sends it (strict: the amount a JSON integer, the time RFC 3339
  with its offset).
- CSV (anything else): a header naming `payment_id`, `member_id`, `merchant_id`,
  `amount` (or `amount_won`) and `occurred_at`, in any order and any case; other columns
  are refused, so that a misspelt one is an error, not a silent default. The amount is
  whole won (`12000` or `12,000`); the time RFC 3339 with its offset. UTF-8 (with or
  without a BOM) or CP949, as Korean Excel saves it.

Every line is checked with the API's own body model before anything is recorded; one bad
line refuses the whole file (`Rejected`, with every bad line's number and reason, up to
`ERRORS_SHOWN`). A payment's request fingerprint is the API's, so a payment recorded
from a file and the same payment sent later by the card app are one payment (the second
is answered as a replay), and an id sent with another body is `idempotency_conflict`.

The payments are recorded in order of `occurred_at` (the file's order among equal
times): a member's month bands, monthly cap and wallet are decided in time order, as
the card app's requests would have been."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

from pydantic import ValidationError

from api.cardapp import payment_command
from api.cardfast import may_give_a_key_twice
from api.schemas import AMOUNT_WON_MAX, PaymentIn
from eum.textfiles import BadUpload, decode_text, read_bounded, won_digits
from ledger.commands import Pay
from rules.grants import names_listed
from rules.loader import json_duplicate_keys

# A local file of the operator's, not an upload: a peak day's 1.5 million payments as
# JSON lines are ~210 MB with short ids and ~280 MB with UUID payment and member ids,
# past an upload's 256 MiB.
FILE_BYTES_MAX = 1024 * 1024 * 1024
COLUMNS = ("payment_id", "member_id", "merchant_id", "amount", "occurred_at")
ALIASES = {"amount_won": "amount"}
ERRORS_SHOWN = 50


class Rejected(ValueError):
    """The file was refused; nothing was recorded. `errors`: (line number, reason)."""

    def __init__(self, errors: list[tuple[int, str]], total: int | None = None):
        self.errors = errors[:ERRORS_SHOWN]
        self.total = total if total is not None else len(errors)
        super().__init__(f"{self.total} bad line{'s' if self.total != 1 else ''}; nothing was recorded")


def read_file(path: Path) -> bytes:
    """The file's bytes, refused by its size before they are read (`Rejected`, as
    `read_payments` refuses a file past `FILE_BYTES_MAX`): read whole first, a file larger
    than memory was a MemoryError traceback, and a 2 GB one took ~2.2 GB before its
    refusal."""
    try:
        return read_bounded(path, FILE_BYTES_MAX)
    except BadUpload as error:
        raise Rejected([(1, str(error))]) from None


def read_payments(data: bytes) -> list[Pay]:
    """The file's payments as the API would make them, in order of `occurred_at`."""
    try:
        text, _ = decode_text(data, FILE_BYTES_MAX)
    except BadUpload as error:
        raise Rejected([(error.line or 1, str(error))]) from None
    stripped = text.lstrip()
    if not stripped:
        raise Rejected([(1, "the file holds no payments")])
    # Each line becomes its command at once: a peak day's file is 1.5 million lines, and
    # with every parsed body kept until the end the commands took ~1.6 KB of memory each
    # after parsing, against ~0.4 KB so (300,000 lines, docs/design.md).
    commands, errors = (_json_lines(text) if stripped[0] == "{" else _csv_rows(text))
    if errors:
        raise Rejected(errors)
    if not commands:
        raise Rejected([(1, "the file holds no payments")])
    # `sort` is stable: the file's order among equal times.
    commands.sort(key=lambda command: command.occurred_at_us)
    return commands


def _json_lines(text: str) -> tuple[list[Pay], list[tuple[int, str]]]:
    """Lines end at a newline (a CR before it is JSON's white space), as `wc -l` and
    `sed -n Np` count them: `str.splitlines()` also broke a line at U+2028, U+0085, a
    form feed, \\x1c-\\x1e or a lone CR, so a bad line holding one was counted twice
    and the lines after it named by the wrong numbers."""
    commands, errors = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if may_give_a_key_twice("payment", line.encode()) and (twice := json_duplicate_keys(line)):
            # As POST /v1/payments answers: JSON reads the last of a key given twice.
            errors.append((number, f"{', '.join(twice)}: given twice; only one is read, so which was meant is "
                                   "not known: give each key once"))
            continue
        try:
            commands.append(payment_command(PaymentIn.model_validate_json(line)))
        except ValidationError as error:
            errors.append((number, _reason(error)))
    return commands, errors


def _csv_rows(text: str) -> tuple[list[Pay], list[tuple[int, str]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as error:
        return [], [(1, f"no CSV header: {error}")]
    names = [ALIASES.get(h.strip().lower(), h.strip().lower()) for h in header]
    unknown = [h for h in names if h not in COLUMNS]
    missing = [c for c in COLUMNS if c not in names]
    # Counted once: `names.count` for each name took seconds for a header of 30,000 (the
    # security audit); and a refusal names the first unknown columns (`names_listed`).
    repeated = sorted(h for h, count in Counter(names).items() if count > 1)
    if unknown or missing or repeated:
        parts = ([f"unknown column(s) {names_listed(unknown)}"] if unknown else []) + \
                ([f"missing column(s) {', '.join(missing)}"] if missing else []) + \
                ([f"column(s) named twice: {', '.join(repeated)}"] if repeated else [])
        return [], [(1, "; ".join(parts) + f" (the columns are {', '.join(COLUMNS)})")]
    commands, errors = [], []
    try:
        for row in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                errors.append((number, f"{len(row)} cells where the header has {len(names)}"))
                continue
            values = {name: cell.strip() for name, cell in zip(names, row)}
            amount = values["amount"]
            if (digits := won_digits(amount)) is None:
                errors.append((number, f"amount: {amount!r} is not a whole number of won"))
                continue
            digits = digits.lstrip("0")
            if len(digits) > len(str(AMOUNT_WON_MAX)):  # never int(): past 4,300 digits it raises
                errors.append((number, f"amount: Input should be less than or equal to {AMOUNT_WON_MAX} "
                                       f"(a number of {len(digits)} digits)"))
                continue
            values["amount"] = int(digits or "0")
            try:
                commands.append(payment_command(PaymentIn.model_validate(values)))
            except ValidationError as error:
                errors.append((number, _reason(error)))
    except csv.Error as error:
        errors.append((reader.line_num, f"not CSV: {error}"))
    return commands, errors


def _reason(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())
