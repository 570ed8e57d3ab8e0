"""The README's spec and table references are generated: they cannot drift from the code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check(readme: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "saev_report.docs", str(readme), "--check"], env=env,
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
