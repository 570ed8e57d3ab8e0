"""The stage graph: content-hashed, atomic, resumable.

A build is a list of `Stage`s derived from the spec. Each stage's output
directory is `<run>/cache/<kind>/<label>-<key>`, where `key` hashes the stage's
slice of the spec, the keys of its inputs and the stage's format version. A
stage works in `<dir>.partial/` and renames it to `<dir>` when it finishes, so:

- a complete stage is skipped on every later build;
- a killed stage leaves only `.partial`, which the next build resumes (the
  record stage keeps its finished shards) or clears and redoes;
- a changed spec slice gets a new key, so stale outputs are never reused.

After the stages, `publish` links the current table parts into `<run>/tables/`
and `render` builds `<run>/site/`; both swap their folder in atomically.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.markup import escape

from saev_report import __version__
from saev_report.progress import log
from saev_report.spec import Spec, content_hash

# Bump a stage's version when its output format changes: old caches are then ignored.
STAGE_VERSIONS = {
    "images": 1,
    "record": 1,
    "train": 1,
    "analyse": 3,  # 3: quantile_exemplars, class_split, similar_features
    "heads": 1,
    "edits": 1,
    "compare": 1,
    "stability": 1,
}


@dataclass
class StageContext:
    """What a running stage may use: its spec, its work dir and its inputs' dirs."""

    spec: Spec
    spec_hash: str
    work_dir: Path
    inputs: dict[str, Path]
    cache_dir: Path


@dataclass
class Stage:
    kind: str
    label: str
    slice_hash: str
    deps: list["Stage"]
    action: Callable[[StageContext], None]
    resumable: bool = False
    key: str = field(init=False)

    def __post_init__(self) -> None:
        dep_keys = sorted(f"{d.kind}/{d.label}-{d.key}" for d in self.deps)
        self.key = content_hash(self.kind, STAGE_VERSIONS[self.kind], self.slice_hash, dep_keys)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.label}"

    def out_dir(self, run_dir: Path) -> Path:
        return run_dir / "cache" / self.kind / f"{self.label}-{self.key}"

    def partial_dir(self, run_dir: Path) -> Path:
        return self.out_dir(run_dir).with_name(self.out_dir(run_dir).name + ".partial")

    def status(self, run_dir: Path) -> str:
        if self.out_dir(run_dir).is_dir():
            return "done"
        if self.partial_dir(run_dir).is_dir():
            return "partial"
        return "todo"


def spec_hash(spec: Spec) -> str:
    return content_hash(spec)


def default_cache_dir() -> Path:
    """Shared cache for converted weights and generated demo data (not per run)."""
    return Path(os.environ.get("SAEV_REPORT_CACHE", Path.home() / ".cache" / "saev-report"))


# --------------------------------------------------------------------------- graph


