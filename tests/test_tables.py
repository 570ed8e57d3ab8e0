"""Parquet tables: declared schemas, metadata, and the read-only DuckDB views."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from saev_report import __version__
from saev_report.tables import TABLES, QueryError, check_read_only, query, read_metadata, table_reference_markdown, write_table


def _run(tmp_path: Path) -> Path:
    write_table(tmp_path / "tables/saes/a.parquet", "saes", [{"sae_id": "m/L1/x", "model": "m", "layer": 1, "l0": 12.5, "n_dead": 3}], "hash1")
    write_table(tmp_path / "tables/saes/b.parquet", "saes", [{"sae_id": "r/L1/x", "model": "r", "layer": 1, "l0": 40.0, "n_dead": 0}], "hash1")
    rows = [{"sae_id": "m/L1/x", "feature": i, "freq": i / 10, "label_purity": 1 - i / 10, "dead": i == 0, "hist_counts": [1, 2]} for i in range(5)]
    write_table(tmp_path / "tables/features/a.parquet", "features", rows, "hash1")
    return tmp_path


def test_write_carries_schema_and_metadata(tmp_path: Path) -> None:
    run = _run(tmp_path)
    part = run / "tables/saes/a.parquet"
    assert pq.read_schema(part).names == TABLES["saes"].schema.names
    meta = read_metadata(part)
    assert meta["saev_report.spec_hash"] == "hash1"
    assert meta["saev_report.version"] == __version__
    assert not list(part.parent.glob("*.tmp"))


def test_query_unions_parts_and_answers(tmp_path: Path) -> None:
    run = _run(tmp_path)
    result = query(run, "SELECT model, n_dead FROM saes ORDER BY model").to_pylist()
    assert result == [{"model": "m", "n_dead": 3}, {"model": "r", "n_dead": 0}]
    top = query(run, "SELECT feature FROM features WHERE NOT dead ORDER BY label_purity DESC LIMIT 2").column("feature").to_pylist()
    assert top == [1, 2]


def test_absent_tables_are_empty_views_with_declared_columns(tmp_path: Path) -> None:
    run = _run(tmp_path)
    result = query(run, "SELECT * FROM edits")
    assert result.num_rows == 0
    assert result.column_names == TABLES["edits"].schema.names


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO saes SELECT * FROM saes",
        "WITH a AS (SELECT 1) INSERT INTO saes SELECT * FROM saes",
        "DELETE FROM features",
        "DROP VIEW saes",
        "COPY saes TO 'out.csv'",
        "ATTACH 'other.db'",
        "SELECT 1; DROP VIEW saes",
        "UPDATE features SET freq = 0",
        "PRAGMA version",
        "SET threads = 1",
    ],
)
def test_writes_are_refused(tmp_path: Path, sql: str) -> None:
    run = _run(tmp_path)
    with pytest.raises(QueryError) as info:
        query(run, sql)
    assert "read-only" in str(info.value) or "one statement" in str(info.value)
    assert query(run, "SELECT count(*) AS n FROM saes").column("n").to_pylist() == [2]


def test_sql_cannot_read_other_files(tmp_path: Path) -> None:
    run = _run(tmp_path)
    secret = tmp_path.parent / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(QueryError):
        query(run, f"SELECT * FROM read_csv('{secret}')")


def test_select_like_statements_pass_the_guard() -> None:
    for sql in ["SELECT 1", "WITH a AS (SELECT 1) SELECT * FROM a", "DESCRIBE saes", "SUMMARIZE saes", "EXPLAIN SELECT 1", "FROM saes"]:
        check_read_only(sql)


def test_bad_sql_and_missing_run_are_query_errors(tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="no tables"):
        query(tmp_path, "SELECT 1")
    run = _run(tmp_path)
    with pytest.raises(QueryError, match="parse"):
        query(run, "SELEC 1")
    with pytest.raises(QueryError):
        query(run, "SELECT nope FROM saes")


def test_reference_documents_every_column() -> None:
    md = table_reference_markdown()
    for table in TABLES.values():
        assert f"### `{table.name}`" in md
        for column in table.columns:
            assert f"`{column.name}`" in md and column.doc
