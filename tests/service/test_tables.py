"""The export files' writers, as pure functions: CSV cells and a Parquet round trip."""

from __future__ import annotations

import csv
import io

import pyarrow.parquet as pq

from server.services.tables import content_disposition, to_csv, to_parquet

ROWS = [
    {"example_id": "7", "score": -0.1234567890123456, "label": None, "step": 3},
    {"example_id": '=HYPERLINK("x")', "score": 2.5e-300, "label": "@cat", "step": 4},
]


def test_csv_keeps_every_digit_and_defuses_formulas() -> None:
    text = to_csv(["example_id", "score", "label", "step"], ROWS).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [float(r["score"]) for r in rows] == [r["score"] for r in ROWS]  # every digit survives
    assert rows[0]["label"] == "" and rows[0]["step"] == "3"
    assert rows[1]["example_id"] == '\'=HYPERLINK("x")' and rows[1]["label"] == "'@cat"  # not run as formulas
    assert to_csv(["a"], []).decode() == "a\n"


def test_parquet_round_trip_is_exact_and_typed() -> None:
    table = pq.read_table(io.BytesIO(to_parquet(["example_id", "score", "label", "step"], ROWS)))
    assert table.to_pylist() == ROWS
    assert str(table.schema.field("score").type) == "double" and str(table.schema.field("step").type) == "int64"
    empty = pq.read_table(io.BytesIO(to_parquet(["a"], [])))
    assert empty.num_rows == 0 and empty.column_names == ["a"]


def test_content_disposition_holds_any_name() -> None:
    header = content_disposition('job1-val-example-café-例#8 "x"; y\r\n.csv')
    header.encode("latin-1")  # an HTTP header holds Latin-1 only: a raw 例 failed the response (500)
    assert header == (
        'attachment; filename="job1-val-example-caf_-__8__x___y__.csv"; '
        "filename*=UTF-8''job1-val-example-caf%C3%A9-%E4%BE%8B%238%20%22x%22%3B%20y%0D%0A.csv"
    )


def test_csv_defuses_formulas_after_leading_whitespace() -> None:
    texts = ["  =1+1", "\n@SUM(A1)", "\r\n-2", " \t +3", "\u00a0=x", "\t", "ok = fine", "  plain", "", "3-2"]
    rows = list(csv.reader(io.StringIO(to_csv(["t"], [{"t": t} for t in texts]).decode())))[1:]
    assert [r[0] for r in rows] == [
        *("'" + t for t in texts[:6]),
        *texts[6:],
    ]
