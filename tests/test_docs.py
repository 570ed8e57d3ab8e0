"""The README's spec and table references are generated: they cannot drift from the code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check(readme: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "saev_report.docs", str(readme), *extra, "--check"], env=env,
                          capture_output=True, text=True)


def test_readme_reference_matches_the_spec_and_tables() -> None:
    result = _check(ROOT / "README.md")
    assert result.returncode == 0, "README is stale: run `python -m saev_report.docs README.md`\n" + result.stderr


def test_check_notices_a_stale_field_description(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    assert "Images per forward pass." in text
    stale = tmp_path / "README.md"
    stale.write_text(text.replace("Images per forward pass.", "Images per batch.", 1))
    assert _check(stale).returncode == 1


def test_the_stage_lists_come_from_the_stage_registry(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from saev_report.cli import app
    from saev_report.stages import KINDS

    architecture = ROOT / "docs/ARCHITECTURE.md"
    result = _check(ROOT / "README.md", "--architecture", str(architecture))
    assert result.returncode == 0, "docs are stale: run `python -m saev_report.docs README.md --architecture docs/ARCHITECTURE.md`"
    for text in (architecture.read_text(), (ROOT / "README.md").read_text()):
        block = text.split("<!-- BEGIN STAGE LIST -->")[1].split("<!-- END STAGE LIST -->")[0]
        assert [line.split("`")[1] for line in block.splitlines() if line.startswith("| `")] == list(KINDS)
    stale = tmp_path / "ARCHITECTURE.md"
    stale.write_text(architecture.read_text().replace("| `stability` |", "| `stable` |", 1))
    assert _check(ROOT / "README.md", "--architecture", str(stale)).returncode == 1
    import typer

    build = typer.main.get_command(app).commands["build"]
    assert " → ".join(KINDS) + " → tables → site" in build.help
    [only] = [p for p in build.params if p.name == "only"]
    assert only.help.endswith(", ".join(KINDS) + ".")
    assert "stability" in CliRunner().invoke(app, ["build", "--help"]).output
