"""A finished run keeps working when the shared cache moves: stage outputs store paths into the
cache relative to it (`datasets.relative_to_cache`) and resolve them against the cache of the build
reading them. Real build on the generated demo set (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SPEC = {
    "run": {"name": "moved", "seed": 0, "device": "cpu", "threads": 1},
    "datasets": {
        "demo": {"kind": "demo", "n_images": 40},  # the head's splits are the same files as the recording
        "demo_train": {"kind": "demo", "n_images": 40, "split": "train"},
        "demo_val": {"kind": "demo", "n_images": 40, "split": "val"},
    },
    "models": {"rand": {"family": "imgfocus", "random_init": True, "layers": [2], "image_size": 56}},
    "record": {"dataset": "demo", "dtype": "float32", "batch_size": 4},
    "sae": {"expansion": [2], "l1_coeff": [0.0004], "seeds": [0], "batch_size": 64, "n_patches": 640,
            "lr_warmup_steps": 5, "l1_warmup_steps": 5},
    "analysis": {"top_k": 3},
}
HEAD = "heads.cat={task: classification, model: rand, train: demo_train, val: demo_val, lrs: [0.001], weight_decays: [0.01], epochs: 2}"


def _build(spec: Path, cache: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAEV_REPORT_CACHE": str(cache), "SAEV_REPORT_PROGRESS": "0",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "saev_report.cli", "build", str(spec), *args], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return " ".join((result.stdout + result.stderr).split())


def test_a_run_built_with_one_cache_reads_its_images_through_another(tmp_path: Path) -> None:
    spec = tmp_path / "moved.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "run": {**SPEC["run"], "out_dir": str(tmp_path / "runs")}}))
    first, second = tmp_path / "cache-a", tmp_path / "cache-b"
    _build(spec, first, "--no-site")
    run = tmp_path / "runs" / "moved"
    [index] = (run / "cache" / "record").glob("rand-*[!l]/images.json")
    stored = [p for _, p in json.loads(index.read_text())["images"]]
    assert stored and all(not os.path.isabs(p) and p.startswith("demo-") for p in stored)  # relative to the cache
    [part] = (run / "cache" / "images").glob("demo-*/tables/images/part.parquet")
    assert all(p.startswith("demo-") for p in pq.read_table(part).column("path").to_pylist())
    shutil.move(str(first), second)  # the cache moves (or another cache holds the same entries)
    # A head added now reads the finished recording: its images are found, not recorded again.
    out = _build(spec, second, "--set", HEAD)
    assert "not in the record dataset" not in out, out
    statuses = {s["name"]: s["status"] for s in json.loads((run / "manifest.json").read_text())["stages"]}
    for reused in ("images/demo", "record/rand", "train/rand-L2", "analyse/rand-L2"):
        assert statuses[reused] == "cached", statuses  # found through the new cache, not redone
    assert statuses["tokens/rand"] == statuses["heads/cat"] == "ran"
    [extra] = (run / "cache" / "tokens").glob("rand-*/extra/images.json")
    assert json.loads(extra.read_text())["images"] == []
    assert "n_missing_images=0" in out.replace(" ", "")  # the site finds every thumbnail through the new cache
    [heads] = (run / "cache" / "heads").glob("cat-*/tables/heads/part.parquet")
    row = pq.read_table(heads).to_pylist()[0]
    assert row["n_train"] == 32 and row["n_val"] == 8
