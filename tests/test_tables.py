"""Parquet tables: declared schemas, metadata, and the read-only DuckDB views."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from saev_report import __version__
from saev_report.tables import TABLES, QueryAborted, QueryError, check_read_only, query, read_metadata, table_reference_markdown, write_table


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


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "sql",
    [
        "EXPLAIN ANALYZE COPY (SELECT * FROM saes) TO '{tables}/saes/x.parquet'",
        "EXPLAIN ANALYZE COPY (SELECT * FROM saes) TO '{tables}/saes/a.parquet'",  # an existing part's name
        "EXPLAIN ANALYZE COPY (SELECT * FROM saes) TO '{cwd}/.tmp/x.csv'",
        "EXPLAIN ANALYZE SELECT * FROM read_parquet('{tables}/saes/a.parquet')",
        "EXPLAIN ANALYZE ATTACH '{tables}/db.duckdb'",
        "EXPLAIN ANALYZE EXPORT DATABASE '{tables}/export'",
        "SELECT * FROM glob('{tables}/*/*')",
    ],
)
def test_no_statement_touches_a_file_whatever_the_parser_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sql: str) -> None:
    run = _run(tmp_path / "run")
    cwd = tmp_path / "cwd"
    (cwd / ".tmp").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    before = _snapshot(tmp_path)
    with pytest.raises(QueryError):
        query(run, sql.format(tables=run / "tables", cwd=cwd))
    assert _snapshot(tmp_path) == before


def test_duckdb_has_no_temp_directory_or_file_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = _run(tmp_path)
    settings = query(run, "SELECT name, value FROM duckdb_settings() WHERE name IN ('temp_directory', 'enable_external_access', 'lock_configuration')")
    assert dict(zip(*settings.to_pydict().values())) == {"temp_directory": "", "enable_external_access": "false", "lock_configuration": "true"}
    assert not (tmp_path / ".tmp").exists()


def test_a_query_that_would_run_forever_stops_at_its_timeout(tmp_path: Path) -> None:
    run = _run(tmp_path)
    forever = "SELECT sum(hash(a.feature, b.range, c.range)) FROM features a, range(100000000000) b, range(100000000000) c"
    with pytest.raises(QueryAborted, match="stopped after 0.5 s"):
        query(run, forever, timeout_s=0.5)
    assert query(run, "SELECT count(*) AS n FROM features").column("n").to_pylist() == [5]


def test_a_query_over_its_memory_limit_stops_instead_of_spilling(tmp_path: Path) -> None:
    run = _run(tmp_path)
    with pytest.raises(QueryAborted, match="more than 32MB"):
        query(run, "SELECT count(DISTINCT range * 7919 % 1000000007) FROM range(30000000)", memory_limit="32MB", timeout_s=None)


def test_parts_missing_a_declared_column_read_it_as_null(tmp_path: Path) -> None:
    import pyarrow as pa

    folder = tmp_path / "tables/saes"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"sae_id": ["old"], "l0": [3.0]}), folder / "old.parquet")  # written before `n_dense` existed
    write_table(folder / "new.parquet", "saes", [{"sae_id": "new", "l0": 4.0, "n_dense": 2}], "h")
    rows = query(tmp_path, "SELECT sae_id, l0, n_dense FROM saes ORDER BY sae_id").to_pylist()
    assert rows == [{"sae_id": "new", "l0": 4.0, "n_dense": 2}, {"sae_id": "old", "l0": 3.0, "n_dense": None}]
