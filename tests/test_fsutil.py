"""fsutil: atomic writes, folder swaps, and a full disk reported with its errno and file."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saev_report import fsutil
from saev_report.activations import ActivationStore, ShardWriter, StoreMeta


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=st.binary(max_size=300), new=st.binary(max_size=300), fail_after=st.none() | st.integers(0, 300))
def test_atomic_write_gives_the_old_or_the_new_file_never_a_mix(tmp_path: Path, old: bytes, new: bytes, fail_after: int | None) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(old)

    def write(f) -> None:
        if fail_after is not None and fail_after < len(new):
            f.write(new[:fail_after])
            raise RuntimeError("killed mid-write")
        f.write(new)

    failed = fail_after is not None and fail_after < len(new)
    if failed:
        with pytest.raises(RuntimeError):
            fsutil.atomic_write(path, write)
    else:
        fsutil.atomic_write(path, write)
    assert path.read_bytes() == (old if failed else new)
    assert _listing(tmp_path) == ["f.bin"]  # no temp file left either way


def test_atomic_write_creates_folders_and_text(tmp_path: Path) -> None:
    path = fsutil.atomic_write_text(tmp_path / "a/b/c.json", "{}")
    assert path.read_text() == "{}"


def test_a_short_write_without_errno_becomes_enospc_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shard.npy"
    path.write_bytes(b"before")

    def short(f) -> None:
        f.write(b"half")
        raise OSError("393216 requested and 247744 written")  # numpy's tofile on a full disk

    with pytest.raises(OSError) as info:
        fsutil.atomic_write(path, short)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(path)
    assert "393216 requested" in str(info.value)
    assert path.read_bytes() == b"before" and _listing(tmp_path) == ["shard.npy"]


def test_other_os_errors_keep_their_errno_and_gain_the_file_name(tmp_path: Path) -> None:
    def broken(f) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError) as info:
        fsutil.atomic_write(tmp_path / "x", broken)
    assert info.value.errno == errno.EIO and info.value.filename == str(tmp_path / "x")
    with pytest.raises(ValueError):  # not an OSError: untouched
        fsutil.atomic_write(tmp_path / "x", lambda f: (_ for _ in ()).throw(ValueError("bug")))


def test_swap_dir_replaces_the_folder_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target, new = tmp_path / "site", tmp_path / ".site.partial"
    new.mkdir()
    (new / "index.html").write_text("one")
    fsutil.swap_dir(new, target)  # no old folder yet
    assert (target / "index.html").read_text() == "one"
    new.mkdir()
    (new / "index.html").write_text("two")
    fsutil.swap_dir(new, target)
    assert (target / "index.html").read_text() == "two"
    assert _listing(tmp_path) == ["site"]


def test_remove_temp_files_removes_only_atomic_write_leftovers(tmp_path: Path) -> None:
    (tmp_path / ".meta.json.k3j2.tmp").write_text("{")
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "notes.tmp").write_text("mine")  # not a name atomic_write makes
    assert [p.name for p in fsutil.remove_temp_files(tmp_path)] == [".meta.json.k3j2.tmp"]
    assert _listing(tmp_path) == ["meta.json", "notes.tmp"]


class SafetensorError(Exception):
    """Stands in for safetensors' exception type, which carries no errno."""


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device", "/runs/demo/x.parquet"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        OSError("393216 requested and 247744 written"),
        SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
    ],
)
def test_disk_full_recognises_every_way_libraries_say_it(exc: Exception) -> None:
    found = fsutil.disk_full(exc)
    assert found is not None and found.errno in (errno.ENOSPC, errno.EDQUOT)
    try:  # also when wrapped by a library that re-raises
        raise RuntimeError("stage failed") from exc
    except RuntimeError as wrapped:
        assert fsutil.disk_full(wrapped) is not None


@pytest.mark.parametrize("exc", [OSError(errno.EACCES, "Permission denied"), ValueError("28 things"), RuntimeError("boom")])
def test_disk_full_ignores_other_errors(exc: Exception) -> None:
    assert fsutil.disk_full(exc) is None


def test_full_folder_prefers_the_destination_then_the_fullest_fallback(tmp_path: Path) -> None:
    copy_error = OSError(errno.ENOSPC, "No space left on device", "/usr/lib/plotly.min.js", None, str(tmp_path / "site/assets/plotly.min.js"))
    assert fsutil.full_folder(copy_error, []) == tmp_path / "site/assets"
    assert fsutil.full_folder(OSError(errno.ENOSPC, "x", str(tmp_path / "a.parquet")), []) == tmp_path
    assert fsutil.full_folder(OSError(errno.ENOSPC, "x"), [tmp_path / "absent", tmp_path]) == tmp_path


# --------------------------------------------------------------------------- a real full disk (root only)


@pytest.fixture()
def small_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs, or a skip where mounting is not allowed (not root, a container)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _meta() -> StoreMeta:
    layout = SimpleNamespace(n_cls=0, n_registers=0, grid=(4, 4))
    return StoreMeta.create(model="m", layer=1, dataset="d", d_model=64, dtype="float32", token_kinds=["patches"], layout=layout)


def test_a_full_tmpfs_fails_with_enospc_and_resumes_to_identical_shards(small_tmpfs: Path, tmp_path: Path) -> None:
    from saev_report.sae import SparseAutoencoder, save_sae

    acts = torch.randn(64, 16, 64, generator=torch.Generator().manual_seed(0))  # 256 KiB in float32
    indices = np.arange(64)
    clean = tmp_path / "clean"
    writer = ShardWriter(clean, _meta(), 8)
    writer.add(indices, acts)
    writer.close()

    (small_tmpfs / "ballast").write_bytes(b"\0" * (900 << 10))  # leave ~120 KiB free
    full = small_tmpfs / "store"
    writer = ShardWriter(full, _meta(), 8)
    with pytest.raises(OSError) as info:
        for start in range(0, 64, 8):
            writer.add(indices[start:start + 8], acts[start:start + 8])
    assert fsutil.disk_full(info.value) is not None
    assert Path(info.value.filename).parent == full  # names the folder that filled up
    with pytest.raises(OSError) as info:  # safetensors too reports it with an errno now
        save_sae(SparseAutoencoder(64, 4096), small_tmpfs / "sae")
    assert info.value.errno == errno.ENOSPC

    (small_tmpfs / "ballast").unlink()  # space returns: the same writer settings resume
    resumed = ShardWriter(full, _meta(), 8)
    resumed.add(indices[resumed.n_images_done:], acts[resumed.n_images_done:])
    resumed.close()
    assert not [p for p in full.iterdir() if p.name.endswith(fsutil.TMP_SUFFIX)]
    assert sorted(p.name for p in full.iterdir()) == sorted(p.name for p in clean.iterdir())
    for shard in clean.glob("shard-*.npy"):
        assert (full / shard.name).read_bytes() == shard.read_bytes()
    np.testing.assert_array_equal(np.asarray(ActivationStore(full).image_indices), np.asarray(ActivationStore(clean).image_indices))
