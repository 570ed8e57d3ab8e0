"""Pipeline mechanics: content keys, skip of complete stages, resume, atomic publishing."""

from __future__ import annotations

from pathlib import Path

import pytest

from saev_report.pipeline import Stage, StageContext, publish_tables, run_stage
from saev_report.spec import parse_spec_text
from saev_report.tables import query, write_table

SPEC = parse_spec_text("run: {name: t}\ndatasets: {d: {kind: demo}}\nmodels: {m: {family: imgfocus, layers: [10]}}\nrecord: {dataset: d}\n")


class Killed(Exception):
    pass


def _writer(calls: list[str], n_parts: int = 3, kill_after: int | None = None):
    """A stage that writes numbered parts, resuming after those already present."""

    def action(ctx: StageContext) -> None:
        calls.append("run")
        for i in range(n_parts):
            part = ctx.work_dir / f"part{i}"
            if part.exists():
                continue
            if kill_after is not None and i == kill_after:
                raise Killed()
            part.write_text(str(i))
        write_table(ctx.work_dir / "tables/saes/p.parquet", "saes", [{"sae_id": "s", "model": "m", "layer": 1}], ctx.spec_hash)

    return action


def test_complete_stage_is_skipped(tmp_path: Path) -> None:
    calls: list[str] = []
    stage = Stage("train", "m-L1", "slice", [], _writer(calls))
    assert run_stage(stage, SPEC, tmp_path, tmp_path, "h") is True
    assert stage.status(tmp_path) == "done"
    assert run_stage(stage, SPEC, tmp_path, tmp_path, "h") is False
    assert calls == ["run"]


def test_key_depends_on_slice_and_dependencies() -> None:
    noop = lambda ctx: None  # noqa: E731
    a1, a2 = Stage("record", "m", "x", [], noop), Stage("record", "m", "y", [], noop)
    assert a1.key != a2.key
    assert Stage("train", "m", "s", [a1], noop).key != Stage("train", "m", "s", [a2], noop).key
    assert Stage("train", "m", "s", [a1], noop).key == Stage("train", "m", "s", [a1], noop).key


def test_killed_resumable_stage_keeps_finished_parts(tmp_path: Path) -> None:
    calls: list[str] = []
    killed = Stage("record", "m", "slice", [], _writer(calls, kill_after=2), resumable=True)
    with pytest.raises(Killed):
        run_stage(killed, SPEC, tmp_path, tmp_path, "h")
    assert killed.status(tmp_path) == "partial"
    partial = killed.partial_dir(tmp_path)
    first_mtime = (partial / "part0").stat().st_mtime_ns
    again = Stage("record", "m", "slice", [], _writer(calls), resumable=True)
    assert again.key == killed.key
    run_stage(again, SPEC, tmp_path, tmp_path, "h")
    out = again.out_dir(tmp_path)
    assert sorted(p.name for p in out.glob("part*")) == ["part0", "part1", "part2"]
    assert (out / "part0").stat().st_mtime_ns == first_mtime  # not redone


def test_killed_plain_stage_restarts_clean(tmp_path: Path) -> None:
    calls: list[str] = []
    killed = Stage("train", "m", "slice", [], _writer(calls, kill_after=1))
    with pytest.raises(Killed):
        run_stage(killed, SPEC, tmp_path, tmp_path, "h")
    (killed.partial_dir(tmp_path) / "garbage").write_text("half-written")
    run_stage(Stage("train", "m", "slice", [], _writer(calls)), SPEC, tmp_path, tmp_path, "h")
    assert not (killed.out_dir(tmp_path) / "garbage").exists()


def test_publish_links_current_parts_and_swaps_atomically(tmp_path: Path) -> None:
    calls: list[str] = []
    stage = Stage("train", "m-L1", "slice", [], _writer(calls))
    run_stage(stage, SPEC, tmp_path, tmp_path, "h")
    publish_tables([stage], tmp_path)
    assert query(tmp_path, "SELECT count(*) AS n FROM saes").column("n").to_pylist() == [1]
    # A stale stage output (old key) is not published.
    stale = Stage("train", "m-L1", "other-slice", [], _writer(calls))
    run_stage(stale, SPEC, tmp_path, tmp_path, "h")
    publish_tables([stage], tmp_path)
    assert query(tmp_path, "SELECT count(*) AS n FROM saes").column("n").to_pylist() == [1]
    assert not (tmp_path / ".tables.staging").exists() and not (tmp_path / ".tables.old").exists()
