"""Uploaded text files as staff make them: UTF-8 (with or without a BOM) or CP949
from Korean Excel; and the cell prefixes a spreadsheet would run as a formula
(settlement.export neutralises them in CSV and xlsx exports)."""

from __future__ import annotations

import re
import unicodedata

UPLOAD_BYTES_MAX = 256 * 1024 * 1024
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")


class BadUpload(ValueError):
    def __init__(self, message: str, line: int | None = None, what: str = ""):
        super().__init__(message)
        self.line = line
        self.what = what


# A whole number of won as Korean Excel writes a number cell in 쉼표 스타일 (#,##0):
# digits grouped by three with commas ("150,000"), or no commas at all. A comma elsewhere
# ("12000,00", a decimal comma) is no such number: dropping it made 12,000 won 1,200,000.
# The clearing file (settlement.reconcile, vectorised), `eum payments replay` and grant
# recipients' files read amounts so.
WON_GROUPED = r"[0-9]{1,3}(?:,[0-9]{3})+"
_WON = re.compile(f"{WON_GROUPED}|[0-9]+")


def won_digits(text: str) -> str | None:
    """An amount's digits without its thousands separators, or None when `text` (stripped
    by the caller) is not a whole number written so (`WON_GROUPED`)."""
    return text.replace(",", "") if text.isascii() and _WON.fullmatch(text) else None


def header_key(name: str) -> str:
    """A column name as a header is matched: NFC (a macOS file's Hangul is NFD), without
    any whitespace ("구 분" as Korean forms space it) or invisible format character
    (Unicode category Cf: a BOM left by a file saved twice with one, a zero-width space),
    case-folded. Names spelled otherwise were no alias, and the column was ignored."""
    text = unicodedata.normalize("NFC", name)
    return "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch) != "Cf").casefold()


def read_bounded(path, limit: int) -> bytes:
    """A file's bytes, refused by its size (`BadUpload`, `decode_text`'s words) before any
    is read: read whole first, a file larger than memory was a MemoryError traceback
    (payments replay audit; a recipients' or a clearing file the same)."""
    from pathlib import Path

    if Path(path).stat().st_size > limit:
        raise BadUpload(f"file larger than {limit} bytes")
    return Path(path).read_bytes()


def decode_text(data: bytes, limit: int | None = None) -> tuple[str, str]:
    """(text, encoding): UTF-8 after a BOM, UTF-8, else CP949; anything else is refused
    with the line of the first bad byte in the encoding that reads further (a CP949
    file's Korean is bad UTF-8, and a UTF-8 file's bad CP949, well before the byte at
    fault). Larger than `limit` bytes (by default `UPLOAD_BYTES_MAX`, an upload's) is
    refused. Every BOM the text starts with is dropped: a BOM'd file saved again with
    one starts with two, and the second stayed in the first column's name ("missing
    column disbursement_id" of a header that has it)."""
    limit = UPLOAD_BYTES_MAX if limit is None else limit
    if len(data) > limit:
        raise BadUpload(f"file larger than {limit} bytes")
    if data.startswith(b"\xef\xbb\xbf"):
        try:
            return data[3:].decode("utf-8").lstrip("\ufeff"), "utf-8-sig"
        except UnicodeDecodeError as error:
            raise _bad_bytes(data[3:], error, "UTF-8 (after its BOM)") from None
    try:
        return data.decode("utf-8").lstrip("\ufeff"), "utf-8"
    except UnicodeDecodeError as first:
        try:
            return data.decode("cp949"), "cp949"
        except UnicodeDecodeError as second:
            raise _bad_bytes(data, max(first, second, key=lambda error: error.start), "UTF-8 or CP949") from None


def _bad_bytes(data: bytes, error: UnicodeDecodeError, what: str) -> BadUpload:
    """The refusal, naming the bad byte's line: lines end in LF, CRLF or a CR alone (a
    file of CR line ends had every bad byte on line 1: the review)."""
    before = data[: error.start]
    line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
    return BadUpload(f"the file is not {what} text (line {line})", line=line, what=what)
