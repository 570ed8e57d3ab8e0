"""The CLI: exit codes, read-only query, formats, help, and missing models."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from saev_report.cli import app
from saev_report.tables import write_table

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
