"""A table (rows of named columns) as a download: CSV or Parquet, exactly the rows and columns given."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi.responses import Response

ExportFormat = Literal["csv", "parquet"]
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# What a quoted filename may hold as it is (RFC 6266's ASCII fallback); anything else becomes "_".
UNSAFE_IN_FILENAME = re.compile(r"[^A-Za-z0-9._\-+=@()\[\],]")


def cell(value: Any) -> Any:
    """A CSV cell: None is empty, a float keeps every digit, and text that a spreadsheet would run as a formula
    (uploaded labels and ids are anyone's text) is quoted with a leading apostrophe. Spreadsheets skip leading
    blanks before they look for a formula (" =1+1", "\\n@SUM(A1)" run too), so any leading whitespace is looked
    past."""
    if isinstance(value, str) and (value.startswith(FORMULA_STARTS) or value.lstrip().startswith(FORMULA_STARTS)):
        return "'" + value
    return value


def content_disposition(filename: str) -> str:
    """``attachment`` with ``filename`` for any text (RFC 6266, RFC 5987): an ASCII fallback ``filename="..."`` with
    every character outside letters, digits and ``._-+=@()[],`` replaced by ``_`` (no quote, backslash, semicolon or
    line break can end the parameter), and the exact name as ``filename*=UTF-8''<percent-encoded>``, which browsers
    prefer. Latin-1 is all an HTTP header may hold, so an id such as ``café-例#8`` written raw failed the response."""
    fallback = UNSAFE_IN_FILENAME.sub("_", filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def to_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    """RFC 4180 CSV with a header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c)) for c in columns])
    return out.getvalue().encode()


def to_parquet(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    """One Parquet file; each column's type is inferred from its values (all None: a null column)."""
    table = pa.table({c: pa.array([row.get(c) for row in rows]) for c in columns})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def download(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], *, fmt: ExportFormat, name: str) -> Response:
    """The rows as a file to save (``name`` without extension: the format adds it)."""
    body = to_csv(columns, rows) if fmt == "csv" else to_parquet(columns, rows)
    headers = {"Content-Disposition": content_disposition(f"{name}.{fmt}"), "X-Row-Count": str(len(rows))}
    return Response(content=body, media_type=MEDIA_TYPES[fmt], headers=headers)
