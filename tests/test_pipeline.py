"""Pipeline mechanics: skip of complete stages, resume, clean restart, atomic publishing."""

from __future__ import annotations

from pathlib import Path

import pytest

from saev_report.pipeline import publish_tables, run_stage, sweep_run, with_dependencies
from saev_report.stages.base import Inputs, Role, Stage, StageKind, StageOut, StageParams, table_part
from saev_report.tables import query, write_table


class Killed(Exception):
    pass


class PartsParams(StageParams):
    """A toy stage: write `n_parts` numbered files, dying before part `kill_at` if set."""

    tag: str = "slice"
    n_parts: int = 3
    kill_at: int | None = None


CALLS: list[str] = []


def write_parts(params: PartsParams, inputs: Inputs, out_dir: Path) -> None:
    CALLS.append(params.tag)
    for i in range(params.n_parts):
        part = out_dir / f"part{i}"
        if part.exists():
            continue
        if params.kill_at == i:
            raise Killed()
        part.write_text(str(i))
    write_table(table_part(out_dir, "saes"), "saes", [{"sae_id": "s", "model": "m", "layer": 1}], params.digest())


PARTS = StageKind(name="parts", version=1, params=PartsParams, out=StageOut, action=write_parts, writes=("saes",))
RESUMABLE_PARTS = StageKind(name="parts", version=1, params=PartsParams, out=StageOut, action=write_parts, resumable=True, writes=("saes",))


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


def test_complete_stage_is_skipped(tmp_path: Path) -> None:
    stage = Stage(PARTS, "m-L1", PartsParams())
    assert run_stage(stage, tmp_path) is True
    assert stage.status(tmp_path) == "done"
    assert run_stage(stage, tmp_path) is False
    assert CALLS == ["slice"]


def test_killed_resumable_stage_keeps_finished_parts(tmp_path: Path) -> None:
    # What a killed run of this stage left: its first part, in `.partial`.
    killed = Stage(RESUMABLE_PARTS, "m", PartsParams())
    partial = killed.partial_dir(tmp_path)
    partial.mkdir(parents=True)
    (partial / "part0").write_text("0")
    first_mtime = (partial / "part0").stat().st_mtime_ns
    assert killed.status(tmp_path) == "partial"
    run_stage(killed, tmp_path)
    out = killed.out_dir(tmp_path)
    assert sorted(p.name for p in out.glob("part*")) == ["part0", "part1", "part2"]
    assert (out / "part0").stat().st_mtime_ns == first_mtime  # not redone


def test_a_plain_stage_killed_mid_way_restarts_clean(tmp_path: Path) -> None:
    stage = Stage(PARTS, "m", PartsParams())
    stage.partial_dir(tmp_path).mkdir(parents=True)  # what a SIGKILL leaves
    (stage.partial_dir(tmp_path) / "garbage").write_text("half-written")
    run_stage(stage, tmp_path)
    assert not (stage.out_dir(tmp_path) / "garbage").exists()


def test_publish_links_current_parts_and_swaps_atomically(tmp_path: Path) -> None:
    stage = Stage(PARTS, "m-L1", PartsParams())
    run_stage(stage, tmp_path)
    publish_tables([stage], tmp_path)
    assert query(tmp_path, "SELECT count(*) AS n FROM saes").column("n").to_pylist() == [1]
    # A stale stage output (other params, so another key) is not published.
    stale = Stage(PARTS, "m-L1", PartsParams(tag="other"))
    run_stage(stale, tmp_path)
    publish_tables([stage], tmp_path)
    assert query(tmp_path, "SELECT count(*) AS n FROM saes").column("n").to_pylist() == [1]
    assert not (tmp_path / ".tables.staging").exists() and not (tmp_path / ".tables.old").exists()


def test_inputs_reach_the_action_as_typed_outputs(tmp_path: Path) -> None:
    seen: list[StageOut] = []

    def read_input(params: PartsParams, inputs: Inputs, out_dir: Path) -> None:
        seen.append(inputs["upstream"])

    upstream = Stage(PARTS, "up", PartsParams())
    reader = Stage(StageKind(name="reader", version=1, params=PartsParams, out=StageOut, action=read_input, reads={"upstream": Role(StageOut)}), "r",
                   PartsParams(), {"upstream": upstream})
    for stage in with_dependencies([upstream, reader], {"reader"}):
        run_stage(stage, tmp_path)
    assert [s.root for s in seen] == [upstream.out_dir(tmp_path)]
    assert (seen[0].root / "part2").read_text() == "2"


def test_a_failed_plain_stage_leaves_no_partial_but_a_resumable_one_keeps_its_work(tmp_path: Path) -> None:
    plain = Stage(PARTS, "m", PartsParams(kill_at=1))
    with pytest.raises(Killed):
        run_stage(plain, tmp_path)
    assert plain.status(tmp_path) == "todo"  # e.g. a diverged SAE: nothing in it is reusable
    resumable = Stage(RESUMABLE_PARTS, "m", PartsParams(kill_at=1))
    with pytest.raises(Killed):
        run_stage(resumable, tmp_path)
    assert (resumable.partial_dir(tmp_path) / "part0").is_file()


def test_sweep_run_removes_partials_nothing_can_resume(tmp_path: Path) -> None:
    current = Stage(RESUMABLE_PARTS, "m", PartsParams())
    plain = Stage(PARTS, "p", PartsParams())
    stale = Stage(RESUMABLE_PARTS, "m", PartsParams(tag="old-spec"))
    for stage in (current, plain, stale):
        stage.partial_dir(tmp_path).mkdir(parents=True)
    done = Stage(PARTS, "done", PartsParams())
    run_stage(done, tmp_path)
    removed = sweep_run(tmp_path, [current, plain, done])
    assert sorted(removed) == sorted([plain.partial_dir(tmp_path), stale.partial_dir(tmp_path)])
    assert current.status(tmp_path) == "partial" and done.status(tmp_path) == "done"
