"""Reconciliation of the card network's clearing file with the book of record.

The clearing file (CSV)
-----------------------
One header line, then one line per cleared transaction; blank lines are skipped. Encoding:
UTF-8, UTF-8 with a BOM, or CP949 (what Korean Excel saves). Lines end in LF, CRLF or CR;
a carriage return in the header line before its end (two kinds of line end, or CR CR LF)
refuses the file. Column names are matched
case-insensitively, in any order, without their whitespace and invisible characters (a
BOM, a zero-width space), NFC; the Korean names are accepted too. Unknown columns are
ignored and named in the facts (`ignored_columns`), but one whose every value is a record
type (승인/취소, P/R), a refund among them, refuses the file: it is the type under another
name (one of purchases alone reads the same ignored: a personal card's P). A line is numbered as the file's physical line it starts on (header = 1).

| column (aliases)                          | required | meaning                                              |
| ----------------------------------------- | -------- | ---------------------------------------------------- |
| approval_id (approval_no, 승인번호)        | yes      | our `payment_id`: 1–64 of [A-Za-z0-9._:-]             |
| merchant_id (가맹점번호, 가맹점ID)          | yes      | the merchant the network cleared it to               |
| amount_won (amount, 금액, 거래금액)         | yes      | whole won, 1..10^12; "12,000" is accepted (commas    |
|                                           |          | group by three: "12000,00" is the line's error)      |
| transacted_at (time, 거래일시)              | yes      | RFC 3339 with offset, as the API takes it (no leap   |
|                                           |          | second), or Seoul local "YYYY-MM-DD HH:MM:SS" (or    |
|                                           |          | with a T) or "YYYYMMDDHHMMSS" (`parse_times`)        |
| record_type (type, 구분)                    | no       | P (purchase, 승인; the default) or R (refund, 취소)   |
| split_seq (분할순번)                        | no       | 1, 2, …: the network split one payment into parts    |
| refund_id (취소번호)                        | no       | our `refund_id`, on R rows only (on a P line: the    |
|                                           |          | line's error)                                        |

Results (each a list of rows, not only counts):
- duplicates: a line identical (type, approval, merchant, amount, time, split_seq,
  refund_id) to an earlier line; reported with the line it repeats, then left out.
  In a file whose header has a split_seq column, the parts of a split carry it: P lines
  of one approval id without it are resends, so the first is matched and each later one
  of the same amount is a duplicate of it (`first_line`) too; one of another amount
  stays in the sum, and the approval is an amount_mismatch (even if the lines add up),
  as is an approval with a line without split_seq beside numbered parts.
  A file without that column: the P lines of an approval id are summed, as parts.
  The R lines naming one refund_id (of one approval id) are treated alike: resends
  (duplicates) or parts; a refund cleared twice is never matched twice.
- matched: the P lines of one approval id (one line, or several split parts whose
  amounts add up) equal the ledger's approved payment within the tolerance.
- amount_mismatch: the same, but the amounts differ by more than the tolerance.
- merchant_mismatch (added): the amounts agree but the merchant differs (P and R lines
  alike: a refund line's merchant is the payment's).
- late (added): what would be matched (P lines by approval id, R lines by refund_id:
  amounts within the tolerance, the merchant the same) but on another Asia/Seoul business
  date than the ledger's payment or refund, or a payment or refund of a date the file
  does not clear: reported here instead of in `matched`, with both times
  (`occurred_at_us` the ledger's, `transacted_at_us` the line's) and both dates
  (`ledger_business_date`, `clearing_business_date`: the line's, or the file's when the
  line is timed on its payment's date). A split whose parts are on
  several dates is late when any part is off the payment's date; its time is its
  earliest part's when that one is off, else its latest's. R lines without a refund_id
  are compared with the refunds of the file's dates, and are never late.
  Every clearing line is in exactly one category (by `lines`, or `line` for duplicates).
- missing_in_ledger: an approval id with no approved payment in the ledger (the reason
  says whether it is unknown or was declined).
- missing_in_clearing: an approved payment of a business date the file covers (the
  Asia/Seoul dates of its lines) that the file does not carry. When the file has a
  record_type column it declares refunds too, and the ledger's refunds of those dates
  must then appear as R lines.
R lines match the ledger's refund with the same refund_id when given, whatever day it
was (late when not of the file's dates); otherwise (the network does not know our refund_id) the R lines of an approval id
are summed against that payment's refunds of the file's business dates that no R line
of that payment names by id: a payment refunded in parts over several days is cleared a
part a day. A refund_id under another approval is missing_in_ledger, and its refund still
to be cleared.
Rows carrying a time in microseconds (`occurred_at_us`, `transacted_at_us`) carry it
beside as RFC 3339 in Seoul too (`occurred_at`, `transacted_at`). Each category has its
columns (CATEGORY_COLUMNS), whatever the file holds.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
from dataclasses import dataclass

import polars as pl
from sqlalchemy import Connection, and_, or_, select

from ledger import schema as s
from eum.textfiles import WON_GROUPED, BadUpload, decode_text, header_key
from ledger.errors import EumError
from rules.timeutil import RFC3339_PATTERN, SPAN_END, SPAN_FIRST, SPAN_TEXT, local_midnight_us, to_us
from settlement.config import SettlementConfig, get_config
from settlement.io import read_frame

AMOUNT_WON_MAX = 10**12
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
LEDGER_ID_CHUNK = 5_000
ALIASES = {
    "approval_id": ("approval_id", "approval_no", "approval", "승인번호"),
    "merchant_id": ("merchant_id", "merchant", "가맹점번호", "가맹점id"),
    "amount_won": ("amount_won", "amount", "금액", "거래금액"),
    "transacted_at": ("transacted_at", "time", "transacted", "거래일시"),
    # Not 거래구분: some files name 일시불/할부 so. Holding 승인/취소 under that name, the
    # column refuses the file naming it (`_refuse_typed_unknown`); else it is ignored.
    "record_type": ("record_type", "type", "구분"),
    "split_seq": ("split_seq", "분할순번"),
    "refund_id": ("refund_id", "취소번호"),
}
REQUIRED = ("approval_id", "merchant_id", "amount_won", "transacted_at")
# Fields a header may have: a network's file carries a few dozen columns. Each ignored
# one costs a pass over its values (`_refuse_typed_unknown`), so a file of one wide
# header line (100,000 short names, under 1 MB) held an upload slot for minutes.
HEADER_FIELDS_MAX = 1_000
RECORD_TYPES = {"P": "P", "R": "R", "승인": "P", "취소": "R", "PURCHASE": "P", "REFUND": "R"}
CLEARING_SCHEMA = {"line": pl.Int64, "record_type": pl.String, "approval_id": pl.String, "merchant_id": pl.String,
                   "amount_won": pl.Int64, "transacted_at_us": pl.Int64, "split_seq": pl.Int64,
                   "refund_id": pl.String}
LEDGER_PAYMENTS_SCHEMA = {"payment_id": pl.String, "merchant_id": pl.String, "amount_won": pl.Int64,
                          "occurred_at_us": pl.Int64, "status": pl.String}
LEDGER_REFUNDS_SCHEMA = {"refund_id": pl.String, "payment_id": pl.String, "amount_won": pl.Int64,
                         "occurred_at_us": pl.Int64}
CATEGORIES = ("matched", "missing_in_ledger", "missing_in_clearing", "amount_mismatch", "duplicates",
              "merchant_mismatch", "late")
# Each category's columns, in order, whatever the file holds (a column that does not apply
# to a row is empty: a P row's refund_id, the ledger's side of a line missing in it).
# RFC 3339 text is added beside each column of microseconds (READABLE_TIMES).
ROW_SCHEMA = {"line": pl.Int64, "first_line": pl.Int64, "record_type": pl.String, "approval_id": pl.String,
              "refund_id": pl.String, "merchant_id": pl.String, "amount_won": pl.Int64,
              "clearing_amount_won": pl.Int64, "ledger_amount_won": pl.Int64, "difference_won": pl.Int64,
              "clearing_rows": pl.Int64, "split": pl.Boolean, "clearing_merchant_id": pl.String,
              "ledger_merchant_id": pl.String, "ledger_refund_ids": pl.List(pl.String), "lines": pl.List(pl.Int64),
              "occurred_at_us": pl.Int64, "transacted_at_us": pl.Int64, "ledger_business_date": pl.String,
              "clearing_business_date": pl.String, "reason": pl.String}
COMPARED_COLUMNS = ("record_type", "approval_id", "refund_id", "clearing_amount_won", "ledger_amount_won",
                    "difference_won", "clearing_rows", "split", "clearing_merchant_id", "ledger_merchant_id",
                    "ledger_refund_ids", "lines")
CATEGORY_COLUMNS = {
    "matched": COMPARED_COLUMNS, "amount_mismatch": COMPARED_COLUMNS, "merchant_mismatch": COMPARED_COLUMNS,
    "late": (*COMPARED_COLUMNS, "occurred_at_us", "transacted_at_us", "ledger_business_date",
             "clearing_business_date"),
    "missing_in_ledger": (*COMPARED_COLUMNS, "reason"),
    "missing_in_clearing": ("record_type", "approval_id", "refund_id", "ledger_amount_won", "ledger_merchant_id",
                            "occurred_at_us"),
    "duplicates": ("line", "first_line", "record_type", "approval_id", "refund_id", "merchant_id", "amount_won",
                   "transacted_at_us", "reason"),
}
# Result columns of integer microseconds, and the RFC 3339 (Seoul) column added beside each.
READABLE_TIMES = {"occurred_at_us": "occurred_at", "transacted_at_us": "transacted_at"}
SEOUL_OFFSET_US = 9 * 3_600_000_000


class ClearingFileInvalid(EumError):
    status, code, title = 422, "clearing_file_invalid", "The clearing file cannot be read"


# ---------------------------------------------------------------- reading the file


def decode(data: bytes, limit: int) -> tuple[str, str]:
    """(text, encoding name): UTF-8 with BOM, UTF-8, or CP949. `limit`: the settlement
    config's clearing_file_bytes_max, not an upload's bound (over HTTP that one has
    answered before the file is read)."""
    try:
        return decode_text(data, limit)
    except BadUpload as bad:
        raise ClearingFileInvalid(str(bad), errors=[{"line": bad.line, "reason": f"bytes that are not {bad.what}"}]
                                  if bad.line else []) from None


DECODE_CHUNK_BYTES = 4 * 1024 * 1024
BOM = b"\xef\xbb\xbf"


def _decodes(data: bytes, encoding: str, out: list[bytes] | None = None) -> bool:
    """Whether `data` is text in `encoding`, read a chunk at a time (no str of the whole
    file: one of 1.5 million lines with a Korean header is two bytes a character, twice
    the file); with `out`, its UTF-8 appended there chunk by chunk."""
    decoder = codecs.getincrementaldecoder(encoding)()
    view = memoryview(data)
    try:
        for start in range(0, len(data), DECODE_CHUNK_BYTES):
            part = decoder.decode(view[start:start + DECODE_CHUNK_BYTES], final=False)
            if out is not None:
                out.append(part.encode("utf-8"))
        part = decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    if out is not None:
        out.append(part.encode("utf-8"))
    return True


def decode_utf8(data: bytes, limit: int) -> tuple[bytes, str, str]:
    """`decode` without the text: (the file's text as UTF-8 bytes, the encoding, the codec
    that reads those bytes back: "utf-8-sig" when they still start with the BOM, which
    polars skips as that codec does). A UTF-8 file is its own bytes (no copy); a CP949 one
    is re-encoded chunk by chunk. A file of neither is refused by `decode`, in its words."""
    if len(data) <= limit:
        if data.startswith(BOM):
            if _decodes(data, "utf-8-sig"):
                return data, "utf-8-sig", "utf-8-sig"
        elif _decodes(data, "utf-8"):
            return data, "utf-8", "utf-8"
        else:
            parts: list[bytes] = []
            if _decodes(data, "cp949", parts):
                return b"".join(parts), "cp949", "utf-8"
    text, encoding = decode(data, limit)  # raises, as it did, in its words
    return text.encode("utf-8"), encoding, "utf-8"


def _canonical(header: list[str]) -> dict[str, str]:
    """Each known header column's canonical name, matched as `header_key` compares names
    (a second BOM, "구 분", a zero-width space: such a 구분 was ignored, and every 취소
    line read as a 승인 one). A name given twice, or under two of its aliases (amount_won
    and 금액), is refused: one would be read and the other dropped, and which the network
    meant is not known."""
    lookup = {header_key(alias): name for name, aliases in ALIASES.items() for alias in aliases}
    out: dict[str, str] = {}
    twice: set[str] = set()
    for column in header:
        name = lookup.get(header_key(column))
        if name is not None:
            if name in out.values():
                twice.add(name)
            out[column] = name
    if twice:
        listed = ", ".join(sorted(twice))
        raise ClearingFileInvalid(f"the header names {listed} more than once (aliases included)",
                                  errors=[{"line": 1, "reason": f"column(s) named twice: {listed}"}])
    return out


def _refuse_typed_unknown(raw: pl.DataFrame, ignored: list[str]) -> None:
    """An ignored column whose every value is a record type, one a refund at least, is
    the file's 구분 under a name this format does not know: ignored, its 취소 lines would
    be read as purchases, nothing saying so. Refused, naming it. (A column of purchases
    alone reads the same ignored, and may be another column's P, a personal card's.)"""
    refunds = [name for name, kind in RECORD_TYPES.items() if kind == "R"]
    present = set(raw.columns)  # once: `raw.columns` is a new list at each call
    for column in dict.fromkeys(ignored):
        if column not in present:
            continue
        values = raw.get_column(column).str.strip_chars().str.to_uppercase()
        given = values.filter(values.is_not_null() & (values != ""))
        if given.len() and given.is_in(list(RECORD_TYPES)).all() and given.is_in(refunds).any():
            raise ClearingFileInvalid(
                f"the header's column {column!r} is no column this format knows, but every value in it is a record "
                "type (승인/취소, P/R): name it record_type (or 구분), or leave it out",
                errors=[{"line": 1, "reason": f"column {column!r}: record types under a name this format does "
                                              "not know"}])


def _fields(count: int, width: int) -> str:
    return f"{count} field{'' if count == 1 else 's'} where the header has {width}"


def _read_records(utf8: bytes, codec: str, header: list[str],
                  limit: int) -> tuple[pl.DataFrame, list[dict], int]:
    """The file's records as text, a column per header name, with `line`: the physical
    line each starts on (header = 1), from the file's text as UTF-8 (`decode_utf8`); the
    first `limit` lines of another count of fields
    than the header's (line, reason), and how many there are: left out of the records,
    listed with the other faults of the file. Blank lines are no records. Polars reads the
    file; where a record starts is its row number while each line is one record, but not
    once a quoted field holds a line end or a blank line gives a row, and it pads a short
    line with empty fields: for such files the csv module says where each record starts
    and how many fields it has (`_lines_by_csv`)."""
    width = len(header)
    if utf8.endswith((b"\n\n", b"\n\r\n")):  # an Excel export ends in blank lines
        utf8 = utf8.rstrip(b"\r\n")
    try:
        raw = pl.read_csv(utf8, infer_schema=False, has_header=True, empty_string_is_null=False,
                          raise_if_empty=False)
    except pl.exceptions.ComputeError:  # a line of more fields than the header has
        raw = None
    # Each line one record (no line end inside a field), and no line short of fields (a
    # blank one among them): every comma of the file is then a separator of a full line or
    # inside a quoted value. Counted on the UTF-8 bytes, ~0.1 s for 1.5 million lines.
    lines = utf8.count(b"\n") + (not utf8.endswith(b"\n"))
    if raw is not None and raw.width == width and raw.height == lines - 1:
        inside = sum(raw.select(pl.all().str.count_matches(",", literal=True).sum()).row(0)) if b'"' in utf8 else 0
        if utf8.count(b",") - sum(name.count(",") for name in header) - inside == (raw.height + 1) * (width - 1):
            return raw.with_columns(pl.int_range(2, raw.height + 2, dtype=pl.Int64).alias("line")), [], 0
    # `utf8` (`decode_utf8`'s) may start with a BOM: no comma, quote or line end, and
    # polars skips it; the csv module reads the text after it, as `codec` gives it.
    return _lines_by_csv(utf8.decode(codec).rstrip("\r\n"), header, limit, raw)


def _lines_by_csv(body: str, header: list[str], limit: int,
                  raw: pl.DataFrame | None) -> tuple[pl.DataFrame, list[dict], int]:
    """`_read_records` for a file polars cannot number: one pass of the csv module, with
    lines split on LF only (as `_read_records` counts them), gives each record's first line
    and its count of fields (~1.5 s for 1.5 million lines). Polars's rows are the records
    (a blank line one of them); without them (polars refused the file) or if the two
    readers disagree on the count, the csv module's rows are."""
    width = len(header)
    reader = csv.reader(line + "\n" for line in body.split("\n"))
    starts, widths, rows, errors, bad = [], [], [], [], 0
    start = 1
    try:
        for row in reader:
            if starts and row and len(row) != width:
                bad += 1
                if len(errors) < limit:
                    errors.append({"line": start, "reason": _fields(len(row), width)})
            starts.append(start)
            widths.append(len(row))
            if raw is None:
                rows.append(row)
            start = reader.line_num + 1
    except csv.Error as error:  # e.g. a bare carriage return inside a field
        errors.append({"line": start, "reason": f"not CSV: {error}"})
        raise ClearingFileInvalid(f"line {start} is not CSV: {error}", errors=errors[-limit:],
                                  invalid_line_count=bad + 1) from None
    records = pl.DataFrame({"line": starts[1:], "fields": widths[1:]}, schema={"line": pl.Int64, "fields": pl.Int64})
    if raw is not None and raw.width == width and raw.height == records.height:
        return raw.with_columns(records["line"]).filter(records["fields"] == width), errors, bad
    if raw is not None:
        return _lines_by_csv(body, header, limit, None)
    index: dict[str, int] = {}
    for i, name in enumerate(header):
        index.setdefault(name, i)  # a repeated name: the first, as polars keeps it
    kept = [(row, line) for row, line in zip(rows[1:], starts[1:]) if len(row) == width]
    return (pl.DataFrame({**{name: [row[i] for row, _ in kept] for name, i in index.items()},
                          "line": [line for _, line in kept]},
                         schema={**{name: pl.String for name in index}, "line": pl.Int64}), errors, bad)


