"""Atomic files and folder swaps: the one place that decides when data reaches the disk.

The fsync policy, for every module that writes outputs:

- A file is written under a temporary name in its own folder
  (`.<name>.<random>.tmp`), flushed and fsynced, renamed over its final name,
  and then the folder is fsynced so that the rename itself survives a crash.
  Readers therefore see the old file or the new one, never half of one.
- A folder is swapped in (`swap_dir`) by renaming it over the old one and
  fsyncing the parent. The files inside are as durable as whoever wrote them
  made them: stage outputs are written with `atomic_write`; a rendered site
  can always be rendered again from the tables.

Failures that libraries report without an errno (numpy's `N requested and M
written`, safetensors' `os error 28`) become `OSError(ENOSPC)` naming the file,
so that the CLI can say which folder filled up (`disk_full`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

TMP_SUFFIX = ".tmp"

# Ignored when fsyncing a folder: the file system cannot (Windows, some network mounts),
# which is not a reason to fail a build. ENOSPC and EIO are never ignored.
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR}
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# What libraries that drop the errno say instead (numpy's tofile, Rust's io::Error in safetensors).
_NO_SPACE_TEXT = re.compile(r"No space left on device|os error 28|code: 28\b|StorageFull|\d+ requested and \d+ written", re.IGNORECASE)


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (renames, new files) durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in _FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    return Path(tmp)


def _with_filename(exc: OSError, path: Path) -> OSError:
    """The same failure, naming `path`; a short write without errno counts as a full disk."""
    code = exc.errno
    if code is None and _NO_SPACE_TEXT.search(str(exc)):
        code = errno.ENOSPC
    if code is None:
        return exc
    message = exc.strerror or os.strerror(code)
    if exc.errno is None:
        message = f"{os.strerror(code)} ({exc})"
    return OSError(code, message, str(path))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` for a library that writes by file name; on
    success fsync it, rename it over `path` and fsync the folder; on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        named = _with_filename(exc, path)
        if named is exc:
            raise
        raise named from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` through `write(binary file)` atomically and durably (see the module policy)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
    return Path(path)


def atomic_write_bytes(path: Path, data: bytes | bytearray | memoryview) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def remove_temp_files(directory: Path) -> list[Path]:
    """Delete the temporary files a killed `atomic_write` left in `directory` (not recursive).

    Only for a folder that one writer owns at a time: another writer's file in flight would go too.
    """
    removed = sorted(Path(directory).glob(f".*{TMP_SUFFIX}"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def swap_dir(new: Path, target: Path) -> None:
    """Replace folder `target` by folder `new` (same parent): readers see the old folder or the
    new one, never a mix; the old one is deleted afterwards."""
    new, target = Path(new), Path(target)
    fsync_dir(new)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def disk_full(exc: BaseException) -> OSError | None:
    """The out-of-space error behind `exc` (itself, a cause or a context), or None.

    Libraries report a full disk in several ways: errno ENOSPC/EDQUOT, numpy's short-write
    message, safetensors' `os error 28`. The result always carries an errno of ENOSPC or
    EDQUOT; its `filename` is the file being written when one is known.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE_ERRNOS:
            return current
        if _NO_SPACE_TEXT.search(str(current)):
            filename = getattr(current, "filename", None)
            return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({current})", filename)
        current = current.__cause__ or current.__context__
    return None


def full_folder(error: OSError, fallbacks: list[Path]) -> Path:
    """The folder that filled up: where the failed write went (shutil puts the destination in
    `filename2`), else the first fallback folder on the file system with the least free space."""
    for name in (getattr(error, "filename2", None), error.filename):
        if name:
            path = Path(os.fsdecode(name))
            return path if path.is_dir() else path.parent
    existing = [p for p in fallbacks if p.exists()]
    if not existing:
        return fallbacks[0] if fallbacks else Path.cwd()
    by_device: dict[int, Path] = {}
    for path in existing:  # the first fallback on each file system stands for it
        by_device.setdefault(path.stat().st_dev, path)
    return min(by_device.values(), key=lambda p: shutil.disk_usage(p).free)
