"""The CLI: exit codes, read-only query, formats, help, and missing models."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from saev_report.cli import app
from saev_report.render.synthetic import SyntheticRun, SyntheticSAE, write_synthetic_run
from saev_report.tables import TABLES, query, write_table

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    rows = [{"sae_id": "m/L1/x", "feature": i, "freq": i / 10, "label_purity": 1 - i / 10, "top_label": f"<b>{i}</b>", "dead": False} for i in range(5)]
    write_table(tmp_path / "tables/features/a.parquet", "features", rows, "h")
    return tmp_path


def test_help_explains_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("build", "validate", "schema", "plan", "query", "ls", "render"):
        assert command in result.output
    build_help = runner.invoke(app, ["build", "--help"]).output
    assert "resume" in build_help


def test_query_formats(run_dir: Path, tmp_path: Path) -> None:
    sql = "SELECT feature, top_label FROM features ORDER BY label_purity DESC LIMIT 2"
    as_json = runner.invoke(app, ["query", str(run_dir), sql, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == [{"feature": 0, "top_label": "<b>0</b>"}, {"feature": 1, "top_label": "<b>1</b>"}]
    as_csv = runner.invoke(app, ["query", str(run_dir), sql, "-f", "csv"])
    assert as_csv.output.splitlines()[0] == '"feature","top_label"'
    out = tmp_path / "x.parquet"
    assert runner.invoke(app, ["query", str(run_dir), sql, "-f", "parquet", "-o", str(out)]).exit_code == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 2
    table = runner.invoke(app, ["query", str(run_dir), sql])
    assert "feature" in table.output and table.exit_code == 0


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """Every table, list columns included (synthetic values)."""
    run = tmp_path_factory.mktemp("full")
    write_synthetic_run(run, SyntheticRun(saes=[SyntheticSAE("dino", 12), SyntheticSAE("clip", 12, seed=1)], n_images=6, image_px=32, grid=(3, 3), top_k=3, experiments=True))
    return run


@pytest.mark.parametrize("table", sorted(TABLES))
@pytest.mark.parametrize("fmt", ["table", "csv", "json", "parquet"])
def test_every_table_in_every_format(full_run: Path, tmp_path: Path, table: str, fmt: str) -> None:
    import pyarrow.parquet as pq

    expected = query(full_run, f"SELECT * FROM {table}")
    assert expected.num_rows > 0, f"the fixture has no {table} rows"
    out = tmp_path / f"out.{fmt}"
    result = runner.invoke(app, ["query", str(full_run), f"SELECT * FROM {table}", "-f", fmt, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    if fmt == "parquet":
        assert pq.read_table(out).to_pylist() == expected.to_pylist()
    elif fmt == "json":
        rows = json.loads(out.read_text())
        assert len(rows) == expected.num_rows and list(rows[0]) == expected.column_names
    elif fmt == "csv":
        import csv

        rows = list(csv.DictReader(out.open()))
        assert len(rows) == expected.num_rows and list(rows[0]) == expected.column_names
        for name in expected.column_names:  # list cells are JSON arrays that read back
            if expected.schema.field(name).type.num_fields:
                cells = [json.loads(r[name]) if r[name] else None for r in rows]
                assert cells == expected.column(name).to_pylist()  # floats print exactly (repr)
    else:
        text = out.read_text()
        assert text.startswith("┌") and expected.column_names[0] in text


def test_wide_results_show_the_columns_that_fit_and_count_the_rest(full_run: Path) -> None:
    result = runner.invoke(app, ["query", str(full_run), "SELECT * FROM edits"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    n_columns = len(TABLES["edits"].columns)
    assert f"{n_columns} columns" in result.output and "shown)" in result.output
    assert "edit_id" in result.output  # the first columns are there, with their values
    assert query(full_run, "SELECT edit_id FROM edits LIMIT 1").column("edit_id")[0].as_py()[:20] in result.output


def test_query_bounds_end_with_a_message_and_exit_1(full_run: Path) -> None:
    forever = "SELECT count(*) FROM exemplars a, exemplars b, exemplars c, range(1000000000000) d"
    result = runner.invoke(app, ["query", str(full_run), forever, "--timeout", "0.5"])
    assert result.exit_code == 1, result.output
    assert "stopped after 0.5 s" in result.output and "--timeout" in result.output
    assert "Traceback" not in result.output
    hungry = "SELECT count(DISTINCT range * 7919 % 1000000007) FROM range(30000000)"
    result = runner.invoke(app, ["query", str(full_run), hungry, "--memory-limit", "32MB", "--timeout", "0"])
    assert result.exit_code == 1, result.output
    assert "--memory-limit" in result.output and "32MB" in result.output


def test_explain_analyze_cannot_write_into_the_tables(full_run: Path) -> None:
    part = sorted((full_run / "tables/saes").glob("*.parquet"))[0]
    before = {p: p.read_bytes() for p in (full_run / "tables").rglob("*") if p.is_file()}
    result = runner.invoke(app, ["query", str(full_run), f"EXPLAIN ANALYZE COPY (SELECT * FROM saes) TO '{part}'"])
    assert result.exit_code == 2, result.output
    assert {p: p.read_bytes() for p in (full_run / "tables").rglob("*") if p.is_file()} == before


def test_query_write_is_refused_with_exit_2(run_dir: Path) -> None:
    result = runner.invoke(app, ["query", str(run_dir), "DELETE FROM features"])
    assert result.exit_code == 2
    assert "read-only" in result.output
    assert "Traceback" not in result.output
    again = runner.invoke(app, ["query", str(run_dir), "SELECT count(*) AS n FROM features", "-f", "json"])
    assert json.loads(again.output) == [{"n": 5}]


def test_ls_lists_tables(run_dir: Path) -> None:
    result = runner.invoke(app, ["ls", str(run_dir)])
    assert result.exit_code == 0
    assert "features" in result.output and "exemplars" in result.output


def test_plan_prints_estimates() -> None:
    result = runner.invoke(app, ["plan", str(ROOT / "specs/clip_vs_dino.yaml")])
    assert result.exit_code == 0, result.output
    assert "722.1 GiB" in result.output
    assert "record/clip" in result.output


def test_missing_model_fails_fast_with_exit_3(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"run: {{name: m, out_dir: {tmp_path}}}\n"
        "datasets: {d: {kind: image_folder, root: " + str(tmp_path) + ", labels: none}}\n"
        "models: {m: {family: hf, source: facebook/not-a-cached-model, layers: [3], n_layers: 12}}\n"
        "record: {dataset: d}\n"
    )
    (tmp_path / "a.png").write_bytes(b"")  # a corrupt image: must not matter, the model fails first
    started = time.perf_counter()
    result = runner.invoke(app, ["build", str(spec)])
    assert result.exit_code == 3, result.output
    assert "not-a-cached-model" in result.output
    assert "Traceback" not in result.output
    assert time.perf_counter() - started < 120  # generous: it must not wait on a hub


class _SafetensorError(Exception):
    """Stands in for safetensors' error type, which drops the errno."""


