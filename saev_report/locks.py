"""Advisory locks between builds, and the leftovers of killed ones.

Two builds may share a run folder (the same spec started twice) or a shared
cache entry (two runs needing the same demo set or converted weights). Each
takes an exclusive `fcntl.flock` on a lock file first:

- `run_lock(run_dir)`: a second build of the same run is refused at once
  (`RunBusy`, exit 4), naming the process that holds it;
- `cache_entry_lock(cache_dir, entry)`: a second builder of the same entry
  waits, says so, and then finds the entry made.

The kernel drops a flock when its process dies, even by SIGKILL, so a lock is
never stale. Whatever a killed build left behind (`<entry>.partial-*` folders,
`.<entry>.<pid>.tmp` files) is removed by `sweep_cache` under the entry's lock,
so never while its owner is still working.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from saev_report.errors import UserError
from saev_report.progress import log

LOCK_SUFFIX = ".lock"

# Descriptors of the locks this process holds. A forked child (a DataLoader worker, say) would
# share each lock and keep it after its parent is killed, so that the next build is refused
# until the orphan notices; children close their copies at once (the parent's lock stays).
_HELD_FDS: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunBusy(UserError):
    """Another build holds this run folder."""

    exit_code = 4


def _holder(lock_file: Path) -> str:
    try:
        pid = lock_file.read_text(encoding="utf-8").strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid else "another process"


@contextmanager
def hold(lock_file: Path, *, wait: bool, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if needed); wait for it, or raise `RunBusy`."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise RunBusy(f"{what} is in use by {_holder(lock_file)} ({lock_file}); "
                              "wait for it to finish, or stop it and run again (finished work is kept)") from None
            log(f"[yellow]waiting[/] for {_holder(lock_file)}, which is making {what}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD_FDS.add(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        _HELD_FDS.discard(fd)
        os.close(fd)  # releases the lock


def try_hold(lock_file: Path) -> int | None:
    """The lock's fd if it was free (release with `os.close`), else None; never waits."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def run_lock(run_dir: Path):
    """One build (or render) of a run folder at a time; the second is refused."""
    return hold(Path(run_dir) / LOCK_SUFFIX, wait=False, what=f"run {run_dir}")


def cache_entry_lock(cache_dir: Path, entry: str):
    """One builder of a shared-cache entry at a time; the others wait for it."""
    return hold(Path(cache_dir) / f"{entry}{LOCK_SUFFIX}", wait=True, what=f"{entry} in {cache_dir}")


# A killed builder of entry E leaves `E.partial-<random>` (folders) or `.E.<random>.tmp` (files,
# `fsutil.atomic_path`'s temporary names).
_LEFTOVER = re.compile(r"^(?:(?P<dir>.+)\.partial-[^/]+|\.(?P<file>.+)\.[A-Za-z0-9_]+\.tmp)$")


def leftover_entry(name: str) -> str | None:
    """The cache entry a leftover file or folder belongs to, or None if `name` is not a leftover."""
    match = _LEFTOVER.match(name)
    return None if match is None else match.group("dir") or match.group("file")


def sweep_cache(cache_dir: Path, keep: set[str] = frozenset()) -> list[Path]:
    """Remove killed builders' leftovers in `cache_dir`, each under its entry's lock; returns them.

    An entry whose lock another process holds is left alone (its builder may be
    alive and writing); so are leftovers in `keep` (the caller's own).
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    removed = []
    for path in sorted(cache_dir.iterdir()):
        entry = leftover_entry(path.name)
        if entry is None or path.name in keep:
            continue
        fd = try_hold(cache_dir / f"{entry}{LOCK_SUFFIX}")
        if fd is None:
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log(f"  removed {len(removed)} leftover(s) of killed builds from {cache_dir}")
    return removed