# transacted_at: RFC 3339 exactly as the API's times take it (rules.timeutil.RFC3339_PATTERN:
# `T`, `t` or a space; a fraction of 1-9 digits, cut to the microsecond where the API
# refuses a digit other than 0 past the 6th: the line's time is the network's, recorded
# under no id, and places the line by the day, which the cut never moves
# (docs/settlement.md); `Z`, `z` or
# +HH:MM up to 23:59; no leap second), or Seoul local time without an offset:
# YYYY-MM-DD HH:MM:SS (or with a `T`) and YYYYMMDDHHMMSS. The pattern gives the shape;
# polars' parse of the date and the time of day to the second checks their ranges, but
# takes second 60 as the next minute's first (so 2025-09-30T23:59:60 was read as 10-01's
# midnight), which is refused here first; the fraction and the offset are read apart.
RFC3339_FULL = f"^(?:{RFC3339_PATTERN})$"
LOCAL_DASHED = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}$"
LOCAL_COMPACT = r"^[0-9]{14}$"
TIME_UNKNOWN = "transacted_at is not a time this format knows"
TIME_LEAP = "transacted_at is a leap second (second 60), which the book does not take (nor does the API)"
TIME_OUT_OF_RANGE = "transacted_at is no real date and time (a month, day, hour, minute or offset out of range)"
SPAN_FIRST_US, SPAN_END_US = to_us(SPAN_FIRST), to_us(SPAN_END)


