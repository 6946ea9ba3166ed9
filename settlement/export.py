"""Files finance staff open directly: Parquet, CSV (UTF-8 with a BOM, for Korean Excel)
and xlsx.

Formula injection: a text cell that begins with = + - @ (or a tab or carriage return)
is run as a formula by spreadsheet programs. Text cells starting so are prefixed with
an apostrophe ('), which Excel shows as text; numbers are written as numbers and never
touched, so a negative amount stays a negative amount. xlsx files are written with
strings_to_formulas off, and the same prefix for the CSV's sake of consistency.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import xlsxwriter

from eum.textfiles import FORMULA_LEADS

FORMULA_PREFIXES = FORMULA_LEADS
BOM = "\ufeff".encode("utf-8")
XLSX_ROWS_MAX = 1_048_575  # Excel's sheet limit, less the header


def neutralise(frame: pl.DataFrame) -> pl.DataFrame:
    """Text columns made safe for spreadsheets; list columns joined with spaces."""
    exprs = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.List):  # joined into text first: the joined text is checked too
            text = pl.col(name).cast(pl.List(pl.String)).list.join(" ")
        elif dtype in (pl.String, pl.Categorical) or isinstance(dtype, (pl.Enum, pl.Categorical)):
            text = pl.col(name).cast(pl.String)
        else:
            continue
        risky = pl.any_horizontal([text.str.starts_with(p) for p in FORMULA_PREFIXES])
        exprs.append(pl.when(risky).then(pl.lit("'") + text).otherwise(text).alias(name))
    return frame.with_columns(exprs) if exprs else frame


def csv_bytes(frame: pl.DataFrame) -> bytes:
    """UTF-8 with a BOM, so that Excel in Korea reads Hangul right."""
    buffer = io.BytesIO()
    neutralise(frame).write_csv(buffer, include_bom=False)
    return BOM + buffer.getvalue()


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    plain = frame.with_columns(pl.col(n).cast(pl.String) for n, t in frame.schema.items() if isinstance(t, pl.Enum))
    plain.write_parquet(buffer, compression="zstd")
    return buffer.getvalue()


class XlsxRowsExceeded(ValueError):
    """More rows than one xlsx sheet holds."""


def xlsx_bytes(sheets: dict[str, pl.DataFrame]) -> bytes:
    """One sheet per frame; Int64 money as numbers with a thousands separator."""
    buffer = io.BytesIO()
    book = xlsxwriter.Workbook(buffer, {"in_memory": True, "strings_to_formulas": False,
                                        "strings_to_urls": False, "strings_to_numbers": False})
    header = book.add_format({"bold": True, "bg_color": "#e8eef7", "border": 1})
    money = book.add_format({"num_format": "#,##0"})
    for title, frame in sheets.items():
        if frame.height > XLSX_ROWS_MAX:
            raise XlsxRowsExceeded(f"sheet {title!r} has {frame.height} rows; xlsx holds {XLSX_ROWS_MAX}: use CSV or "
                                "Parquet")
        sheet = book.add_worksheet(title[:31])
        safe = neutralise(frame)
        for col, name in enumerate(safe.columns):
            sheet.write_string(0, col, name, header)
            sheet.set_column(col, col, max(12, min(40, len(name) + 2)))
        numeric = [dtype.is_integer() or dtype.is_float() for dtype in safe.dtypes]
        for row_index, row in enumerate(safe.iter_rows(), start=1):
            for col, value in enumerate(row):
                if value is None:
                    continue
                if numeric[col]:
                    sheet.write_number(row_index, col, value, money)
                elif isinstance(value, bool):
                    sheet.write_boolean(row_index, col, value)
                else:
                    sheet.write_string(row_index, col, str(value))
        sheet.freeze_panes(1, 0)
        if safe.width:
            sheet.autofilter(0, 0, max(safe.height, 1), safe.width - 1)
    book.close()
    return buffer.getvalue()


def write(frame: pl.DataFrame, path: Path, sheet: str = "data") -> Path:
    """Write by the file's extension: .parquet, .csv or .xlsx."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        data = parquet_bytes(frame)
    elif suffix == ".csv":
        data = csv_bytes(frame)
    elif suffix == ".xlsx":
        data = xlsx_bytes({sheet: frame})
    else:
        raise ValueError(f"unknown output format {suffix!r}: use .parquet, .csv or .xlsx")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
