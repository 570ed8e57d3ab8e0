"""Running a build: content-keyed, atomic, resumable stages, then tables and site.

`graph.build_stages` turns the spec into `Stage`s. Each stage's output directory
is `<run>/cache/<kind>/<label>-<key>` (the key hashes the kind's version, its
params and its inputs' keys). A stage works in `<dir>.partial/` and renames it
to `<dir>` when it finishes, so:

- a complete stage is skipped on every later build;
- a killed stage leaves only `.partial`, which the next build resumes (the
  record stage keeps its finished shards) or clears and redoes;
- a changed param gets a new key, so stale outputs are never reused.

A build holds `<run>/.lock` (see `locks.py`), so two builds of one run never
interleave, and starts by clearing leftovers of killed builds.

After the stages, `publish_tables` links the current table parts into
`<run>/tables/` and `render_site` builds `<run>/site/`; both swap their folder
in atomically.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from saev_report import distributed
from saev_report.graph import build_stages
from saev_report.locks import run_lock, sweep_cache
from saev_report.fsutil import fsync_dir, swap_dir
from saev_report.manifest import Provenance, now_utc, build_manifest, measure, write_manifest, write_measurement
from saev_report.progress import log
from saev_report.spec import Spec
from saev_report.errors import UserError
from saev_report.stages import KINDS, Stage


def default_cache_dir() -> Path:
    """Shared cache for converted weights and generated demo data (not per run)."""
    return Path(os.environ.get("SAEV_REPORT_CACHE", Path.home() / ".cache" / "saev-report"))


# --------------------------------------------------------------------------- running


def run_stage(stage: Stage, run_dir: Path) -> bool:
    """Run one stage unless complete; return True when it ran.

    Under torchrun every rank calls this for every stage: rank 0 decides whether the
    stage is needed, prepares and finally publishes its folder; `parallel` kinds run
    their action on every rank (each takes its share), the others on rank 0 alone.
    """
    shard = distributed.current()
    out, partial = stage.out_dir(run_dir), stage.partial_dir(run_dir)
    if distributed.broadcast(out.is_dir()):
        log(f"[green]✓[/] {escape(stage.name)} [dim](cached {out.name})[/]")
        return False
    if shard.is_main:
        if partial.exists() and not stage.kind.resumable:
            shutil.rmtree(partial)  # a half-written non-resumable stage is redone from scratch
        elif partial.exists():
            log(f"[yellow]↻[/] {escape(stage.name)}: resuming interrupted work")
        partial.mkdir(parents=True, exist_ok=True)
    distributed.barrier()  # the folder exists before any rank writes into it
    inputs = {role: dep.output(run_dir) for role, dep in stage.inputs.items()}
    log(f"[bold cyan]▶[/] {escape(stage.name)}")
    try:
        with measure() as meter:
            if shard.is_main or stage.kind.parallel:
                stage.kind.action(stage.params, inputs, partial)
    except BaseException:
        if not stage.kind.resumable and shard.is_main:  # nothing in it can be reused (a diverged SAE, say): leave no debris
            shutil.rmtree(partial, ignore_errors=True)
        raise
    distributed.barrier()  # every rank's share is written
    if shard.is_main:
        write_measurement(out, meter, partial, _device_type(stage))
        fsync_dir(partial)
        os.replace(partial, out)
        fsync_dir(out.parent)
    distributed.barrier()  # no rank reads the output before it is in place
    log(f"[green]✓[/] {escape(stage.name)} [dim]({meter.wall_s:.1f}s)[/]")
    return True


def _device_type(stage: Stage) -> str:
    """The device type the stage ran on (its params' `device`, resolved; `cpu` for kinds without one)."""
    name = getattr(stage.params, "device", "cpu")
    try:
        from saev_report.runtime import pick_device

        return pick_device(name).type
    except (ImportError, RuntimeError):
        return name


def publish_tables(stage_list: list[Stage], run_dir: Path) -> Path:
    """Link every given stage's table parts into `<run>/tables/<table>/`, atomically swapped."""
    tables = run_dir / "tables"
    staging = run_dir / ".tables.staging"
    if staging.exists():
        shutil.rmtree(staging)
    for stage in stage_list:
        out = stage.out_dir(run_dir)
        for part in sorted(out.glob("tables/*/*.parquet")):
            table = part.parent.name
            if table not in stage.kind.writes:  # a code bug, not bad input: the declaration is the contract
                raise RuntimeError(f"stage {stage.name} wrote a part of table {table!r}, which its kind does not declare "
                                   f"(writes: {', '.join(stage.kind.writes) or 'nothing'})")
            target = staging / table / f"{stage.kind.name}-{stage.label}-{part.stem}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(part, target)
            except OSError:
                shutil.copy2(part, target)
    staging.mkdir(parents=True, exist_ok=True)
    swap_dir(staging, tables)
    return tables


def render_site(spec: Spec, run_dir: Path, cache_dir: Path | None = None) -> Path:
    """Render `<run>/site` from the published tables (cheap enough to redo on every build)."""
    from saev_report.render import build_site

    out = run_dir / "site"
    labels = {key: model.label or key for key, model in spec.models.items()}
    stats = build_site(run_dir, out, spec.report, model_labels=labels, cache_dir=cache_dir or default_cache_dir())
    log(f"[green]✓[/] site: {stats}")
    return out


@dataclass
class BuildResult:
    run_dir: Path
    ran: list[str]
    skipped: list[str]
    site: Path | None


def build(spec: Spec, only: set[str] | None = None, render: bool = True, cache_dir: Path | None = None,
          provenance: Provenance = Provenance()) -> BuildResult:
    """Run every stage (or only the given kinds), publish the tables and render the site.

    Holds the run's lock throughout (a second build of the same run is refused)
    and first clears what killed builds left in the run and the shared cache.
    Ends by writing `<run>/manifest.json` (`manifest.py`), also when a stage fails.
    """
    from saev_report.runtime import set_threads

    unknown = sorted((only or set()) - set(KINDS))
    if unknown:
        raise UserError(f"unknown stage kind(s) {', '.join(unknown)}; the kinds are {', '.join(KINDS)}")
    set_threads(spec.run.threads)
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir or default_cache_dir()
    # Under torchrun rank 0 holds the lock and sweeps for the whole group; the others follow it.
    with distributed.process_group(spec.run.device, log_dir=run_dir / "logs") as shard, \
            (run_lock(run_dir) if shard.is_main else contextlib.nullcontext()):
        stage_list = build_stages(spec, cache_dir)
        if shard.is_main:
            sweep_run(run_dir, stage_list)
            sweep_cache(cache_dir)
        distributed.barrier()
        wanted = with_dependencies(stage_list, only) if only else stage_list
        ran, skipped = [], []
        statuses = {s.name: "cached" for s in stage_list if s.status(run_dir) == "done"}
        started = now_utc()
        site, steps = None, {}

        def record_manifest() -> None:
            manifest = build_manifest(spec, run_dir, stage_list, statuses, provenance, cache_dir, started, {"steps": steps})
            write_manifest(run_dir, manifest, spec)

        failed = True
        try:
            for stage in wanted:
                statuses[stage.name] = "failed"
                did_run = run_stage(stage, run_dir)
                statuses[stage.name] = "ran" if did_run else "cached"
                (ran if did_run else skipped).append(stage.name)
            if shard.is_main:  # tables and site are cheap: rank 0 alone
                with measure() as tables_meter:
                    publish_tables([s for s in stage_list if s.status(run_dir) == "done"], run_dir)
                steps["tables"] = {"wall_s": round(tables_meter.wall_s, 3)}
            failed = False
        finally:
            if shard.is_main:  # a failed build says which stage failed and what ran before it
                try:
                    record_manifest()
                except Exception:
                    if not failed:
                        raise
                    log("[yellow]the manifest could not be written[/] (the stage's error follows)")
        if shard.is_main and render:  # the site's "How this was built" page reads the manifest
            with measure() as site_meter:
                site = render_site(spec, run_dir, cache_dir)
            steps["site"] = {"wall_s": round(site_meter.wall_s, 3), "peak_rss_bytes": site_meter.peak_rss_bytes}
            record_manifest()
        distributed.barrier()
    return BuildResult(run_dir, ran, skipped, site)


def rerender(spec: Spec) -> Path:
    """`saev-report render`: the site again from the published tables, under the run's lock."""
    with run_lock(spec.run_dir):
        return render_site(spec, spec.run_dir)


def sweep_run(run_dir: Path, stage_list: list[Stage]) -> list[Path]:
    """Remove `.partial` folders no current resumable stage can resume from; returns them.

    Called under the run lock, so no other build is writing them: they are what
    killed or failed builds left, or work for a spec that has since changed.
    """
    keep = {s.partial_dir(run_dir) for s in stage_list if s.kind.resumable}
    removed = [p for p in sorted((run_dir / "cache").glob("*/*.partial")) if p not in keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if removed:
        log(f"  removed {len(removed)} leftover stage folder(s): {', '.join(escape(p.name) for p in removed[:3])}"
            + (", …" if len(removed) > 3 else ""))
    return removed


def with_dependencies(stage_list: list[Stage], kinds: set[str]) -> list[Stage]:
    """The stages of the given kinds and everything they read, in build order."""
    needed: set[str] = set()

    def visit(stage: Stage) -> None:
        if stage.name not in needed:
            needed.add(stage.name)
            for dep in stage.deps:
                visit(dep)

    for stage in stage_list:
        if stage.kind.name in kinds:
            visit(stage)
    return [s for s in stage_list if s.name in needed]
