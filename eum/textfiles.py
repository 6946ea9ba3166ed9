"""Uploaded text files as staff make them: UTF-8 (with or without a BOM) or CP949
from Korean Excel; and CSV cells made safe for spreadsheets."""

from __future__ import annotations

UPLOAD_BYTES_MAX = 256 * 1024 * 1024
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")


class BadUpload(ValueError):
    pass


def decode_upload(data: bytes) -> str:
    """Text of an upload: UTF-8 (a BOM is dropped), else CP949; anything else is refused."""
    if len(data) > UPLOAD_BYTES_MAX:
        raise BadUpload(f"file larger than {UPLOAD_BYTES_MAX} bytes")
    if b"\x00" in data[:4096]:
        raise BadUpload("binary file (NUL bytes); send CSV text")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp949")
    except UnicodeDecodeError as error:
        raise BadUpload(f"not UTF-8 or CP949 text (byte {error.start})") from None


def safe_cell(value: object) -> object:
    """A cell that a spreadsheet will not run as a formula (OWASP CSV injection)."""
    if isinstance(value, str) and value.startswith(FORMULA_LEADS):
        return "'" + value
    return value
