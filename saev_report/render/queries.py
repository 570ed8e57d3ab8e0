"""Read-only DuckDB queries of the site builder, as Arrow tables or plain rows."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import duckdb
import pyarrow as pa

from saev_report import tables

BATCH_ROWS = 2048


def _rel(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> duckdb.DuckDBPyRelation:
    return con.sql(sql, params=list(params)) if params else con.sql(sql)


def fetch_rows(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    return tables.fetch_arrow(_rel(con, sql, params)).to_pylist()


def fetch_table(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> pa.Table:
    return tables.fetch_arrow(_rel(con, sql, params))


def stream_batches(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = (), rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of a query without materialising it (DuckDB keeps insertion order)."""
    rel = _rel(con, sql, params)
    reader = rel.to_arrow_reader(rows) if hasattr(rel, "to_arrow_reader") else rel.fetch_arrow_reader(rows)
    yield from reader