def parse_times(values: pl.Series) -> pl.DataFrame:
    """Each value (surrounding blanks stripped, as in every column) as microseconds since
    the epoch (`us`), or null with the `reason` it is refused: not one of the forms, a
    leap second, or a field out of range (2025-02-29, 24:00:00, +24:00). Vectorised, and
    a form no value has is not computed (a file writes its times one way): under a
    second for 1.5 million lines, as the format-by-format parse before it."""
    t = pl.col("t")
    frame = values.to_frame("t").with_columns(t.str.strip_chars())
    frame = frame.with_columns(t.str.contains(RFC3339_FULL).fill_null(False).alias("rfc"),
                               t.str.contains(LOCAL_COMPACT).fill_null(False).alias("compact"),
                               t.str.contains(LOCAL_DASHED).fill_null(False).alias("local"))
    rfc, compact = pl.col("rfc"), pl.col("compact")
    known = rfc | compact | pl.col("local")
    any_rfc, any_compact, any_dashed = frame.select(rfc.any().alias("r"), compact.any().alias("c"),
                                                               (known & ~compact).any().alias("d")).row(0)
    naive = []  # the date and time to the second, as written (local or at its offset)
    if any_dashed:  # the date, a separator (T, t or a space) and the time of day: at fixed places
        naive.append(pl.concat_str(t.str.slice(0, 10), pl.lit(" "), t.str.slice(11, 8))
                     .str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us"))
    if any_compact:
        naive.append(t.str.to_datetime("%Y%m%d%H%M%S", strict=False, time_unit="us"))
    second = (pl.when(compact).then(t.str.slice(12, 2)).otherwise(t.str.slice(17, 2)) if len(naive) == 2
              else t.str.slice(12, 2) if any_compact else t.str.slice(17, 2))
    at = (pl.when(compact).then(naive[1]).otherwise(naive[0]) if len(naive) == 2
          else naive[0] if naive else pl.lit(None, pl.Datetime("us"))).dt.epoch("us")
    offset_us, offset_ok, micros = pl.lit(9 * 3_600_000_000), pl.lit(True), pl.lit(0)
    if any_rfc:
        zulu = t.str.slice(-1).is_in(["Z", "z"])
        sign = pl.when(t.str.slice(-6, 1) == "-").then(-1).otherwise(1)
        hours, minutes = (t.str.slice(-5, 2).cast(pl.Int64, strict=False),
                          t.str.slice(-2, 2).cast(pl.Int64, strict=False))
        fraction = t.str.extract(r"\.([0-9]{1,9})", 1)
        offset_us = (pl.when(~rfc).then(offset_us).when(zulu).then(0)
                     .otherwise(sign * (hours * 60 + minutes) * 60_000_000))
        offset_ok = ~rfc | zulu | ((hours <= 23) & (minutes <= 59))
        micros = pl.when(fraction.is_null()).then(0).otherwise(fraction.str.slice(0, 6).str.pad_end(6, "0")
                                                               .cast(pl.Int64))
    frame = frame.select(known.alias("known"), (second == "60").alias("leap"), at.alias("at"),
                         offset_ok.alias("offset_ok"), (micros - offset_us).alias("shift"))
    valid = pl.col("known") & ~pl.col("leap") & pl.col("at").is_not_null() & pl.col("offset_ok")
    return frame.select(
        pl.when(valid).then(pl.col("at") + pl.col("shift")).alias("us"),
        pl.when(~pl.col("known")).then(pl.lit(TIME_UNKNOWN)).when(pl.col("leap")).then(pl.lit(TIME_LEAP))
        .when(~valid).then(pl.lit(TIME_OUT_OF_RANGE)).otherwise(None).alias("reason"))


def parse_clearing(data: bytes, config: SettlementConfig | None = None) -> tuple[pl.DataFrame, dict]:
    """The clearing file as a frame (CLEARING_SCHEMA) and facts about it; a malformed file
    raises ClearingFileInvalid listing the lines at fault."""
    config = config or get_config()
    limit = config.clearing_errors_listed_max
    if len(data) > config.clearing_file_bytes_max:
        raise ClearingFileInvalid(f"the file is larger than {config.clearing_file_bytes_max} bytes")
    # The text as UTF-8 bytes, never as a str of the whole file (`decode_utf8`).
    utf8, encoding, codec = decode_utf8(data, config.clearing_file_bytes_max)
    if b"\r" in utf8 and b"\n" not in utf8:  # old Mac line ends; CRLF is read as it is
        utf8, encoding = utf8.replace(b"\r", b"\n"), f"{encoding} (CR line ends)"
    end = utf8.find(b"\n")
    first = (utf8 if end < 0 else utf8[:end]).decode(codec)
    # Blank (whitespace) throughout: a first line with a character is no such file.
    if not first.strip() and not utf8.decode(codec).strip():
        raise ClearingFileInvalid("the file is empty", errors=[{"line": 1, "reason": "no header"}])
    if "\r" in first.removesuffix("\r"):
        # Line ends of two kinds (a bare CR before the first LF): the header would be read
        # one way here and another by the CSV reader below (found by tests/test_fuzz_inputs.py).
        # CR CR LF has one before each CRLF: polars read the last column's name with a CR.
        how = ("its first line ends in CR CR LF: a CRLF file converted once more, as an FTP transfer in ASCII "
               "mode does" if first.endswith("\r\r") else "a carriage return inside the first line")
        raise ClearingFileInvalid(f"the file mixes line ends ({how})",
                                  errors=[{"line": 1, "reason": "a bare carriage return in the header line"}])
    if first.count(",") >= HEADER_FIELDS_MAX:  # counted before the header is split (quoted commas too)
        raise ClearingFileInvalid(f"the header has more than {HEADER_FIELDS_MAX:,} fields ({first.count(','):,} "
                                  f"commas); a clearing file has at most {HEADER_FIELDS_MAX:,} columns",
                                  errors=[{"line": 1, "reason": f"more than {HEADER_FIELDS_MAX:,} fields"}])
    # A first line with no fields (the file starts with a blank line) gives no row at all;
    # a StopIteration here would escape the worker thread and hang the request.
    try:
        header = next(csv.reader(io.StringIO(first, newline="")), [])
    except csv.Error as error:  # a bare carriage return inside the header
        raise ClearingFileInvalid(f"the header is not CSV: {error}", errors=[{"line": 1, "reason": str(error)}]) from None
    names = _canonical(header)
    missing = [c for c in REQUIRED if c not in names.values()]
    if missing:
        raise ClearingFileInvalid(f"the header lacks {', '.join(missing)}",
                                  errors=[{"line": 1, "reason": f"missing column {c}"} for c in missing])
    ignored = [column for column in header if column not in names]
    raw, ragged, ragged_count = _read_records(utf8, codec, header, limit)
    del utf8  # a CP949 file's UTF-8 copy: not needed past here
    _refuse_typed_unknown(raw, ignored)
    raw = raw.rename({k: v for k, v in names.items() if k in raw.columns})
    has_type = "record_type" in raw.columns
    has_split = "split_seq" in raw.columns
    for optional in ("record_type", "split_seq", "refund_id"):
        if optional not in raw.columns:
            raw = raw.with_columns(pl.lit(None, pl.String).alias(optional))
    # A part of the lines at a time (each line is checked alone): the columns each check
    # makes for every line at once were the parse's peak of memory.
    parts = [_validate(raw.slice(start, VALIDATE_PART_LINES))
             for start in range(0, max(raw.height, 1), VALIDATE_PART_LINES)]
    del raw
    frame = pl.concat([part for part, _ in parts], how="vertical", rechunk=False)
    errors = pl.concat([part for _, part in parts], how="vertical").sort("line")
    del parts
    count = errors.height + ragged_count  # the ragged lines are no records: counted once
    if count:
        # Both lists are in line order: the first `limit` of all are among their first `limit`.
        listed = sorted(ragged + errors.head(limit).to_dicts(), key=lambda e: e["line"])[:limit]
        raise ClearingFileInvalid(f"{count} line(s) are malformed"
                                  + (f" ({ragged_count} of other than {len(header)} fields)" if ragged_count else "")
                                  + ": lines " + ", ".join(str(e["line"]) for e in listed[:20])
                                  + (" …" if count > 20 else ""),
                                  errors=listed, invalid_line_count=count)
    if not frame.height:  # all zeros would read as a clean day
        raise ClearingFileInvalid("the file has no clearing lines after its header (a truncated file?)", errors=[])
    return frame, {"encoding": encoding, "lines": frame.height, "declares_refunds": has_type,
                   "declares_splits": has_split, "ignored_columns": ignored}


VALIDATE_PART_LINES = 200_000

# amount_won: whole won, its digits grouped by three with commas or not at all ("12,000",
# "12000"); a comma elsewhere ("12000,00", a decimal comma, or "1,2,000") is kept, and the
# amount is then no whole number: dropping it made 12,000 won 1,200,000.
AMOUNT_GROUPED = f"^-?{WON_GROUPED}$"  # eum.textfiles's reading, vectorised (and a sign, to say so)


def _validate(raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    amount = pl.col("amount_won").str.strip_chars()
    amount_text = (pl.when(amount.str.contains(AMOUNT_GROUPED)).then(amount.str.replace_all(",", "", literal=True))
                   .otherwise(amount))
    rtype = pl.col("record_type").str.strip_chars().str.to_uppercase()
    times = parse_times(raw["transacted_at"])
    parsed = raw.with_columns(
        pl.col("approval_id").str.strip_chars(), pl.col("merchant_id").str.strip_chars(),
        pl.col("refund_id").str.strip_chars(),
        pl.when(amount_text.str.contains(r"^[0-9]{1,13}$")).then(amount_text.cast(pl.Int64, strict=False))
        .alias("amount_parsed"),
        times.get_column("us").alias("transacted_at_us"), times.get_column("reason").alias("time_reason"),
        pl.when(pl.col("record_type").is_null() | (rtype == "")).then(pl.lit("P"))
        .otherwise(rtype.replace_strict(RECORD_TYPES, default=None)).alias("type_parsed"),
        pl.when(pl.col("split_seq").is_null() | (pl.col("split_seq").str.strip_chars() == "")).then(None)
        .otherwise(pl.col("split_seq").str.strip_chars().cast(pl.Int64, strict=False)).alias("split_parsed"),
        (pl.col("split_seq").is_not_null() & (pl.col("split_seq").str.strip_chars() != "")).alias("split_given"),
    )
    reasons = [
        (~pl.col("approval_id").str.contains(ID_PATTERN)).fill_null(True), "approval_id is not a payment id",
        (~pl.col("merchant_id").str.contains(ID_PATTERN)).fill_null(True), "merchant_id is missing or malformed",
        amount_text.str.contains(r"^-[0-9]+$").fill_null(False),
        "amount_won out of 1..10^12 (negative: a refund is an R line of a positive amount)",
        pl.col("amount_parsed").is_null(), "amount_won is not a whole number of won",
        (pl.col("amount_parsed") < 1) | (pl.col("amount_parsed") > AMOUNT_WON_MAX), "amount_won out of 1..10^12",
        pl.col("time_reason").is_not_null(), pl.col("time_reason"),
        (pl.col("transacted_at_us") < SPAN_FIRST_US) | (pl.col("transacted_at_us") >= SPAN_END_US),
        f"transacted_at is not {SPAN_TEXT}",
        pl.col("type_parsed").is_null(), "record_type is not P or R",
        pl.col("split_given") & (pl.col("split_parsed").is_null() | (pl.col("split_parsed") < 1)),
        "split_seq is not a positive whole number",
        # A refund's line with its type left out (P by default) was summed with the
        # payment's P lines and its refund_id not read (finance audit).
        (pl.col("type_parsed") == "P") & (pl.col("refund_id") != ""),
        "refund_id is given on a P line: a refund is an R line (record_type R)",
    ]
    reason = pl.lit(None, pl.String)
    for condition, text in reversed(list(zip(reasons[::2], reasons[1::2]))):
        reason = (pl.when(condition.fill_null(False)).then(text if isinstance(text, pl.Expr) else pl.lit(text))
                  .otherwise(reason))
    checked = parsed.with_columns(reason.alias("reason"))
    errors = checked.filter(pl.col("reason").is_not_null()).select("line", "reason").sort("line")
    frame = checked.filter(pl.col("reason").is_null()).select(
        "line", pl.col("type_parsed").alias("record_type"), "approval_id", "merchant_id",
        pl.col("amount_parsed").alias("amount_won"), "transacted_at_us", pl.col("split_parsed").alias("split_seq"),
        pl.when(pl.col("refund_id") == "").then(None).otherwise(pl.col("refund_id")).alias("refund_id"),
    ).cast(CLEARING_SCHEMA)
    return frame, errors


# ---------------------------------------------------------------- matching


def rfc3339_expr(column: str) -> pl.Expr:
    """`rules.timeutil.rfc3339` of an Int64 column of microseconds, vectorised: the Seoul
    time with its fixed +09:00, no fraction on a whole second, else six digits (the same
    text, tests/test_reconcile.py holds them equal); null stays null."""
    us = pl.col(column)
    local = pl.from_epoch(us + SEOUL_OFFSET_US, time_unit="us").dt.strftime("%Y-%m-%dT%H:%M:%S")
    micros = us.mod(1_000_000)
    fraction = pl.when(micros == 0).then(pl.lit("")).otherwise(pl.lit(".") + micros.cast(pl.String).str.zfill(6))
    return pl.concat_str(local, fraction, pl.lit("+09:00"))


def with_readable_times(frame: pl.DataFrame) -> pl.DataFrame:
    """Beside each column of microseconds (READABLE_TIMES), its RFC 3339 Seoul text;
    the microseconds stay (other systems read them)."""
    present = [c for c in frame.columns if c in READABLE_TIMES and READABLE_TIMES[c] not in frame.columns]
    if not present:
        return frame
    order: list[str] = []
    for name in frame.columns:
        order += [name, READABLE_TIMES[name]] if name in present else [name]
    return frame.with_columns(rfc3339_expr(c).alias(READABLE_TIMES[c]) for c in present).select(order)


@dataclass(frozen=True)
class Reconciliation:
    frames: dict[str, pl.DataFrame]
    facts: dict
    # A stored run's (settlement.runs): each category's count of rows found, where `frames`
    # hold only those kept; and who ran it on which file, for the report. None: `frames` are all.
    counted: dict[str, int] | None = None
    runs: tuple[dict, ...] = ()

    def counts(self) -> dict[str, int]:
        if self.counted is not None:
            return dict(self.counted)
        return {name: self.frames[name].height for name in CATEGORIES}

    def body(self, rows_max: int = 1_000) -> dict:
        """API.md's shape: each category is the list of its rows (at most `rows_max`),
        beside `counts` and, per category, `rows_truncated`."""
        counts = self.counts()
        out: dict = {"facts": self.facts, "counts": counts,
                     "rows_truncated": {name: counts[name] > rows_max for name in CATEGORIES}}
        for name in CATEGORIES:
            out[name] = self.frames[name].head(rows_max).to_dicts()
        return out

    def amounts(self) -> dict[str, dict[str, int]]:
        """Per category, the won its rows carry on each side: the clearing file's (a
        duplicate's line amount) and the ledger's."""
        out = {}
        for name in CATEGORIES:
            frame = self.frames[name]
            clearing = "amount_won" if name == "duplicates" else "clearing_amount_won"
            out[name] = {side: int(frame.get_column(column).sum() or 0) if column in frame.columns else 0
                         for side, column in (("clearing_won", clearing), ("ledger_won", "ledger_amount_won"))}
        return out

    @property
    def exceptions(self) -> int:
        return sum(n for name, n in self.counts().items() if name != "matched")


def business_dates(clearing: pl.DataFrame) -> list[str]:
    if not clearing.height:
        return []
    day = ((pl.col("transacted_at_us") + 9 * 3_600_000_000) // 86_400_000_000)
    days = clearing.select(day.unique().sort()).to_series().to_list()
    return [(dt.date(1970, 1, 1) + dt.timedelta(days=int(d))).isoformat() for d in days]


DUPLICATE_COLUMNS = CATEGORY_COLUMNS["duplicates"]
SAME_LINE = "the same line again"
RESENT = "the approval again without split_seq, at the same amount (a resend)"
RESENT_REFUND = "the refund again without split_seq, at the same amount (a resend)"
RESENT_PART = "the approval's part of this split_seq again, at the same amount (a resend)"
RESENT_REFUND_PART = "the refund's part of this split_seq again, at the same amount (a resend)"
# The lines that clear one payment (P) or one refund named by its refund_id (R): summed as
# parts, or, in a file declaring split_seq, the first line and its resends.
P_CLEARS = ["approval_id"]
R_CLEARS = ["approval_id", "refund_id"]


def _resends(lines: pl.DataFrame, clears: list[str], reasons: tuple[str, str],
             within: pl.Series | None = None) -> pl.DataFrame:
    """In a file that declares split_seq: the lines that repeat the amount of the first line
    clearing the same payment or refund (`clears`: P_CLEARS or R_CLEARS) without split_seq,
    or under the same split_seq (a part sent again: summed, it was counted twice), each with
    that first line and its reason (`reasons`: without split_seq, a part again). `within`:
    of `lines`, those (a mask) to look in."""
    # Only a payment or refund of two lines or more has a resend: the others (nearly every
    # line) are left out before the lines are copied, sorted, grouped.
    inside = pl.lit(True) if within is None else pl.lit(within)
    key = pl.col(clears[0]) if len(clears) == 1 else pl.struct(clears)
    parts = [*clears, "split_seq"]
    several = lines.filter(inside & pl.when(inside).then(key).is_duplicated())
    repeated = several.filter(pl.struct(parts).is_duplicated()).sort("line")
    marked = repeated.with_columns(pl.col("line").first().over(parts).alias("first_line"),
                                   pl.col("amount_won").first().over(parts).alias("first_amount_won"))
    return (marked.filter((pl.col("line") != pl.col("first_line"))
                          & (pl.col("amount_won") == pl.col("first_amount_won")))
            .with_columns(pl.when(pl.col("split_seq").is_null()).then(pl.lit(reasons[0]))
                          .otherwise(pl.lit(reasons[1])).alias("reason")))


IDENTICAL_KEYS = ["record_type", "approval_id", "merchant_id", "amount_won", "transacted_at_us", "split_seq",
                  "refund_id"]


def _first_of_identical(lines: pl.DataFrame, keys: list[str]) -> pl.Series:
    """`pl.struct(keys).is_first_distinct()` of `lines` (keys include approval_id), with
    less memory: identical lines share their approval id, so the lines of an approval id
    no other line has are firsts, and only the others (splits, resends, repeats, refund
    lines) are compared whole (hashing every line's seven keys was ~200 MiB at 1.5 million)."""
    shared = lines.select(pl.col("approval_id").is_duplicated()).to_series()
    first = ~shared
    if shared.any():
        first = first.scatter(shared.arg_true(),
                              lines.filter(shared).select(pl.struct(keys).is_first_distinct()).to_series())
    return first.rename("first")


def reconcile_frames(clearing: pl.DataFrame, payments: pl.DataFrame, refunds: pl.DataFrame, *,
                     tolerance_won: int = 0, declares_refunds: bool = False, declares_splits: bool = False,
                     dates: list[str] | None = None) -> Reconciliation:
    """Pure matching. `payments`/`refunds`: the ledger side (LEDGER_*_SCHEMA) holding at
    least every row of the covered `dates` and every id the file names (for a refund
    line, its payment too: the merchant is checked against the payment's).
    `declares_splits`: the file's header has a split_seq column (parse_clearing's facts),
    so that P lines without it are resends, not parts."""
    assert tolerance_won >= 0
    dates = business_dates(clearing) if dates is None else dates
    keys = IDENTICAL_KEYS
    # parse_clearing's lines are in order already (in parts: no sorted flag): not copied
    ordered = clearing if clearing.get_column("line").is_sorted() else clearing.sort("line")
    first = _first_of_identical(ordered, keys)
    repeats = ordered.filter(~first)
    # The first of each repeated line: among the unique lines of the repeats' approval ids
    # (a line repeats one of its own approval), not a join with every line of the file.
    repeated = first & pl.col("approval_id").is_in(repeats.get_column("approval_id").implode())
    identical = (repeats.join(ordered.filter(repeated).select(*keys, pl.col("line").alias("first_line")), on=keys,
                              how="left", nulls_equal=True)
                 .select(*DUPLICATE_COLUMNS[:-1], pl.lit(SAME_LINE).alias("reason")))
    # The P lines to match are a mask of the ordered lines, not a copy of them (one more
    # copy of the file's lines, held while they were matched); the R lines are copied (few).
    purchases = first & (ordered.get_column("record_type") == "P")
    refund_lines = ordered.filter(first & (pl.col("record_type") == "R"))
    del first
    duplicates = identical
    if declares_splits:
        resent = pl.concat([
            _resends(ordered, P_CLEARS, (RESENT, RESENT_PART), within=purchases).select(*DUPLICATE_COLUMNS),
            _resends(refund_lines.filter(pl.col("refund_id").is_not_null()), R_CLEARS,
                     (RESENT_REFUND, RESENT_REFUND_PART)).select(*DUPLICATE_COLUMNS)])
        purchases = purchases & ~ordered.select(pl.col("line").is_in(resent.get_column("line").implode())).to_series()
        refund_lines = refund_lines.join(resent.select("line"), on="line", how="anti")
        duplicates = pl.concat([identical, resent])
    p_out = _match_purchases_in_parts(ordered, purchases, payments, tolerance_won, dates, declares_splits)
    del ordered, purchases
    r_out = _match_refunds(refund_lines, refunds, payments, tolerance_won, dates, declares_refunds, declares_splits)
    frames = {name: pl.concat([p_out[name], r_out[name]], how="diagonal_relaxed") for name in CATEGORIES
              if name != "duplicates"}
    frames["duplicates"] = duplicates.sort("line")
    frames = {name: with_readable_times(_columns_of(name, frame)) for name, frame in frames.items()}
    facts = {"business_dates": dates, "clearing_lines": clearing.height, "tolerance_won": tolerance_won,
             "declares_refunds": declares_refunds, "declares_splits": declares_splits}
    return Reconciliation(frames, facts)


def _columns_of(name: str, frame: pl.DataFrame) -> pl.DataFrame:
    """The category's rows in its columns (CATEGORY_COLUMNS): those its rows lack, empty."""
    columns = CATEGORY_COLUMNS[name]
    assert set(frame.columns) <= set(columns), (name, frame.columns)
    # with_columns, not select: literals alone in a select make one row of a frame of none
    frame = frame.with_columns(pl.lit(None, ROW_SCHEMA[c]).alias(c) for c in columns if c not in frame.columns)
    return frame.select(pl.col(c).cast(ROW_SCHEMA[c]) for c in columns)


def _in_dates(column: str, dates: list[str]) -> pl.Expr:
    day = ((pl.col(column) + 9 * 3_600_000_000) // 86_400_000_000)
    ordinals = [(dt.date.fromisoformat(d) - dt.date(1970, 1, 1)).days for d in dates]
    return day.is_in(ordinals)


def _seoul_day(column: str) -> pl.Expr:
    return (pl.col(column) + SEOUL_OFFSET_US) // 86_400_000_000


def _seoul_date(column: str) -> pl.Expr:
    """The Asia/Seoul business date of a column of microseconds, as YYYY-MM-DD text."""
    return pl.from_epoch(pl.col(column) + SEOUL_OFFSET_US, time_unit="us").dt.date().cast(pl.String)


def _late(dates: list[str]) -> tuple[pl.Expr, pl.Expr]:
    """(late, its clearing date) of a line that agrees with the ledger's event
    (`occurred_at_us`, the line's `transacted_at_us`): timed on another business date than
    the event's (that date), or the event of a date the file does not clear (the file's
    date: a payment of the 15th, or of the 13th, in the 14th's file)."""
    timed_off = _seoul_day("transacted_at_us") != _seoul_day("occurred_at_us")
    return (timed_off | ~_in_dates("occurred_at_us", dates),
            pl.when(timed_off).then(_seoul_date("transacted_at_us")).otherwise(pl.lit(", ".join(dates))))


def _three_ways(found: pl.DataFrame, sel: list, amount_bad: pl.Expr, merchant_bad: pl.Expr,
                late: tuple[pl.Expr, pl.Expr] | None = None) -> dict[str, pl.DataFrame]:
    """Lines the ledger holds, by the amount first, then the merchant (P and R alike); of
    those that agree, `late` ones (`_late`: another business date than the ledger event's,
    or an event of a date the file does not clear; the frame has `occurred_at_us` and
    `transacted_at_us`) are late instead of matched."""
    agree = ~amount_bad & ~merchant_bad
    out = {"amount_mismatch": found.filter(amount_bad).select(sel),
           "merchant_mismatch": found.filter(~amount_bad & merchant_bad).select(sel)}
    if late is None:
        return {**out, "matched": found.filter(agree).select(sel), "late": pl.DataFrame()}
    late, clearing_date = late[0].fill_null(False), late[1]
    return {**out, "matched": found.filter(agree & ~late).select(sel),
            "late": found.filter(agree & late).select(*sel, "occurred_at_us", "transacted_at_us",
                                                      _seoul_date("occurred_at_us").alias("ledger_business_date"),
                                                      clearing_date.alias("clearing_business_date"))}


# P lines are matched in parts of about this many lines, each a range of approval ids
# (`_match_purchases_in_parts`): the group-by and the full join of every approval with the
# ledger's payments, and the sort of the result, were the reconciliation's peak of memory.
MATCH_PART_LINES = 200_000


def _match_purchases_in_parts(lines: pl.DataFrame, purchases: pl.Series, payments: pl.DataFrame, tol: int,
                              dates: list[str], declares_splits: bool = False) -> dict:
    """`_match_purchases` of the `lines` that `purchases` (a mask) marks, a range of
    approval ids at a time. Exact: every line of an approval and its ledger payment
    (payment_id = approval_id) fall in the same range, each result row is one approval's,
    and each category is sorted by approval id, one row per approval: the ranges' results,
    in the ranges' order, are the whole's, with no sort."""
    mask = pl.lit(purchases)
    if purchases.sum() <= MATCH_PART_LINES:
        return _match_purchases(lines.filter(mask), payments, tol, dates, declares_splits)
    ids = lines.get_column("approval_id").filter(purchases).sort()
    # Range i is [bounds[i - 1], bounds[i]): none below the first nor above the last.
    bounds = ids.gather_every(MATCH_PART_LINES)[1:].unique(maintain_order=True).to_list()
    del ids
    out: dict[str, list[pl.DataFrame]] = {}
    for i in range(len(bounds) + 1):
        lo, hi = (bounds[i - 1] if i else None), (bounds[i] if i < len(bounds) else None)
        for name, frame in _match_purchases(lines.filter(mask & _in_range("approval_id", lo, hi)),
                                            payments.filter(_in_range("payment_id", lo, hi)),
                                            tol, dates, declares_splits).items():
            out.setdefault(name, []).append(frame)
    return {name: pl.concat(frames, how="vertical", rechunk=False) for name, frames in out.items()}


def _in_range(column: str, lo: str | None, hi: str | None) -> pl.Expr:
    """lo <= column < hi (an open end when None), as polars sorts strings."""
    inside = pl.lit(True)
    if lo is not None:
        inside = inside & (pl.col(column) >= lo)
    if hi is not None:
        inside = inside & (pl.col(column) < hi)
    return inside


def _no_split(declares_splits: bool) -> pl.Expr:
    """Of one payment's (or refund's) lines grouped (`clearing_rows`, `unsplit_rows`,
    `parts_repeated`), in a file declaring split_seq: whether they are no split, whatever
    they add up to. More than one without split_seq (other amounts than a resend's, which
    are gone by now), one without it beside numbered parts (a whole line and part 2, part
    1 lost, added up to the payment: the finance audit), or two of one split_seq."""
    unsplit = pl.col("unsplit_rows")
    several = (unsplit > 1) | ((unsplit > 0) & (pl.col("clearing_rows") > unsplit))
    return (pl.lit(declares_splits) & (several | pl.col("parts_repeated"))).fill_null(False)


def _match_purchases(rows: pl.DataFrame, payments: pl.DataFrame, tol: int, dates: list[str],
                     declares_splits: bool = False) -> dict:
    grouped = rows.group_by("approval_id").agg(
        pl.col("amount_won").sum().alias("clearing_amount_won"), pl.len().alias("clearing_rows"),
        pl.col("split_seq").is_null().sum().alias("unsplit_rows"),
        pl.col("split_seq").drop_nulls().is_duplicated().any().alias("parts_repeated"),
        pl.col("merchant_id").first().alias("clearing_merchant_id"),
        pl.col("merchant_id").n_unique().alias("clearing_merchants"), pl.col("line").min().alias("first_line"),
        pl.col("transacted_at_us").min().alias("earliest_at_us"),
        pl.col("transacted_at_us").max().alias("latest_at_us"))
    # The line numbers of split payments (few): listed; one line otherwise.
    multi = (rows.join(grouped.filter(pl.col("clearing_rows") > 1).select("approval_id"), on="approval_id")
             .group_by("approval_id").agg(pl.col("line").sort().alias("lines")))
    ledger = payments.select(pl.col("payment_id").alias("approval_id"), pl.col("merchant_id").alias("ledger_merchant_id"),
                             pl.col("amount_won").alias("ledger_amount_won"), "status", "occurred_at_us",
                             pl.lit(True).alias("in_ledger"))
    unsplit = _no_split(declares_splits)
    joined = (grouped.with_columns(pl.lit(True).alias("in_clearing"))
              .join(ledger, on="approval_id", how="full", coalesce=True)
              .join(multi, on="approval_id", how="left")
              .with_columns(pl.coalesce("lines", pl.concat_list("first_line")).alias("lines"),
                            (pl.col("clearing_amount_won") - pl.col("ledger_amount_won")).alias("difference_won"),
                            pl.lit("P").alias("record_type"),
                            ((pl.col("clearing_rows") > 1) & ~unsplit).alias("split"),
                            unsplit.alias("unsplit")))
    in_clearing = pl.col("in_clearing").fill_null(False)
    approved = (pl.col("status") == "approved").fill_null(False)
    cols = ["record_type", "approval_id", "clearing_amount_won", "ledger_amount_won", "difference_won",
            "clearing_rows", "split", "clearing_merchant_id", "ledger_merchant_id", "lines"]
    clearing_side = joined.filter(in_clearing)
    found = clearing_side.filter(approved)
    amount_bad = (pl.col("difference_won").abs() > tol) | pl.col("unsplit")
    merchant_bad = (pl.col("clearing_merchant_id") != pl.col("ledger_merchant_id")) | (pl.col("clearing_merchants") > 1)
    # Late: a part off the payment's Seoul date. The parts' dates run from the earliest's to
    # the latest's, so one is off exactly when one of those two is; its time is shown.
    payment_day = _seoul_day("occurred_at_us")
    found = found.with_columns(pl.when(_seoul_day("earliest_at_us") != payment_day).then(pl.col("earliest_at_us"))
                               .otherwise(pl.col("latest_at_us")).alias("transacted_at_us"))
    late = _late(dates)
    missing_ledger = clearing_side.filter(~approved).with_columns(
        pl.when(pl.col("status").is_null()).then(pl.lit("no such payment in the ledger"))
        .otherwise(pl.format("payment is {} in the ledger", pl.col("status"))).alias("reason"))
    missing_clearing = joined.filter(~in_clearing & approved & _in_dates("occurred_at_us", dates)).select(
        "record_type", "approval_id", "ledger_merchant_id", "ledger_amount_won", "occurred_at_us")
    return {
        **{name: frame.sort("approval_id")
           for name, frame in _three_ways(found, cols, amount_bad, merchant_bad, late).items()},
        "missing_in_ledger": missing_ledger.select(*cols[:2], "clearing_amount_won", "clearing_merchant_id",
                                                   "lines", "reason").sort("approval_id"),
        "missing_in_clearing": missing_clearing.sort("approval_id"),
    }


def _match_refunds(rows: pl.DataFrame, refunds: pl.DataFrame, payments: pl.DataFrame, tol: int, dates: list[str],
                   declares: bool, declares_splits: bool = False) -> dict:
    """R lines, checked as P lines are: the amount against the ledger's refund(s), then
    the merchant against the refunded payment's (a merchant_mismatch when the amounts
    agree but the line, or one of the lines summed with it, names another). The lines
    naming one refund_id (of one approval) are summed as a payment's P lines are: parts,
    or, in a file declaring split_seq, lines without it that the resends (gone by now)
    leave are no split. Lines without a refund_id stand for the payment's refunds of the
    file's `dates` (those no line names by id): the same refunds that are
    missing_in_clearing when no line has them."""
    empty = {name: pl.DataFrame() for name in CATEGORIES}
    by_id = rows.filter(pl.col("refund_id").is_not_null())
    by_payment = rows.filter(pl.col("refund_id").is_null())
    # A refund is named only by a line of its own payment: one filed under another approval is
    # missing_in_ledger, and the refund stays to be cleared (it was taken as cleared, reported nowhere).
    named = by_id.select("refund_id", pl.col("approval_id").alias("payment_id")).unique()
    in_scope = refunds.filter(_in_dates("occurred_at_us", dates)).join(named, on=["refund_id", "payment_id"],
                                                                       how="anti")
    # The merchant of each payment these lines or refunds are of (not of every payment read).
    wanted = pl.concat([rows.get_column("approval_id"), in_scope.get_column("payment_id")]).implode()
    merchant_of = (payments.filter(pl.col("payment_id").is_in(wanted))
                   .select(pl.col("payment_id").alias("approval_id"), pl.col("merchant_id").alias("ledger_merchant_id"))
                   .unique("approval_id"))
    out = {name: [] for name in CATEGORIES}

    def classify(j: pl.DataFrame, sel: list, known: pl.Expr, amount_bad: pl.Expr, merchant_bad: pl.Expr,
                 late: pl.Expr | None) -> None:
        merchant_bad = (pl.col("ledger_merchant_id").is_not_null() & merchant_bad).fill_null(False)
        for name, frame in _three_ways(j.filter(known), sel, amount_bad, merchant_bad, late).items():
            out[name].append(frame)

    if by_id.height:
        clearing = by_id.group_by(R_CLEARS).agg(
            pl.col("amount_won").sum().alias("clearing_amount_won"),
            pl.len().alias("clearing_rows"), pl.col("split_seq").is_null().sum().alias("unsplit_rows"),
            pl.col("split_seq").drop_nulls().is_duplicated().any().alias("parts_repeated"),
            pl.col("merchant_id").sort_by("line").first().alias("clearing_merchant_id"),
            pl.col("merchant_id").n_unique().alias("clearing_merchants"), pl.col("line").sort().alias("lines"),
            pl.col("transacted_at_us").min().alias("earliest_at_us"),
            pl.col("transacted_at_us").max().alias("latest_at_us"))
        unsplit = _no_split(declares_splits)
        j = (clearing.join(refunds.rename({"amount_won": "ledger_amount_won", "payment_id": "ledger_payment_id"}),
                           on="refund_id", how="left")
             .join(merchant_of, on="approval_id", how="left")
             .with_columns(pl.lit("R").alias("record_type"),
                           (pl.col("clearing_amount_won") - pl.col("ledger_amount_won")).alias("difference_won"),
                           ((pl.col("clearing_rows") > 1) & ~unsplit).alias("split"), unsplit.alias("unsplit"),
                           # late as a split payment is: the time of a part off the refund's date
                           pl.when(_seoul_day("earliest_at_us") != _seoul_day("occurred_at_us"))
                           .then(pl.col("earliest_at_us")).otherwise(pl.col("latest_at_us")).alias("transacted_at_us")))
        sel = ["record_type", "approval_id", "refund_id", "clearing_amount_won", "ledger_amount_won", "difference_won",
               "clearing_rows", "split", "clearing_merchant_id", "ledger_merchant_id", "lines"]
        known = pl.col("ledger_amount_won").is_not_null() & (pl.col("ledger_payment_id") == pl.col("approval_id"))
        # Another payment's refund of that id is no ledger amount of this line's (it read as difference 0).
        unknown = j.filter(~known).with_columns(pl.lit(None, pl.Int64).alias("ledger_amount_won"),
                                                pl.lit(None, pl.Int64).alias("difference_won"))
        out["missing_in_ledger"].append(unknown.select(*sel, pl.lit("no such refund of this payment").alias("reason")))
        classify(j, sel, known, (pl.col("difference_won").abs() > tol) | pl.col("unsplit"),
                 (pl.col("clearing_merchant_id") != pl.col("ledger_merchant_id")) | (pl.col("clearing_merchants") > 1),
                 _late(dates))
    if by_payment.height:
        clearing = by_payment.group_by("approval_id").agg(
            pl.col("amount_won").sum().alias("clearing_amount_won"), pl.col("line").sort().alias("lines"),
            pl.col("merchant_id").sort_by("line").first().alias("clearing_merchant_id"),
            pl.col("merchant_id").n_unique().alias("clearing_merchants"))
        ledger = in_scope.group_by("payment_id").agg(pl.col("amount_won").sum().alias("ledger_amount_won"),
                                                     pl.col("refund_id").sort().alias("ledger_refund_ids"))
        elsewhere = refunds.group_by(pl.col("payment_id").alias("approval_id")).agg(
            (~_in_dates("occurred_at_us", dates)).any().alias("other_dates"))
        j = (clearing.join(ledger, left_on="approval_id", right_on="payment_id", how="left")
             .join(merchant_of, on="approval_id", how="left")
             .join(elsewhere, on="approval_id", how="left")
             .with_columns(pl.lit("R").alias("record_type"),
                           (pl.col("clearing_amount_won") - pl.col("ledger_amount_won")).alias("difference_won")))
        sel = ["record_type", "approval_id", "clearing_amount_won", "ledger_amount_won", "difference_won",
               "ledger_refund_ids", "clearing_merchant_id", "ledger_merchant_id", "lines"]
        known = pl.col("ledger_amount_won").is_not_null()
        reason = (pl.when(pl.col("other_dates").is_null()).then(pl.lit("no refund of this payment in the ledger"))
                  .when(pl.col("other_dates")).then(pl.lit("no refund of this payment on the file's business dates"
                                                           " (it has refunds of other dates)"))
                  .otherwise(pl.lit("its refunds of the file's business dates are all on lines with their refund_id")))
        out["missing_in_ledger"].append(j.filter(~known).select(*sel, reason.alias("reason")))
        classify(j, sel, known, pl.col("difference_won").abs() > tol,
                 (pl.col("clearing_merchant_id") != pl.col("ledger_merchant_id")) | (pl.col("clearing_merchants") > 1),
                 None)
    if declares:
        unmatched = in_scope.join(by_payment.select(pl.col("approval_id").alias("payment_id")).unique(),
                                  on="payment_id", how="anti")
        out["missing_in_clearing"].append(unmatched.join(merchant_of, left_on="payment_id", right_on="approval_id",
                                                         how="left").select(
            pl.lit("R").alias("record_type"), pl.col("payment_id").alias("approval_id"), "refund_id",
            pl.col("amount_won").alias("ledger_amount_won"), "ledger_merchant_id", "occurred_at_us"))
    return {name: (pl.concat(parts, how="diagonal_relaxed") if parts else empty[name]) for name, parts in out.items()}


# ---------------------------------------------------------------- the ledger side, from the database


RANGES_PER_READ = 200


def _day_ranges(dates: list[str]) -> list[tuple[int, int]]:
    """The [start, end) microseconds of each run of consecutive `dates` (sorted, as
    `business_dates` gives them): a file of the 1st and the 20th reads those two days,
    not the eighteen between (a stray old line made it read every payment between)."""
    runs: list[list[dt.date]] = []
    for day in (dt.date.fromisoformat(d) for d in dates):
        if runs and day == runs[-1][1] + dt.timedelta(days=1):
            runs[-1][1] = day
        else:
            runs.append([day, day])
    return [(local_midnight_us(first), local_midnight_us(last + dt.timedelta(days=1))) for first, last in runs]


def load_ledger_side(conn: Connection, clearing: pl.DataFrame, dates: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The ledger side `reconcile_frames` needs: the payments and refunds of `dates` (each
    run of consecutive dates one range of times, `_day_ranges`), every payment the file
    names by id or a refund of `dates` is of, and every refund of the payments its R lines
    name, whatever their day."""
    p, r = s.payments, s.refunds
    pcols = (p.c.payment_id, p.c.merchant_id, p.c.amount_won, p.c.occurred_at_us, p.c.status)
    rcols = (r.c.refund_id, r.c.payment_id, r.c.amount_won, r.c.occurred_at_us)
    if not dates:
        return pl.DataFrame(schema=LEDGER_PAYMENTS_SCHEMA), pl.DataFrame(schema=LEDGER_REFUNDS_SCHEMA)
    ranges = _day_ranges(dates)
    # At most RANGES_PER_READ ranges OR-ed in one statement: SQLite refuses an expression
    # deeper than 1,000 (a file of ~1,000 scattered dates was a 503 "retry", for good).
    parts = [ranges[i:i + RANGES_PER_READ] for i in range(0, len(ranges), RANGES_PER_READ)]
    payments = pl.concat([read_frame(conn, select(*pcols).where(or_(*(and_(p.c.occurred_at_us >= lo,
                                                                          p.c.occurred_at_us < hi)
                                                                     for lo, hi in part))), LEDGER_PAYMENTS_SCHEMA)
                          for part in parts])
    refunds = pl.concat([read_frame(conn, select(*rcols).where(or_(*(and_(r.c.occurred_at_us >= lo,
                                                                         r.c.occurred_at_us < hi)
                                                                    for lo, hi in part))), LEDGER_REFUNDS_SCHEMA)
                         for part in parts])
    # Besides them, every payment the file names and every payment a refund of the dates is
    # of: a refund on no line is missing_in_clearing with its payment's merchant (one of a
    # payment of another day, not named, had none).
    named = pl.concat([clearing.select("approval_id"), refunds.select(pl.col("payment_id").alias("approval_id"))])
    others = named.unique().join(payments.select(pl.col("payment_id").alias("approval_id")), on="approval_id",
                                 how="anti")
    ids = others["approval_id"].to_list()
    extra_p, extra_r = [payments], [refunds]
    for start in range(0, len(ids), LEDGER_ID_CHUNK):
        chunk = ids[start:start + LEDGER_ID_CHUNK]
        extra_p.append(read_frame(conn, select(*pcols).where(p.c.payment_id.in_(chunk)), LEDGER_PAYMENTS_SCHEMA))
    # Refunds of every payment the file's R lines name, whatever day they happened: a line
    # with a refund_id matches it on any day (one without, those of `dates` only).
    named_ids = clearing.filter(pl.col("record_type") == "R")["approval_id"].unique().to_list()
    for start in range(0, len(named_ids), LEDGER_ID_CHUNK):
        chunk = named_ids[start:start + LEDGER_ID_CHUNK]
        extra_r.append(read_frame(conn, select(*rcols).where(r.c.payment_id.in_(chunk)), LEDGER_REFUNDS_SCHEMA))
    return pl.concat(extra_p).unique("payment_id"), pl.concat(extra_r).unique("refund_id")


def reconcile(conn: Connection, data: bytes, *, config: SettlementConfig | None = None,
              tolerance_won: int | None = None, business_date: dt.date | None = None) -> Reconciliation:
    """`business_date`: the day the file clears. Without it, the days of its lines'
    times; but a line the network timed just past midnight would then pull the whole
    next day in, every payment of it missing from the clearing. Either way a P line (or
    an R line with its refund_id) is compared by id whatever day that was (`late` when it
    agrees but is on another business date than its payment or refund, or that is not
    of these dates); an R line
    without one stands for its payment's refunds of those dates only."""
    config = config or get_config()
    clearing, facts = parse_clearing(data, config)
    return reconcile_parsed(conn, clearing, facts, config=config, tolerance_won=tolerance_won,
                            business_date=business_date)


def reconcile_parsed(conn: Connection, clearing: pl.DataFrame, facts: dict, *, config: SettlementConfig | None = None,
                     tolerance_won: int | None = None, business_date: dt.date | None = None) -> Reconciliation:
    """`reconcile` of a file `parse_clearing` has read (`clearing`, `facts`): a caller that
    lets go of the file's bytes in between (an upload: the API's route, the CLI) does not
    hold them while the book is read and the lines matched."""
    config = config or get_config()
    dates = business_dates(clearing) if business_date is None else [business_date.isoformat()]
    payments, refunds = load_ledger_side(conn, clearing, dates)
    result = reconcile_frames(clearing, payments, refunds,
                              tolerance_won=config.reconcile_tolerance_won if tolerance_won is None else tolerance_won,
                              declares_refunds=facts["declares_refunds"], declares_splits=facts["declares_splits"],
                              dates=dates)
    return Reconciliation(result.frames, {**result.facts, "encoding": facts["encoding"],
                                          "ignored_columns": facts.get("ignored_columns", [])})
