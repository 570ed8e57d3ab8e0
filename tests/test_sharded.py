"""Record and train across ranks: store merges, and real 2-rank gloo builds under torchrun against
one-process builds (stores byte-identical, SAEs and tables equal; DDP within float tolerance; a
killed recording resumes per rank)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from gloo import run_on_ranks
from saev_report.activations import ShardWriter, StoreMeta
from saev_report.backbones import TokenLayout
from saev_report.sae import load_sae
from saev_report.sharded import merge_stores

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- merge_stores


def _meta() -> StoreMeta:
    layout = TokenLayout(n_cls=1, n_registers=0, grid=(1, 2))
    return StoreMeta.create(model="m", layer=1, dataset="d", d_model=4, dtype="bfloat16", token_kinds=["cls", "patches"],
                            layout=layout)


def _write(store: Path, images: list[int], acts_itd: torch.Tensor, skipped: list[int], per_shard: int = 3) -> Path:
    writer = ShardWriter(store, _meta(), per_shard)
    for i in sorted(images + skipped):
        if i in skipped:
            writer.skip(i, f"{i}.png", "corrupt")
        else:
            writer.add([i], acts_itd[i:i + 1])
    writer.close()
    return store


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


@pytest.mark.parametrize("skipped", [[], [13], [2, 4]], ids=["aligned", "last-rank-skips", "first-rank-skips"])
def test_merged_parts_equal_one_writer(tmp_path: Path, skipped: list[int]) -> None:
    acts_itd = torch.randn(15, 3, 4)
    ranges = [range(0, 6), range(6, 12), range(12, 15)]  # cut at multiples of 3 images per shard
    parts = [_write(tmp_path / f"part{r}", [i for i in rng if i not in skipped], acts_itd, [i for i in rng if i in skipped])
             for r, rng in enumerate(ranges)]
    one = _write(tmp_path / "one", [i for i in range(15) if i not in skipped], acts_itd, skipped)
    merged = merge_stores(parts, tmp_path / "merged")
    assert _files(merged) == _files(one)
    assert not (tmp_path / "merged.merging").exists()


def test_merge_refuses_different_stores(tmp_path: Path) -> None:
    acts_itd = torch.randn(6, 3, 4)
    a = _write(tmp_path / "a", [0, 1, 2], acts_itd, [])
    b = _write(tmp_path / "b", [3, 4, 5], acts_itd, [], per_shard=2)
    with pytest.raises(ValueError, match="differ"):
        merge_stores([a, b], tmp_path / "merged")


# --------------------------------------------------------------------------- analyse: concept labels on 2 gloo ranks


def _seg_dataset(root: Path):
    from saev_report.datasets import ImageDataset, ImageRecord

    records = []
    for i in range(5):
        image, mask = root / f"{i}.png", root / f"{i}_mask.png"
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
        values = np.zeros((32, 32), dtype=np.uint8)
        values[:, 16:] = i % 3  # right half of the image is class i % 3
        Image.fromarray(values).save(mask)
        records.append(ImageRecord(i, str(image), f"l{i % 2}", str(mask)))
    return ImageDataset("seg", records, classes=["l0", "l1"], seg_classes=["bg", "one", "two"], ignore_index=255)


def _labels_on_rank(rank: int, root: Path) -> tuple[dict, bool]:
    """The concept labels this rank gets, as lists, and whether its patch labels are memory-mapped."""
    from saev_report.stages.analyse import shared_concept_labels

    labels = shared_concept_labels(_seg_dataset(root), (2, 2), 3, root / "stage" / "patch_labels.npy")
    as_lists = {key: np.asarray(value).tolist() if isinstance(value, np.ndarray) else value for key, value in labels.__dict__.items()}
    return as_lists, isinstance(labels.patch_ip, np.memmap)


@pytest.mark.slow
def test_other_ranks_take_rank_0s_concept_labels(tmp_path: Path) -> None:
    from saev_report.concepts import dataset_labels

    ranks = run_on_ranks(_labels_on_rank, 2, tmp_path, tmp_path)
    one = dataset_labels(_seg_dataset(tmp_path), (2, 2), 3)
    want = {key: np.asarray(value).tolist() if isinstance(value, np.ndarray) else value for key, value in one.__dict__.items()}
    for got, memory_mapped in ranks:
        assert got == want and memory_mapped  # the same labels and null permutation; patch labels read from rank 0's file
    assert want["patch_ip"][1] == [0, 1, 0, 1] and sorted(want["null_i"]) == list(range(5))


# --------------------------------------------------------------------------- 2-rank builds (slow)


def _images(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("ab"[i % 2])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def _spec(tmp: Path, name: str, images: Path, seeds: list[int], image_size: int = 112, layers=(2, 3)) -> Path:
    spec = {
        "run": {"name": name, "out_dir": str(tmp / "runs"), "seed": 0, "device": "cpu", "threads": 1},
        "datasets": {"imgs": {"kind": "image_folder", "root": str(images)}},
        "models": {"rand": {"family": "imgfocus", "random_init": True, "layers": list(layers), "image_size": image_size}},
        # float32 at 112 px: 8 images per 1 MiB shard, so 26 images make 4 shards, 2 per rank
        "record": {"dataset": "imgs", "dtype": "float32", "batch_size": 4, "shard_mb": 1},
        "sae": {"expansion": [2], "l1_coeff": [0.0004], "seeds": seeds, "batch_size": 64, "n_patches": 1280,
                "lr_warmup_steps": 5, "l1_warmup_steps": 5},
        # 3 images per analysis batch (8×8 patches each): the ranks scan 12 and 14 of the 26 images
        "analysis": {"top_k": 3, "batch_size": 196},
    }
    path = tmp / f"{name}-{len(seeds)}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SAEV_REPORT_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _build(spec: Path, nproc: int = 1, *extra: str) -> None:
    launch = ["--launcher", "torchrun", "--nproc", str(nproc)] if nproc > 1 else []
    result = subprocess.run([sys.executable, "-m", "saev_report.cli", "build", str(spec), "--no-site", *launch, *extra],
                            env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _stage_files(run: Path, kind: str, pattern: str = "*") -> dict[str, bytes]:
    """Files of a run's finished `kind` stages, keyed without the run-specific paths."""
    out = {}
    for path in sorted((run / "cache" / kind).glob(f"*/{pattern}")):
        stage, *rest = path.relative_to(run / "cache" / kind).parts
        if path.is_file() and not stage.endswith(".partial"):
            out["/".join([stage.rsplit("-", 1)[0], *rest])] = path.read_bytes()
    return out


