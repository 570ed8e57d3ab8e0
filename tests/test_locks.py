"""Locks between processes, and sweeping what killed builds left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from saev_report.locks import RunBusy, cache_entry_lock, leftover_entry, run_lock, sweep_cache

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys
from pathlib import Path
from saev_report.locks import hold
with hold(Path(sys.argv[1]), wait=True, what="test"):
    print("held", flush=True)
    sys.stdin.readline()  # hold until the test says so
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAEV_REPORT_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _holding(lock_file: Path) -> subprocess.Popen:
    holder = _python(HOLDER, str(lock_file))
    assert holder.stdout.readline().strip() == "held"
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.communicate("go\n")
    assert holder.returncode == 0


def test_a_second_build_of_a_run_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    holder = _holding(tmp_path / ".lock")
    try:
        with pytest.raises(RunBusy, match=f"in use by process {holder.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        _release(holder)
    with run_lock(tmp_path):  # free again once the holder is gone
        pass


def test_the_cli_refuses_a_busy_run_with_exit_4_and_no_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(f"run: {{name: r, out_dir: {tmp_path}}}\ndatasets: {{d: {{kind: demo}}}}\n"
                    "models: {m: {family: imgfocus, layers: [10]}}\nrecord: {dataset: d}\n")
    holder = _holding(tmp_path / "r" / ".lock")
    try:
        build = _python("from saev_report.cli import app; app()", "build", str(spec), cwd=tmp_path)
        out, err = build.communicate()
    finally:
        _release(holder)
    assert build.returncode == 4
    assert "is in use by process" in err and "Traceback" not in out + err


def test_a_second_builder_of_a_cache_entry_waits_for_the_first(tmp_path: Path) -> None:
    waiter_code = """
import sys
from pathlib import Path
from saev_report.locks import cache_entry_lock
with cache_entry_lock(Path(sys.argv[1]), "demo-abc"):
    print("got", flush=True)
"""
    holder = _holding(tmp_path / "demo-abc.lock")
    waiter = _python(waiter_code, str(tmp_path))
    try:
        # The waiter says it waits (on stderr, through the log) before blocking on the lock.
        assert "waiting" in waiter.stderr.readline()
    finally:
        _release(holder)
    out, _ = waiter.communicate()
    assert waiter.returncode == 0 and out.strip() == "got"


def test_sweep_removes_leftovers_only_of_entries_nobody_holds(tmp_path: Path) -> None:
    (tmp_path / "demo-aaa.partial-k1x2").mkdir()
    (tmp_path / "demo-aaa.partial-k1x2" / "set").mkdir()
    (tmp_path / "demo-bbb.partial-zz9").mkdir()
    (tmp_path / ".imgfocus-dinov2-s14.safetensors.4242.tmp").write_bytes(b"half")
    (tmp_path / "demo-aaa").mkdir()  # a finished entry
    (tmp_path / "notes.txt").write_text("mine")
    holder = _holding(tmp_path / "demo-bbb.lock")  # its builder is alive
    try:
        removed = sweep_cache(tmp_path)
    finally:
        _release(holder)
    assert sorted(p.name for p in removed) == [".imgfocus-dinov2-s14.safetensors.4242.tmp", "demo-aaa.partial-k1x2"]
    left = {p.name for p in tmp_path.iterdir()}
    assert {"demo-bbb.partial-zz9", "demo-aaa", "notes.txt"} <= left
    assert "demo-aaa.partial-k1x2" not in left


@pytest.mark.parametrize(("name", "entry"), [
    ("demo-1a2b.partial-x_y3", "demo-1a2b"),
    (".imgfocus-dinov2-s14.safetensors.123.tmp", "imgfocus-dinov2-s14.safetensors"),
    ("demo-1a2b", None),
    ("demo-1a2b.lock", None),
    (".hidden.tmp", None),
])
def test_leftover_names_map_to_their_entry(name: str, entry: str | None) -> None:
    assert leftover_entry(name) == entry


def test_a_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    from saev_report.locks import try_hold

    lock = tmp_path / "e.lock"
    holder = _holding(lock)
    assert try_hold(lock) is None  # held: a non-blocking take is refused (so the check below can fail)
    holder.kill()
    holder.wait()
    fd = try_hold(lock)  # SIGKILL drops a flock: never stale, and taking it does not wait
    assert fd is not None
    os.close(fd)
    with cache_entry_lock(tmp_path, "e"):  # the waiting form takes the same file (pytest-timeout bounds a hang)
        assert try_hold(lock) is None


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path: Path) -> None:
    """A DataLoader worker outlives a SIGKILLed build for a while: it must not hold the run lock."""
    import time

    from saev_report.locks import hold, try_hold

    lock = tmp_path / ".lock"
    ready_r, ready_w = os.pipe()
    with hold(lock, wait=False, what="run"):
        child = os.fork()
        if child == 0:  # the orphan-to-be: alive well past its parent's release
            os.write(ready_w, b"1")  # fork hooks have run by now, as in a worker started long before a kill
            time.sleep(3)
            os._exit(0)
        os.read(ready_r, 1)
    try:
        fd = try_hold(lock)
        assert fd is not None, "the forked child kept the lock"
        os.close(fd)
    finally:
        os.waitpid(child, 0)
