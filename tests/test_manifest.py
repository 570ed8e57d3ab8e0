"""The run manifest: what a build records, the "How this was built" page, rebuilding from the
resolved spec, and `plan` against the measured stages (small real builds on a random-weight ViT)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from saev_report.manifest import LIBRARIES, folder_bytes, measure, read_manifest
from saev_report.spec import content_hash, load_spec, parse_spec_text

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _images(root: Path, n: int = 12, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def _spec(tmp: Path) -> Path:
    spec = {
        "run": {"name": "small", "out_dir": str(tmp / "runs"), "seed": 0, "device": "cpu", "threads": 1},
        "datasets": {"imgs": {"kind": "image_folder", "root": str(_images(tmp / "images")), "n_images": 12}},
        "models": {"rand": {"family": "imgfocus", "random_init": True, "layers": [2], "image_size": 56}},
        "record": {"dataset": "imgs", "dtype": "float32", "batch_size": 4},
        "sae": {"expansion": [2], "l1_coeff": [0.0004], "seeds": [0], "batch_size": 64, "n_patches": 640,
                "lr_warmup_steps": 5, "l1_warmup_steps": 5},
        "analysis": {"top_k": 3},
        "report": {"title": "small <script>alert(1)</script>"},
    }
    path = tmp / "small.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(*args: str, cache: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAEV_REPORT_CACHE": str(cache), "SAEV_REPORT_PROGRESS": "0",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "saev_report.cli", *args], env=env, capture_output=True, text=True, cwd=cwd)


OVERRIDES = ["sae.n_patches=1280", "run.name=smoke"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("manifest")
    spec = _spec(tmp)
    result = _cli("build", str(spec), *[a for o in OVERRIDES for a in ("--set", o)], cache=tmp / "cache")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return spec, tmp / "runs" / "smoke", tmp


CLOCK_COLUMNS = {"train_log": {"seconds"}}
"""Columns that measure the clock, not the result: the one thing a rebuild may change."""


def _tables(run: Path) -> dict[str, list[dict]]:
    """Every published table's rows but the clock columns, in a stable order (parts are named by stage, not by key)."""
    out = {}
    for folder in sorted((run / "tables").iterdir()):
        rows = [{k: v for k, v in r.items() if k not in CLOCK_COLUMNS.get(folder.name, ())}
                for part in sorted(folder.glob("*.parquet")) for r in pq.read_table(part).to_pylist()]
        out[folder.name] = sorted(rows, key=repr)
    return out


def test_the_manifest_records_spec_overrides_versions_device_and_stages(built) -> None:
    spec_path, run, _ = built
    manifest = read_manifest(run)
    spec = load_spec(spec_path, overrides=OVERRIDES)
    assert manifest["overrides"] == OVERRIDES
    assert manifest["spec"] == spec.model_dump(mode="json") and manifest["spec"]["sae"]["n_patches"] == 1280
    assert manifest["spec_hash"] == content_hash(spec)
    env = manifest["environment"]
    assert set(env["libraries"]) == set(LIBRARIES) and env["libraries"]["numpy"] == np.__version__
    assert env["device"]["requested"] == "cpu" and env["device"]["resolved"] == "cpu" and env["device"]["cpu"]
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        assert env["git"]["commit"] == git.stdout.strip()
    stages = {s["name"]: s for s in manifest["stages"]}
    assert set(stages) == {"images/imgs", "record/rand", "train/rand-L2", "analyse/rand-L2"}
    for name, stage in stages.items():
        assert stage["status"] == "ran", name
        assert stage["measured"]["wall_s"] > 0 and stage["measured"]["peak_rss_bytes"] > 10 * 2**20
        out = run / "cache" / stage["kind"] / f"{stage['label']}-{stage['key']}"
        assert stage["measured"]["disk_bytes"] == folder_bytes(out)
    # The stages plan models have estimates; disk is close to exact for them.
    for name in ("record/rand", "train/rand-L2"):
        est = stages[name]["estimate"]
        assert est["device"] == "cpu" and est["seconds"] > 0
        assert est["time_ratio"] == pytest.approx(stages[name]["measured"]["wall_s"] / est["seconds"])
        assert 0.9 < est["disk_ratio"] < 1.2, est
    analyse = stages["analyse/rand-L2"]["estimate"]  # a time estimate; its disk is not modelled
    assert analyse["seconds"] > 0 and analyse["time_ratio"] > 0 and analyse["disk_ratio"] is None
    assert stages["images/imgs"]["estimate"] is None


