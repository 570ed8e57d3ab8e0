"""Stages as Slurm jobs through submitit (`saev-report build SPEC --executor slurm`).

Each stage that is not complete becomes one job; the stages it reads become
`afterok` Slurm dependencies, and a last job publishes the tables and renders the
site. A job runs `pipeline.run_stage` on its stage, so the content-hash and
`.partial` protocol is the same as a local build: resubmitting skips finished
stages (they are not even submitted) and resumes interrupted ones (a record job
killed at its time limit keeps its shards). Record, train and analyse jobs get
`SlurmSpec.gpus` tasks, one per GPU, which join one torch.distributed group
(submitit exports the rank, world size and master address).

With submitit's local executor (tests, a workstation) there are no Slurm
dependencies: the submitter waits for a job's inputs to finish before it
submits the job, which runs the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from saev_report.graph import build_stages
from saev_report.pipeline import default_cache_dir, with_dependencies
from saev_report.spec import SlurmSpec, Spec, load_spec
from saev_report.stages import Stage

FINISH = "tables+site"


@dataclass(frozen=True)
class JobPlan:
    """One job to submit: a stage (or the final tables+site step), its resources and what it waits for."""

    name: str
    after: tuple[str, ...]
    ranks: int


def plan_jobs(stage_list: Sequence[Stage], run_dir: Path, slurm: SlurmSpec, only: set[str] | None = None) -> list[JobPlan]:
    """The jobs of a build in submission order: every stage not yet complete, then the finish step.

    A stage waits only for its inputs that are still to run; complete ones are on disk already.
    """
    wanted = with_dependencies(list(stage_list), only) if only else list(stage_list)
    todo = [s for s in wanted if s.status(run_dir) != "done"]
    names = {s.name for s in todo}
    jobs = [JobPlan(s.name, tuple(d.name for d in s.deps if d.name in names), slurm.gpus if s.kind.parallel else 1)
            for s in todo]
    return jobs + [JobPlan(FINISH, tuple(j.name for j in jobs), 1)]


def job_parameters(job: JobPlan, slurm: SlurmSpec, job_ids: dict[str, str], cluster: str) -> dict[str, Any]:
    """submitit `update_parameters` for one job: generic resources, plus Slurm's own settings."""
    params: dict[str, Any] = {
        "name": f"saev-{job.name.replace('/', '-')}",
        "timeout_min": slurm.time_min,
        "nodes": 1,
        "tasks_per_node": job.ranks,
        "cpus_per_task": slurm.cpus_per_gpu,
        "mem_gb": slurm.mem_gb_per_gpu * job.ranks,
    }
    if cluster == "slurm":
        params["gpus_per_node"] = job.ranks if job.name != FINISH else 0
        extra = {"dependency": "afterok:" + ":".join(job_ids[a] for a in job.after)} if job.after else {}
        params["slurm_additional_parameters"] = extra
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
        if slurm.account:
            params["slurm_account"] = slurm.account
    return params


def submit_build(spec_path: Path, spec: Spec, *, only: set[str] | None = None, render: bool = True,
                 cluster: str | None = None, cache_dir: Path | None = None, overrides: tuple[str, ...] = ()) -> list[tuple[JobPlan, Any]]:
    """Submit every unfinished stage of `spec` as a job; returns (plan, submitit job) pairs.

    Each job loads `spec_path` again with the same `--set` `overrides`, so it builds the same stages.

    `cluster`: "slurm", "local" or "debug" (submitit's names); default: Slurm when available.
    """
    import submitit

    cache_dir = cache_dir or default_cache_dir()
    run_dir = spec.run_dir
    executor = submitit.AutoExecutor(folder=run_dir / "slurm" / "%j", cluster=cluster)
    jobs = plan_jobs(build_stages(spec, cache_dir), run_dir, spec.slurm, only)
    submitted: dict[str, Any] = {}
    out = []
    for job in jobs:
        if executor.cluster != "slurm":  # no scheduler to hold the job: wait for its inputs here
            for name in job.after:
                submitted[name].results()
        executor.update_parameters(**job_parameters(job, spec.slurm, {n: j.job_id for n, j in submitted.items()},
                                                    executor.cluster))
        if job.name == FINISH:
            handle = executor.submit(finish_job, str(spec_path), str(cache_dir), render, overrides)
        else:
            handle = executor.submit(stage_job, str(spec_path), job.name, str(cache_dir), overrides)
        submitted[job.name] = handle
        out.append((job, handle))
    return out


def stage_job(spec_path: str, stage_name: str, cache_dir: str, overrides: tuple[str, ...] = ()) -> bool:
    """Body of one stage's job (every task of it): join the job's ranks, run the stage."""
    from saev_report import distributed
    from saev_report.pipeline import run_stage
    from saev_report.runtime import set_threads

    spec = load_spec(Path(spec_path), check_paths=False, overrides=overrides)
    set_threads(spec.run.threads)
    [stage] = [s for s in build_stages(spec, Path(cache_dir)) if s.name == stage_name]
    _export_ranks()
    with distributed.process_group(spec.run.device, log_dir=spec.run_dir / "logs"):
        return run_stage(stage, spec.run_dir)


def finish_job(spec_path: str, cache_dir: str, render: bool, overrides: tuple[str, ...] = ()) -> str:
    """Body of the last job: publish the tables of every complete stage, write the manifest (each
    stage's measurements come from the job that ran it) and render the site."""
    from saev_report.manifest import Provenance, now_utc, build_manifest, write_manifest
    from saev_report.pipeline import publish_tables, render_site

    spec = load_spec(Path(spec_path), check_paths=False, overrides=overrides)
    stage_list = build_stages(spec, Path(cache_dir))
    tables = publish_tables([s for s in stage_list if s.status(spec.run_dir) == "done"], spec.run_dir)
    statuses = {s.name: "ran" if s.status(spec.run_dir) == "done" else "not run" for s in stage_list}
    write_manifest(spec.run_dir, build_manifest(spec, spec.run_dir, stage_list, statuses, Provenance(Path(spec_path), tuple(overrides)),
                                                Path(cache_dir), now_utc()), spec)
    return str(render_site(spec, spec.run_dir, Path(cache_dir)) if render else tables)


def _export_ranks() -> None:
    """RANK, WORLD_SIZE, MASTER_ADDR/PORT of a multi-task job, for `distributed.process_group`."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
