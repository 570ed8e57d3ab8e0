"""Running a build: content-keyed, atomic, resumable stages, then tables and site.

`graph.build_stages` turns the spec into `Stage`s. Each stage's output directory
is `<run>/cache/<kind>/<label>-<key>` (the key hashes the kind's version, its
params and its inputs' keys). A stage works in `<dir>.partial/` and renames it
to `<dir>` when it finishes, so:

- a complete stage is skipped on every later build;
- a killed stage leaves only `.partial`, which the next build resumes (the
  record stage keeps its finished shards) or clears and redoes;
- a changed param gets a new key, so stale outputs are never reused.

After the stages, `publish_tables` links the current table parts into
`<run>/tables/` and `render_site` builds `<run>/site/`; both swap their folder
in atomically.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from saev_report.graph import build_stages
from saev_report.progress import log
from saev_report.spec import Spec
from saev_report.stages import Stage


def default_cache_dir() -> Path:
    """Shared cache for converted weights and generated demo data (not per run)."""
    return Path(os.environ.get("SAEV_REPORT_CACHE", Path.home() / ".cache" / "saev-report"))


# --------------------------------------------------------------------------- running


def run_stage(stage: Stage, run_dir: Path) -> bool:
    """Run one stage unless complete; return True when it ran."""
    out, partial = stage.out_dir(run_dir), stage.partial_dir(run_dir)
    if out.is_dir():
        log(f"[green]✓[/] {escape(stage.name)} [dim](cached {out.name})[/]")
        return False
    if partial.exists() and not stage.kind.resumable:
        shutil.rmtree(partial)  # a half-written non-resumable stage is redone from scratch
    elif partial.exists():
        log(f"[yellow]↻[/] {escape(stage.name)}: resuming interrupted work")
    partial.mkdir(parents=True, exist_ok=True)
    inputs = {role: dep.output(run_dir) for role, dep in stage.inputs.items()}
    started = time.perf_counter()
    log(f"[bold cyan]▶[/] {escape(stage.name)}")
    stage.kind.action(stage.params, inputs, partial)
    _fsync_dir(partial)
    os.replace(partial, out)
    _fsync_dir(out.parent)
    log(f"[green]✓[/] {escape(stage.name)} [dim]({time.perf_counter() - started:.1f}s)[/]")
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
            target = staging / table / f"{stage.kind.name}-{stage.label}-{part.stem}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(part, target)
            except OSError:
                shutil.copy2(part, target)
    staging.mkdir(parents=True, exist_ok=True)
    _swap_dir(staging, tables)
    return tables


def _swap_dir(new: Path, target: Path) -> None:
    """Replace `target` by `new` so readers see the old or the new folder, never a mix."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        shutil.rmtree(old)


def render_site(spec: Spec, run_dir: Path) -> Path:
    """Render `<run>/site` from the published tables (cheap enough to redo on every build)."""
    from saev_report.render import build_site

    out = run_dir / "site"
    labels = {key: model.label or key for key, model in spec.models.items()}
    stats = build_site(run_dir, out, spec.report, model_labels=labels)
    log(f"[green]✓[/] site: {stats}")
    return out


@dataclass
class BuildResult:
    run_dir: Path
    ran: list[str]
    skipped: list[str]
    site: Path | None


def build(spec: Spec, only: set[str] | None = None, render: bool = True, cache_dir: Path | None = None) -> BuildResult:
    """Run every stage (or only the given kinds), publish the tables and render the site."""
    from saev_report.runtime import set_threads

    set_threads(spec.run.threads)
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    stage_list = build_stages(spec, cache_dir or default_cache_dir())
    wanted = with_dependencies(stage_list, only) if only else stage_list
    ran, skipped = [], []
    for stage in wanted:
        (ran if run_stage(stage, run_dir) else skipped).append(stage.name)
    publish_tables([s for s in stage_list if s.status(run_dir) == "done"], run_dir)
    site = render_site(spec, run_dir) if render else None
    return BuildResult(run_dir, ran, skipped, site)


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