def _rows(run: Path, kind: str, table: str, drop: tuple[str, ...] = ()) -> list[dict]:
    """Rows of `table` from every finished `kind` stage of the run (both specs' stages, whichever was built last)."""
    parts = [p for p in sorted((run / "cache" / kind).glob(f"*/tables/{table}/*.parquet")) if ".partial" not in str(p)]
    rows = [r for part in parts for r in pq.read_table(part).to_pylist()]
    return sorted(({k: v for k, v in r.items() if k not in drop} for r in rows), key=repr)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same two specs built by one process and by two gloo ranks: a 2-SAE sweep (spread over
    the ranks) and a 1-SAE sweep (data-parallel); the second reuses the first's recording."""
    tmp = tmp_path_factory.mktemp("ranks")
    images = _images(tmp / "images", 26, 40)
    for name, nproc in (("one", 1), ("two", 2)):
        _build(_spec(tmp, name, images, [0, 1]), nproc)
        _build(_spec(tmp, name, images, [7]), nproc, "--only", "train")
    return tmp / "runs" / "one", tmp / "runs" / "two"


@pytest.mark.slow
def test_two_ranks_record_byte_identical_stores(builds: tuple[Path, Path]) -> None:
    one, two = builds
    for layer in (2, 3):
        stores = [_stage_files(run, "record", f"L{layer}/*") for run in builds]
        assert stores[0] and stores[0] == stores[1]
        assert len([name for name in stores[0] if name.endswith(".npy")]) == 4
    assert not list((two / "cache" / "record").glob("*/ranks"))