def build_stages(spec: Spec) -> list[Stage]:
    """Every stage of the spec, in dependency order."""
    # Imported here so `validate`/`plan` stay fast and light.
    from saev_report import stages

    stage_list: list[Stage] = []
    record_ds = spec.datasets[spec.record.dataset]
    record_slice = spec.record.model_copy(update={"models": None})

    images: dict[str, Stage] = {}
    used_datasets = {spec.record.dataset}
    for head in spec.heads.values():
        used_datasets.update(d for d in (head.train, head.val) if d)
    for edit in spec.edits:
        if edit.dataset:
            used_datasets.add(edit.dataset)
    for ds_key in sorted(used_datasets):
        ds = spec.datasets[ds_key]
        images[ds_key] = Stage("images", ds_key, content_hash(ds_key, ds), [], stages.images_stage(ds_key))
        stage_list.append(images[ds_key])

    record: dict[str, Stage] = {}
    train: dict[tuple[str, int], Stage] = {}
    analyse: dict[tuple[str, int], Stage] = {}
    for model_key in spec.recorded_models():
        model = spec.models[model_key]
        record[model_key] = Stage(
            "record", model_key, content_hash(model_key, model, spec.record.dataset, record_ds, record_slice, spec.run.seed),
            [], stages.record_stage(model_key), resumable=True,
        )
        stage_list.append(record[model_key])
        for layer in model.layers:
            label = f"{model_key}-L{layer}"
            train[(model_key, layer)] = Stage(
                "train", label, content_hash(layer, spec.sae), [record[model_key]], stages.train_stage(model_key, layer)
            )
            analyse[(model_key, layer)] = Stage(
                "analyse", label, content_hash(layer, spec.analysis),
                [record[model_key], train[(model_key, layer)], images[spec.record.dataset]],
                stages.analyse_stage(model_key, layer),
            )
            stage_list += [train[(model_key, layer)], analyse[(model_key, layer)]]

    heads: dict[str, Stage] = {}
    for head_key, head in spec.heads.items():
        datasets = {k: spec.datasets[k] for k in (head.train, head.val) if k}
        heads[head_key] = Stage(
            "heads", head_key, content_hash(head_key, head, spec.models[head.model], datasets, spec.run.seed),
            [], stages.head_stage(head_key),
        )
        stage_list.append(heads[head_key])

    for i, edit in enumerate(spec.edits):
        layer = edit.layer or spec.models[edit.model].layers[0]
        head = spec.heads[edit.head]
        ds_key = edit.dataset or head.val or head.train
        deps = [heads[edit.head], train[(edit.model, layer)], analyse[(edit.model, layer)], record[edit.model]]
        stage_list.append(Stage(
            "edits", edit.name, content_hash(edit, ds_key, spec.datasets[ds_key], spec.run.seed), deps, stages.edit_stage(i)
        ))

    for i, cmp in enumerate(spec.compare):
        deps = [record[cmp.a], record[cmp.b]]
        deps += [train[(cmp.a, layer)] for layer in spec.models[cmp.a].layers[:1]]
        deps += [train[(cmp.b, layer)] for layer in spec.models[cmp.b].layers[:1]]
        stage_list.append(Stage("compare", f"{cmp.a}~{cmp.b}", content_hash(cmp), deps, stages.compare_stage(i)))

    for i, stab in enumerate(spec.stability):
        layer = spec.models[stab.model].layers[0]
        deps = [record[stab.model], train[(stab.model, layer)]]
        stage_list.append(Stage("stability", stab.model, content_hash(stab), deps, stages.stability_stage(i)))
    return stage_list


# --------------------------------------------------------------------------- running


def run_stage(stage: Stage, spec: Spec, run_dir: Path, cache_dir: Path, s_hash: str) -> bool:
    """Run one stage unless complete; return True when it ran."""
    out, partial = stage.out_dir(run_dir), stage.partial_dir(run_dir)
    if out.is_dir():
        log(f"[green]✓[/] {escape(stage.name)} [dim](cached {out.name})[/]")
        return False
    if partial.exists() and not stage.resumable:
        shutil.rmtree(partial)  # a half-written non-resumable stage is redone from scratch
    elif partial.exists():
        log(f"[yellow]↻[/] {escape(stage.name)}: resuming interrupted work")
    partial.mkdir(parents=True, exist_ok=True)
    inputs = {f"{d.kind}/{d.label}": d.out_dir(run_dir) for d in stage.deps}
    started = time.perf_counter()
    log(f"[bold cyan]▶[/] {escape(stage.name)}")
    stage.action(StageContext(spec, s_hash, partial, inputs, cache_dir))
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
    """Link every current stage's table parts into `<run>/tables/<table>/`, atomically swapped."""
    tables = run_dir / "tables"
    staging = run_dir / ".tables.staging"
    if staging.exists():
        shutil.rmtree(staging)
    for stage in stage_list:
        out = stage.out_dir(run_dir)
        for part in sorted(out.glob("tables/*/*.parquet")):
            table = part.parent.name
            target = staging / table / f"{stage.kind}-{stage.label}-{part.stem}.parquet"
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
    cache_dir = cache_dir or default_cache_dir()
    s_hash = spec_hash(spec)
    stage_list = build_stages(spec)
    wanted = _with_dependencies(stage_list, only) if only else stage_list
    ran, skipped = [], []
    for stage in wanted:
        (ran if run_stage(stage, spec, run_dir, cache_dir, s_hash) else skipped).append(stage.name)
    publish_tables([s for s in stage_list if s.status(run_dir) == "done"], run_dir)
    site = None
    if render:
        from saev_report.stages import render_site

        site = render_site(spec, run_dir)
    return BuildResult(run_dir, ran, skipped, site)


def _with_dependencies(stage_list: list[Stage], kinds: set[str]) -> list[Stage]:
    needed: set[str] = set()

    def visit(stage: Stage) -> None:
        if stage.name not in needed:
            needed.add(stage.name)
            for dep in stage.deps:
                visit(dep)

    for stage in stage_list:
        if stage.kind in kinds:
            visit(stage)
    return [s for s in stage_list if s.name in needed]


__all__ = ["Stage", "StageContext", "build", "build_stages", "publish_tables", "spec_hash", "__version__"]
