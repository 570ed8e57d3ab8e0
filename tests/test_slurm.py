"""Stages as jobs: the job plan and Slurm dependencies, and a real run on submitit's local executor."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from saev_report.graph import build_stages
from saev_report.slurm import FINISH, JobPlan, job_parameters, plan_jobs, submit_build
from saev_report.spec import SlurmSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]


def _demo(tmp_path: Path):
    spec = load_spec(ROOT / "specs/demo.yaml", check_paths=False)
    return spec.model_copy(update={"run": spec.run.model_copy(update={"out_dir": tmp_path})})


def test_every_unfinished_stage_is_a_job_after_its_inputs(tmp_path: Path) -> None:
    spec = _demo(tmp_path)
    stages = build_stages(spec)
    jobs = plan_jobs(stages, spec.run_dir, SlurmSpec(gpus=4))
    assert [j.name for j in jobs] == [s.name for s in stages] + [FINISH]
    by_name = {j.name: j for j in jobs}
    for stage in stages:
        assert set(by_name[stage.name].after) == {d.name for d in stage.deps}
        assert by_name[stage.name].ranks == (4 if stage.kind.parallel else 1)
    assert {s.kind.name for s in stages if s.kind.parallel} == {"record", "train", "analyse", "compare", "stability"}
    assert set(by_name[FINISH].after) == {s.name for s in stages}


def test_finished_stages_are_not_resubmitted(tmp_path: Path) -> None:
    spec = _demo(tmp_path)
    stages = build_stages(spec)
    record = next(s for s in stages if s.kind.name == "record")
    record.out_dir(spec.run_dir).mkdir(parents=True)  # as a finished job leaves it
    jobs = {j.name: j for j in plan_jobs(stages, spec.run_dir, SlurmSpec())}
    assert record.name not in jobs
    assert all(record.name not in j.after for j in jobs.values())
    assert any(s.name in jobs for s in stages if record in s.deps)


def test_slurm_parameters_carry_dependencies_and_resources() -> None:
    slurm = SlurmSpec(partition="gpu", account="lab", gpus=4, cpus_per_gpu=6, mem_gb_per_gpu=32, time_min=90)
    job = JobPlan("train/clip-L11", ("record/clip",), 4)
    params = job_parameters(job, slurm, {"record/clip": "1234"}, "slurm")
    assert params["slurm_additional_parameters"] == {"dependency": "afterok:1234"}
    assert (params["gpus_per_node"], params["tasks_per_node"], params["cpus_per_task"], params["mem_gb"]) == (4, 4, 6, 128)
    assert (params["slurm_partition"], params["slurm_account"], params["timeout_min"]) == ("gpu", "lab", 90)
    local = job_parameters(job, slurm, {"record/clip": "1234"}, "local")
    assert not any(key.startswith("slurm") for key in local) and "gpus_per_node" not in local


@pytest.mark.slow
def test_local_executor_runs_the_stages_as_jobs(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "jobs", "out_dir": str(tmp_path / "runs"), "device": "cpu", "threads": 1},
        "datasets": {"imgs": {"kind": "image_folder", "root": str(tmp_path / "images"), "labels": "none"}},
        "models": {"rand": {"family": "imgfocus", "random_init": True, "layers": [2], "image_size": 28}},
        "record": {"dataset": "imgs", "dtype": "float32", "batch_size": 4},
        "slurm": {"gpus": 2, "cpus_per_gpu": 1, "mem_gb_per_gpu": 1},
    }))
    spec = load_spec(path)
    jobs = submit_build(path, spec, only={"record"}, render=False, cluster="local")
    assert [plan.name for plan, _ in jobs] == ["record/rand", FINISH]
    assert jobs[0][1].results() == [True, True]  # both ranks of the record job ran the stage
    [record] = [s for s in build_stages(spec) if s.kind.name == "record"]
    assert record.status(spec.run_dir) == "done"
    assert record.output(spec.run_dir).store(2).n_images == 10
    again = submit_build(path, spec, only={"record"}, render=False, cluster="local")
    assert [plan.name for plan, _ in again] == [FINISH]  # resubmitting skips the finished stage
