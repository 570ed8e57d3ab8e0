"""End-to-end builds on the real offline model and real photos (slow: still run in CI).

One tiny spec exercises every stage. The kill test SIGKILLs a recording mid-way
and checks that the resumed build ends with byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from saev_report.tables import query

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/data/tiny_e2e.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted weights and the demo set, shared by the builds of this module."""
    shared = os.environ.get("SAEV_REPORT_CACHE")
    return Path(shared) if shared else tmp_path_factory.mktemp("cache")


def _spec(tmp: Path, name: str = "tiny", **record) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["run"]["out_dir"] = str(tmp / "runs")
    data["run"]["name"] = name
    data["record"].update(record)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(args: list[str], cache_dir: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAEV_REPORT_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "SAEV_REPORT_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "saev_report.cli", *args], env=env, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("e2e")
    spec = _spec(tmp)
    result = _cli(["build", str(spec)], cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return spec, tmp / "runs" / "tiny"


def test_build_writes_every_table(built: tuple[Path, Path]) -> None:
    _, run = built
    counts = {t: query(run, f"SELECT count(*) AS n FROM {t}").column("n")[0].as_py() for t in
              ("images", "saes", "train_log", "features", "exemplars", "heads", "matches", "edits")}
    assert counts["saes"] == 4  # 2 models × 2 seeds
    assert counts["heads"] == 2
    assert counts["features"] == 4 * 2 * 384
    assert counts["exemplars"] > 0 and counts["train_log"] > 0 and counts["matches"] > 0 and counts["edits"] > 0
    saes = query(run, "SELECT * FROM saes").to_pylist()
    for row in saes:
        assert 0 < row["fvu"] < 1.5 and row["l0"] > 0 and row["n_patches_eval"] == 48 * 64
    # Concept detection: every (alive or not) feature × concept with support, at both levels of the demo set.
    levels = query(run, "SELECT level, count(DISTINCT concept) AS n, count(*) AS rows, min(support) AS s FROM concepts GROUP BY 1").to_pylist()
    assert {r["level"] for r in levels} == {"patch", "image"}
    for r in levels:
        assert r["s"] > 0 and r["rows"] == 4 * 2 * 384 * r["n"]
    alive = query(run, "SELECT count(*) AS n, count(best_concept) AS named FROM features WHERE NOT dead").to_pylist()[0]
    assert alive["named"] == alive["n"] > 0


def test_rebuild_skips_every_stage(built: tuple[Path, Path], cache_dir: Path) -> None:
    spec, run = built
    before = {p: p.stat().st_mtime_ns for p in (run / "cache").rglob("*") if p.is_file()}
    result = _cli(["build", str(spec), "--no-site"], cache_dir)
    assert result.returncode == 0, result.stderr
    assert "ran 0 stage(s)" in result.stdout.replace("\n", " ")
    after = {p: p.stat().st_mtime_ns for p in (run / "cache").rglob("*") if p.is_file()}
    assert before == after


def test_site_is_built_and_escaped(built: tuple[Path, Path]) -> None:
    _, run = built
    index = (run / "site" / "index.html").read_text()
    assert "<script>alert(1)</script>" not in index
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    assert list((run / "site" / "features").rglob("*.html"))


def test_query_cli_on_a_real_build(built: tuple[Path, Path], cache_dir: Path) -> None:
    _, run = built
    result = _cli(["query", str(run), "SELECT model, n_dead FROM saes ORDER BY model", "-f", "json"], cache_dir)
    assert result.returncode == 0, result.stderr
    assert {r["model"] for r in json.loads(result.stdout)} == {"dinov2", "random"}


def _shard_digests(store: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(store.glob("shard-*.npy"))}


def test_killed_recording_resumes_to_identical_shards(tmp_path: Path, cache_dir: Path, built: tuple[Path, Path]) -> None:
    # Small shards (one batch each) so the kill lands between shards of one stage.
    spec = _spec(tmp_path, name="killed", shard_mb=1, batch_size=8)
    proc = subprocess.Popen([sys.executable, "-m", "saev_report.cli", "build", str(spec), "--only", "record", "--no-site"],
                            env={**os.environ, "SAEV_REPORT_CACHE": str(cache_dir), "SAEV_REPORT_PROGRESS": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial_shards = tmp_path / "runs" / "killed" / "cache" / "record"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(partial_shards.glob("dinov2-*.partial/L10/shard-*.npy"))) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the recording finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(partial_shards.glob("*.partial"))
    resumed = _cli(["build", str(spec), "--only", "record", "--no-site"], cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr + resumed.stdout
    # Reference: the same recording, never interrupted.
    fresh_spec = _spec(tmp_path, name="fresh", shard_mb=1, batch_size=8)
    fresh = _cli(["build", str(fresh_spec), "--only", "record", "--no-site"], cache_dir)
    assert fresh.returncode == 0, fresh.stderr
    for model in ("dinov2", "random"):
        [killed_store] = (tmp_path / "runs/killed/cache/record").glob(f"{model}-*[!l]/L10")
        [fresh_store] = (tmp_path / "runs/fresh/cache/record").glob(f"{model}-*[!l]/L10")
        assert _shard_digests(killed_store) == _shard_digests(fresh_store)
        assert json.loads((killed_store / "meta.json").read_text())["complete"]


def test_page_panel_tables_on_a_real_build(built: tuple[Path, Path]) -> None:
    _, run = built
    n = {t: query(run, f"SELECT count(*) AS n FROM {t}").column("n")[0].as_py() for t in ("quantile_exemplars", "class_split", "similar_features")}
    assert n["similar_features"] == 4 * 2 * 384 * 8  # every feature of the 4 SAEs, 8 neighbours each
    assert n["quantile_exemplars"] > 0 and n["class_split"] > 0
    # every feature page's exemplar images are shared thumbnails: no per-feature pictures
    site = run / "site"
    assert not (site / "img" / "o").exists() and len(list((site / "img" / "t").rglob("*.jpg"))) <= 48 + 48