def test_rebuilding_the_resolved_spec_reproduces_every_table(built, tmp_path: Path) -> None:
    _, run, tmp = built
    before = _tables(run)
    assert before["features"] and before["saes"] and before["images"]
    keys = {s["name"]: s["key"] for s in read_manifest(run)["stages"]}
    resolved = tmp_path / "spec.resolved.yaml"
    shutil.copy(run / "spec.resolved.yaml", resolved)
    assert parse_spec_text(resolved.read_text()).model_dump(mode="json") == read_manifest(run)["spec"]
    moved = tmp_path / "first-run"
    shutil.move(str(run), moved)  # nothing of the first build is left to reuse
    try:
        result = _cli("build", str(resolved), "--no-site", cache=tmp / "cache")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "ran 4 stage(s)" in " ".join(result.stdout.split())
        assert _tables(run) == before
        again = read_manifest(run)
        assert {s["name"]: s["key"] for s in again["stages"]} == keys
        assert again["overrides"] == [] and again["spec"] == read_manifest(moved)["spec"]
    finally:
        shutil.rmtree(run, ignore_errors=True)
        shutil.move(str(moved), run)


def test_a_cached_stage_keeps_the_measurements_of_the_run_that_made_it(built) -> None:
    spec_path, run, tmp = built
    first = {s["name"]: s["measured"] for s in read_manifest(run)["stages"]}
    result = _cli("build", str(spec_path), "--no-site", *[a for o in OVERRIDES for a in ("--set", o)], cache=tmp / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    again = read_manifest(run)
    assert {s["status"] for s in again["stages"]} == {"cached"}
    assert {s["name"]: s["measured"] for s in again["stages"]} == first


def test_plan_shows_estimates_next_to_the_measured_stages(built) -> None:
    spec_path, run, tmp = built
    result = _cli("plan", str(spec_path), *[a for o in OVERRIDES for a in ("--set", o)], cache=tmp / "cache")
    assert result.returncode == 0, result.stderr
    assert "plan against the last build" in result.stdout
    manifest = {s["name"]: s for s in read_manifest(run)["stages"]}
    ratio = manifest["train/rand-L2"]["estimate"]["time_ratio"]
    assert f"{ratio:.3g}×" in result.stdout
    # Without the overrides it is another run, which has not been built: no comparison.
    other = _cli("plan", str(spec_path), cache=tmp / "cache")
    assert "plan against the last build" not in other.stdout


def test_the_site_has_a_how_this_was_built_page(built) -> None:
    _, run, _ = built
    site = run / "site"
    page = (site / "build.html").read_text()
    assert 'href="build.html"' in (site / "index.html").read_text()
    assert (site / "build" / "spec.resolved.yaml").read_text() == (run / "spec.resolved.yaml").read_text()
    assert json.loads((site / "build" / "manifest.json").read_text())["spec_hash"] == read_manifest(run)["spec_hash"]
    assert 'href="build/spec.resolved.yaml" download' in page
    assert "--set sae.n_patches=1280" in page and "record/rand" in page and "numpy" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    import re

    links = [l for l in re.findall(r'(?:href|src)="([^"#]+)"', page) if not l.startswith("data:")]
    assert links and all((site / link).is_file() for link in links), links  # every link of the page resolves
    listing = next((site / "features").rglob("index.html"))
    assert f'href="{"../" * (len(listing.relative_to(site).parts) - 1)}build.html"' in listing.read_text()  # the footer links it


def test_render_keeps_the_page_and_a_failed_build_records_the_failed_stage(built, tmp_path: Path) -> None:
    spec_path, run, tmp = built
    result = _cli("render", str(spec_path), *[a for o in OVERRIDES for a in ("--set", o)], cache=tmp / "cache")
    assert result.returncode == 0, result.stderr
    assert (run / "site" / "build.html").is_file()
    # A model whose weights are not here: the record stage fails (exit 3) after the images stage ran.
    failing = _cli("build", str(spec_path), "--no-site", "--set", "run.name=broken", "--set", "models.rand.random_init=false",
                   "--set", "models.rand.family=hf", "--set", "models.rand.source=facebook/dinov2-small", cache=tmp / "cache")
    assert failing.returncode == 3, failing.stdout + failing.stderr
    stages = {s["name"]: s["status"] for s in read_manifest(run.parent / "broken")["stages"]}
    assert stages == {"images/imgs": "ran", "record/rand": "failed", "train/rand-L2": "not run", "analyse/rand-L2": "not run"}


def test_measure_takes_the_peak_of_its_own_block() -> None:
    big = np.ones(2**25)  # 256 MiB held before the block: not its peak
    del big
    with measure() as small:
        np.ones(2**20).sum()
    with measure() as large:
        np.ones(2**25).sum()  # 256 MiB inside
    assert large.peak_rss_bytes - small.peak_rss_bytes > 200 * 2**20
    assert small.peak_rss_scope == large.peak_rss_scope == ("stage" if sys.platform.startswith("linux") else "process")


def test_the_build_page_in_a_browser(built, browser) -> None:
    from headless import no_xss, open_page, severe

    _, run, _ = built
    logs = open_page(browser, run / "site" / "build.html")
    assert not severe(logs), logs
    no_xss(browser)
    stage_cells = browser.execute_script(
        "return [...document.querySelectorAll('td.mono.nowrap')].map(td => td.textContent)")
    assert stage_cells == [s["name"] for s in read_manifest(run)["stages"]]
    assert "sae:" in browser.execute_script("return document.querySelector('pre').textContent")