@pytest.mark.slow
def test_two_ranks_train_the_sweep_to_identical_saes(builds: tuple[Path, Path]) -> None:
    one, two = builds
    spread = [{k: v for k, v in _stage_files(run, "train", "*s[01]/*").items()} for run in builds]
    assert len(spread[0]) == 2 * 2 * 2 and spread[0] == spread[1]  # 2 layers × 2 SAEs × (weights, config)
    logs = [[r for r in _rows(run, "train", "train_log", drop=("seconds",)) if not r["sae_id"].endswith("s7")] for run in builds]
    assert logs[0] and logs[0] == logs[1]


@pytest.mark.slow
def test_two_ranks_analyse_to_equal_tables(builds: tuple[Path, Path]) -> None:
    one, two = builds
    for table in ("features", "exemplars", "quantile_exemplars", "class_split", "similar_features", "concepts"):
        a, b = _rows(one, "analyse", table), _rows(two, "analyse", table)
        assert a and len(a) == len(b)
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            for key in ra:
                if isinstance(ra[key], float):  # float64 sums merged in another order
                    assert ra[key] == pytest.approx(rb[key], rel=1e-9, nan_ok=True), key
                else:
                    assert ra[key] == rb[key], key
    saes = [{r["sae_id"]: r["n_patches_eval"] for r in _rows(run, "analyse", "saes")} for run in builds]
    assert len(saes[0]) == 4 and saes[0] == saes[1]  # 2 layers × 2 SAEs, each over all 26 images
    assert "rank 1 of 2 scans images 12–26 of 26" in (two / "logs" / "rank-1.log").read_text()  # the second rank did scan


@pytest.mark.slow
def test_data_parallel_sae_matches_one_process_within_float_tolerance(builds: tuple[Path, Path]) -> None:
    one, two = builds
    [dir_one] = (one / "cache" / "train").glob("rand-L2-*/relu-x2-l1_0.0004-s7")
    [dir_two] = (two / "cache" / "train").glob("rand-L2-*/relu-x2-l1_0.0004-s7")
    a, b = load_sae(dir_one), load_sae(dir_two)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        # same batches, same init; only the order of the gradient sums differs (two half-batch
        # sums added over gloo instead of one), and Adam carries that rounding through 20 steps
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_killed_ranks_resume_their_own_shards(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", 40, 256)
    # 224 px: 4 images (one batch) per shard, so a rank writes 5 shards, one at a time
    killed = _spec(tmp_path, "killed", images, [0], image_size=224, layers=(2,))
    proc = subprocess.Popen([sys.executable, "-m", "saev_report.cli", "build", str(killed), "--only", "record", "--no-site",
                             "--launcher", "torchrun", "--nproc", "2"], env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "runs" / "killed" / "cache" / "record"
    while proc.poll() is None and not list(parts.glob("*.partial/ranks/1-of-2/L2/shard-*.npy")):
        time.sleep(0.05)
    assert proc.poll() is None, "the recording finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher
    proc.wait()
    [partial] = parts.glob("*.partial")
    done_before = {r: len(list((partial / "ranks" / f"{r}-of-2" / "L2").glob("shard-*.npy"))) for r in (0, 1)}
    assert 0 < done_before[1] < 5
    _build(killed, 2, "--only", "record")
    _build(_spec(tmp_path, "fresh", images, [0], image_size=224, layers=(2,)), 1, "--only", "record")
    stores = [_stage_files(tmp_path / "runs" / name, "record", "L2/*") for name in ("killed", "fresh")]
    assert len(stores[0]) == 11 and stores[0] == stores[1]  # 10 shards and meta.json