@pytest.mark.parametrize(
    ("raised", "folder"),
    [
        (lambda run: OSError(28, "No space left on device", str(run / "cache/record/x/shard-00003.npy")), "cache/record/x"),
        (lambda run: OSError(28, "No space left on device", "/usr/lib/plotly.min.js", None, str(run / "site/assets/plotly.min.js")), "site/assets"),
        (lambda run: OSError("393216 requested and 247744 written"), ""),  # numpy: no errno, no file
        (lambda run: _SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"), ""),
    ],
)
@pytest.mark.parametrize("command", ["build", "render"])
def test_a_full_disk_ends_in_one_message_naming_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised, folder: str, command: str) -> None:
    from saev_report import pipeline

    spec = tmp_path / "s.yaml"
    spec.write_text(f"run: {{name: r, out_dir: {tmp_path}}}\ndatasets: {{d: {{kind: demo}}}}\nmodels: {{m: {{family: imgfocus, layers: [3]}}}}\nrecord: {{dataset: d}}\n")
    run = tmp_path / "r"
    run.mkdir()
    monkeypatch.setenv("SAEV_REPORT_CACHE", str(tmp_path / "cache"))  # same file system: the run folder is named

    def fill_up(*args, **kwargs):
        try:
            raise raised(run)
        except Exception as exc:
            raise RuntimeError("a stage wrapped it") from exc

    monkeypatch.setattr(pipeline, "build", fill_up)
    monkeypatch.setattr(pipeline, "render_site", fill_up)
    result = runner.invoke(app, [command, str(spec)])
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())  # rich wraps long lines
    assert "no space left" in message and "run the same command again" in message
    assert str(run / folder).rstrip("/") in message.replace("\n", "")
    assert "Traceback" not in result.output and result.output.count("error:") == 1


def test_other_failures_are_not_taken_for_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from saev_report import pipeline

    spec = tmp_path / "s.yaml"
    spec.write_text(f"run: {{name: r, out_dir: {tmp_path}}}\ndatasets: {{d: {{kind: demo}}}}\nmodels: {{m: {{family: imgfocus, layers: [3]}}}}\nrecord: {{dataset: d}}\n")
    monkeypatch.setattr(pipeline, "render_site", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied", "x")))
    result = runner.invoke(app, ["render", str(spec)])
    assert isinstance(result.exception, PermissionError)  # not swallowed, not renamed


def test_check_prints_verdicts_and_gates_on_them(full_run: Path, tmp_path: Path) -> None:
    from saev_report.tables import write_table

    verdict = query(full_run, "SELECT verdict FROM claims").column("verdict")[0].as_py()
    assert verdict == "inconclusive"  # three images a concept: the smallest sign-flip p is 1/8
    result = runner.invoke(app, ["check", str(full_run)])
    assert result.exit_code == 0, result.output
    assert "synthetic" in result.output and "inconclusive" in result.output and "corrected family" in result.output
    strict = runner.invoke(app, ["check", str(full_run), "--strict"])
    assert strict.exit_code == 1 and "do not hold" in strict.output
    failing = tmp_path / "failing"
    row = query(full_run, "SELECT * FROM claims").to_pylist()[0]
    write_table(failing / "tables" / "claims" / "part-0.parquet", "claims", [{**row, "verdict": "fails"}], "test")
    result = runner.invoke(app, ["check", str(failing)])
    assert result.exit_code == 1 and "fail" in result.output


def test_check_without_claims_or_a_run_exits_2(run_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", str(run_dir)])
    assert result.exit_code == 2 and "no claims" in " ".join(result.output.split())
    assert runner.invoke(app, ["check", str(tmp_path / "no-such-run")]).exit_code == 2
