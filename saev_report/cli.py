"""`saev-report`: build, check and query SAE reports of vision transformers.

Exit codes: 0 ok, 1 a stage failed (a full disk included) or a query hit its time or
memory bound, 2 bad input (spec, SQL, arguments), 3 a model or dataset is unavailable,
4 the run is in use by another build.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import traceback
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typing_extensions import Annotated

from saev_report import __version__
from saev_report.spec import SpecError, json_schema, load_spec
from saev_report.stages import KINDS
from saev_report.tables import DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT_S

app = typer.Typer(
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
out = Console()
err = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="Path of the YAML spec (see `saev-report schema --markdown`).", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="PATH=VALUE", show_default=False,
    help="Override one spec value, e.g. `--set sae.n_patches=200000 --set run.name=smoke` (repeatable; the value is YAML; "
         "list items by index, `edits.0.value=2`). Checked like the file; a build records its overrides in `manifest.json`.")]
RehearseOpt = Annotated[bool, typer.Option("--rehearse", help="The spec at miniature scale on CPU: generated data in each dataset kind's real layout, tiny random models of each model's family and class, capped budgets; run `<name>-rehearsal` (docs/guides/rehearsal.md).")]


def _debug() -> bool:
    return os.environ.get("SAEV_REPORT_DEBUG") == "1"


@contextmanager
def user_errors(console: Console, debug: bool = False) -> Iterator[None]:
    """Turn UserError into `error: message` + its exit code; Ctrl-C into a resume hint."""
    from saev_report.errors import UserError

    try:
        yield
    except UserError as exc:
        if debug:
            traceback.print_exc()
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages and shards are kept; run the same command again to resume", highlight=False)
        raise typer.Exit(130)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def _disk_full_ends_cleanly(folders: list[Path]) -> Iterator[None]:
    """A full disk, however the library that hit it reports it, ends in one message naming the
    folder that filled up, and exit code 1. Anything else goes on up unchanged."""
    from saev_report.fsutil import disk_full, full_folder

    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        full = disk_full(exc)
        if full is None:
            raise
        if _debug():
            traceback.print_exc()
        folder = full_folder(full, folders)
        _fail(f"no space left on the device holding {folder} ({full.strerror or full}). Free some space and run the same "
              "command again: finished stages and shards are kept, and the build resumes where it stopped.", 1)


def _load(path: Path, check_paths: bool = True, overrides: Optional[list[str]] = None, rehearse: bool = False):
    """The spec at `path` with its overrides, validated; with `rehearse`, its miniature
    (`rehearsal.rehearsal_spec`), whose generated data and checkpoints are checked for paths instead."""
    try:
        parsed = load_spec(path, check_paths=check_paths and not rehearse, overrides=overrides or ())
    except SpecError as exc:
        for issue in exc.issues:
            err.print(f"[bold red]error:[/] {escape(str(issue))}", highlight=False, soft_wrap=True)
        err.print(f"{len(exc.issues)} problem(s) in {escape(str(path))}", highlight=False)
        raise typer.Exit(2)
    return _rehearsed(parsed) if rehearse else parsed


def _rehearsed(parsed):
    from saev_report.pipeline import default_cache_dir
    from saev_report.rehearsal import RehearsalUnsupported, rehearsal_spec

    try:
        with user_errors(err, _debug()):
            return rehearsal_spec(parsed, default_cache_dir())
    except RehearsalUnsupported as exc:
        _fail(f"--rehearse: {exc}", 2)


def _version(value: bool) -> None:
    if value:
        out.print(f"saev-report {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = None,
) -> None:
    """Record ViT activations, train sparse autoencoders, analyse and edit their features, and
    publish a static feature atlas — all declared in one YAML spec."""


@app.command()
def validate(
    spec: SpecArg,
    check_paths: Annotated[bool, typer.Option(help="Also check that dataset folders and local model paths exist.")] = True,
    sets: SetOpt = None,
    rehearse: RehearseOpt = False,
) -> None:
    """Check a spec: schema, references between sections, layer ranges and paths.

    Problems print as `file:line:column: field.path: message` and exit with code 2.
    """
    parsed = _load(spec, check_paths, sets, rehearse)
    out.print(f"[green]ok[/] {escape(str(spec))}: {len(parsed.models)} model(s), {len(parsed.datasets)} dataset(s), "
              f"{len(parsed.heads)} head(s), {len(parsed.edits)} edit(s)", highlight=False)


@app.command()
def schema(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the spec reference (docs/reference/spec.md) as Markdown instead of JSON schema.")] = False,
) -> None:
    """Print the spec's JSON schema (for editors such as yaml-language-server)."""
    if markdown:
        from saev_report.docs import spec_reference_markdown

        out.print(spec_reference_markdown(), markup=False, highlight=False, soft_wrap=True)
    else:
        sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def plan(
    spec: SpecArg,
    check_paths: Annotated[bool, typer.Option(help="Check that dataset folders exist.")] = False,
    gpus: Annotated[int, typer.Option(help="Also estimate the time on this many GPUs (torchrun ranks, or GPUs per Slurm job).", min=1)] = 1,
    sets: SetOpt = None,
    rehearse: RehearseOpt = False,
) -> None:
    """Show the stages of a build, their cache status, and estimated disk and time for recording and training."""
    from saev_report.plan import against_measured, human_bytes, human_seconds, plan_rows, recording_estimates, training_estimates

    parsed = _load(spec, check_paths, sets, rehearse)
    table = Table(title=f"stages of {parsed.run.name} ({parsed.run_dir})")
    for col in ("stage", "key", "status"):
        table.add_column(col)
    for row in plan_rows(parsed):
        colour = {"done": "green", "partial": "yellow"}.get(row["status"], "white")
        table.add_row(escape(row["stage"]), row["key"], f"[{colour}]{row['status']}[/]")
    out.print(table)
    n_gpus = f"time ({gpus} GPUs)"
    est = Table(title="recording estimates")
    columns = ["model", "layers", "images", "tokens/img", "d", "dtype", "disk", "GFLOP/img", "time (CPU)", "time (GPU)"]
    keys = ["model", "layers", "images", "tokens", "d", "dtype", "disk", "gflop", "cpu_time", "gpu_time"]
    if gpus > 1:
        columns, keys = columns + [n_gpus], keys + ["gpus_time"]
    for col in columns:
        est.add_column(col, justify="right" if col not in ("model", "dtype") else "left")
    for row in recording_estimates(parsed, gpus):
        est.add_row(*[escape(str(row[c])) for c in keys])
    out.print(est)
    train = Table(title="training estimates (dense step, one pass per sweep)")
    columns, keys = ["model", "layer", "SAEs", "patches", "work", "time (GPU)"], ["model", "layer", "saes", "patches", "flop", "gpu_time"]
    if gpus > 1:
        columns, keys = columns + [n_gpus], keys + ["gpus_time"]
    for col in columns:
        train.add_column(col, justify="left" if col == "model" else "right")
    for row in training_estimates(parsed, gpus):
        train.add_row(*[escape(str(row[c])) for c in keys])
    out.print(train)
    on_n = f", ≈ {{}} on {gpus} GPUs" if gpus > 1 else ""
    for row in recording_estimates(parsed, gpus):
        out.print(f"{escape(str(row['model']))}: {row['disk']} of activations; recording ≈ {row['cpu_time']} on this CPU, ≈ {row['gpu_time']} on a GPU"
                  + on_n.format(row["gpus_time"]), highlight=False)
    measured = against_measured(parsed)
    if measured:
        vs = Table(title="plan against the last build (ratio = measured / estimated; estimates for the device each stage ran on)")
        for col in ("stage", "device", "time", "estimate", "ratio", "disk", "estimate", "ratio", "peak RSS"):
            vs.add_column(col, justify="left" if col in ("stage", "device") else "right")
        for row in measured:
            vs.add_row(escape(str(row["stage"])), str(row["device"]), human_seconds(row["time"]), human_seconds(row["est_time"]),
                       _ratio_text(row["time_ratio"]), human_bytes(row["disk"]), human_bytes(row["est_disk"]),
                       _ratio_text(row["disk_ratio"]), human_bytes(row["peak_rss"]))
        out.print(vs)
    out.print("[dim]Disk = images × tokens × d × bytes per layer. Times assume 0.1 TFLOP/s (this 2-core CPU) and 30 TFLOP/s (one A6000-class GPU in fp16); "
              "N GPUs split the images, and the SAEs of a sweep (or each SAE's batches, with fewer SAEs than GPUs); communication and disk reads are left out. Treat them as order-of-magnitude.[/]")


def _ratio_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}×"


class Launcher(str, Enum):
    none = "none"
    torchrun = "torchrun"


class Executor(str, Enum):
    local = "local"
    slurm = "slurm"


_STAGE_ORDER = " → ".join([*KINDS, "tables", "site"])


@app.command(help=f"""Run the pipeline: {_STAGE_ORDER}.

Finished stages are cached by content hash and skipped; a killed build resumes. Writes
`runs/<name>/manifest.json`: the resolved spec, versions, device and each stage's time and peak memory.
""")
def build(
    spec: SpecArg,
    only: Annotated[Optional[list[str]], typer.Option("--only", help=f"Run only these stage kinds (and what they need): {', '.join(KINDS)}.")] = None,
    no_site: Annotated[bool, typer.Option("--no-site", help="Skip rendering the site.")] = False,
    launcher: Annotated[Launcher, typer.Option(help="`torchrun`: start `--nproc` processes on this machine (one per GPU) that split record, train and analyse.")] = Launcher.none,
    nproc: Annotated[int, typer.Option(help="Processes for `--launcher torchrun`.", min=1)] = 2,
    executor: Annotated[Executor, typer.Option(help="`slurm`: submit each stage as a Slurm job (needs the `slurm` extra); resources from the spec's `slurm` section or the flags below.")] = Executor.local,
    partition: Annotated[Optional[str], typer.Option(help="Slurm partition (overrides `slurm.partition`).")] = None,
    gpus: Annotated[Optional[int], typer.Option(help="GPUs per record/train/analyse/compare job (overrides `slurm.gpus`).", min=1)] = None,
    time_min: Annotated[Optional[int], typer.Option(help="Time limit per job in minutes (overrides `slurm.time_min`).", min=1)] = None,
    sets: SetOpt = None,
    rehearse: RehearseOpt = False,
) -> None:
    from saev_report import pipeline

    if rehearse and executor is Executor.slurm:
        _fail("--rehearse runs on this machine's CPU: it does not combine with `--executor slurm`", 2)
    parsed = _load(spec, overrides=sets, rehearse=rehearse)
    if launcher is Launcher.torchrun:
        raise typer.Exit(_torchrun(spec, nproc, only, no_site, sets or [], rehearse))
    if executor is Executor.slurm:
        overrides = {k: v for k, v in {"partition": partition, "gpus": gpus, "time_min": time_min}.items() if v is not None}
        _submit_slurm(spec, parsed.model_copy(update={"slurm": parsed.slurm.model_copy(update=overrides)}), only, no_site, sets or [])
        return
    with _disk_full_ends_cleanly([parsed.run_dir, pipeline.default_cache_dir()]), user_errors(err, _debug()):
        result = pipeline.build(parsed, only=set(only) if only else None, render=not no_site,
                                provenance=pipeline.Provenance(spec_file=spec, overrides=tuple(sets or ())))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun rank 0 reports
    out.print(f"[green]done[/]: ran {len(result.ran)} stage(s), {len(result.skipped)} cached. Tables: {escape(str(result.run_dir / 'tables'))}", highlight=False)
    if result.site:
        out.print(f"site: {escape(str(result.site / 'index.html'))}", highlight=False)


def _torchrun(spec: Path, nproc: int, only: Optional[list[str]], no_site: bool, sets: list[str], rehearse: bool = False) -> int:
    """`torchrun --standalone --nproc-per-node N -m saev_report build SPEC ...`; returns its exit code."""
    import subprocess

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "saev_report", "build", str(spec), *[a for kind in only or [] for a in ("--only", kind)],
            *[a for flag in sets for a in ("--set", flag)]]
    return subprocess.call(args + (["--no-site"] if no_site else []) + (["--rehearse"] if rehearse else []))


def _submit_slurm(spec_path: Path, parsed, only: Optional[list[str]], no_site: bool, sets: list[str]) -> None:
    try:
        from saev_report.slurm import submit_build
    except ImportError:
        _fail("`--executor slurm` needs submitit: pip install 'saev-report[slurm]'", 2)
    with user_errors(err, _debug()):
        jobs = submit_build(spec_path.resolve(), parsed, only=set(only) if only else None, render=not no_site, cluster="slurm",
                            overrides=tuple(sets))
    for plan, job in jobs:
        after = f" after {', '.join(plan.after)}" if plan.after else ""
        out.print(f"submitted {escape(plan.name)}: job {job.job_id} ({plan.ranks} rank(s)){escape(after)}", highlight=False)


@app.command()
def render(spec: SpecArg, sets: SetOpt = None, rehearse: RehearseOpt = False) -> None:
    """Re-render only the site from the published tables (after editing templates)."""
    from saev_report.pipeline import rerender

    parsed = _load(spec, check_paths=False, overrides=sets, rehearse=rehearse)
    with _disk_full_ends_cleanly([parsed.run_dir]), user_errors(err, _debug()):
        site = rerender(parsed)
    out.print(f"site: {escape(str(site / 'index.html'))}", highlight=False)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


@app.command()
def query(
    run: Annotated[Path, typer.Argument(help="Run directory, e.g. runs/demo.", show_default=False)],
    sql: Annotated[str, typer.Argument(help="One read-only SQL statement over the tables (images, saes, train_log, features, exemplars, concepts, heads, edits, experiments, matches).", show_default=False)],
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format. In csv, list columns are JSON arrays.")] = Format.table,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file (required for parquet).")] = None,
    limit: Annotated[int, typer.Option(help="Rows shown in table format.")] = 40,
    timeout: Annotated[float, typer.Option("--timeout", min=0, help="Stop the query after this many seconds (0: never).")] = DEFAULT_TIMEOUT_S,
    memory_limit: Annotated[str, typer.Option("--memory-limit", help="Stop the query when it needs more memory than this (DuckDB syntax: 500MB, 4GB).")] = DEFAULT_MEMORY_LIMIT,
) -> None:
    """Query a run's tables with DuckDB SQL. The tables are read-only: no statement can write a file.

    A query that runs past `--timeout` or needs more than `--memory-limit` stops with exit code 1.
    """
    from saev_report.tables import QueryError
    from saev_report.tables import query as run_query

    if format is Format.parquet and output is None:
        _fail("--format parquet needs --output FILE", 2)
    try:
        result = run_query(run, sql, timeout_s=timeout or None, memory_limit=memory_limit)
    except QueryError as exc:
        _fail(str(exc), exc.exit_code)
    _print_result(result, format, output, limit)


def _print_result(result, format: Format, output: Optional[Path], limit: int) -> None:
    from saev_report.fsutil import atomic_write, atomic_write_text

    if format is Format.parquet:
        import pyarrow.parquet as pq

        atomic_write(output, lambda f: pq.write_table(result, f))
        return
    if format is Format.csv:
        text = _csv_text(result)
    elif format is Format.json:
        text = json.dumps([_json_safe(row) for row in result.to_pylist()], default=str, indent=1) + "\n"
    else:
        text = _table_text(result, limit, width=200 if output else shutil.get_terminal_size().columns)
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(output, text)


def _table_text(result, limit: int, width: int) -> str:
    """DuckDB's own box renderer: the columns that fit, and how many were left out."""
    import contextlib
    import io

    import duckdb

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        duckdb.connect(":memory:").from_arrow(result).show(max_width=width, max_rows=limit)
    return buf.getvalue()


def _csv_text(result) -> str:
    """CSV of any result: nested cells (lists, structs) become JSON, which CSV has no type for."""
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv

    columns = []
    for column in result.columns:
        if pa.types.is_nested(column.type):
            column = pa.array([None if v is None else json.dumps(_json_safe(v)) for v in column.to_pylist()], pa.string())
        columns.append(column)
    flat = pa.table(columns, names=result.column_names)
    buf = io.BytesIO()
    pacsv.write_csv(flat, buf)
    return buf.getvalue().decode()


def _json_safe(value):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


@app.command(name="ls")
def list_tables(run: Annotated[Path, typer.Argument(help="Run directory, e.g. runs/demo.", show_default=False)]) -> None:
    """List a run's tables with their row counts and columns."""
    from saev_report.tables import QueryError, TABLES, connect

    try:
        con = connect(run)
    except QueryError as exc:
        _fail(str(exc), 2)
    table = Table()
    for col in ("table", "rows", "columns"):
        table.add_column(col)
    for name, definition in TABLES.items():
        n = con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
        table.add_row(name, str(n), ", ".join(c.name for c in definition.columns))
    out.print(table)


@app.command()
def check(
    run_or_spec: Annotated[Path, typer.Argument(help="A run directory (runs/demo) or the spec that built it.", show_default=False)],
    strict: Annotated[bool, typer.Option("--strict", help="Count an inconclusive claim as failing too.")] = False,
) -> None:
    """Print the verdicts of the spec's `claims:` from the run's `claims` table (the one the Claims page shows).

    Exit 0 when no claim fails, 1 when one fails (with `--strict`, or is inconclusive), 2 when the run
    has no claims or cannot be read. A claim can gate CI like a test.
    """
    from saev_report.tables import QueryError, connect, fetch_arrow

    run = _load(run_or_spec).run_dir if run_or_spec.is_file() else run_or_spec
    try:
        con = connect(run)
        rows = fetch_arrow(con.sql("SELECT * FROM claims ORDER BY claim")).to_pylist()
    except (QueryError, OSError) as exc:
        _fail(str(exc), 2)
    if not rows:
        _fail(f"{run} has no claims: declare them in the spec's `claims:` section and build", 2)
    table = Table(title=f"claims of {escape(str(run))}")
    for col in ("claim", "verdict", "replicates", "evidence"):
        table.add_column(col, overflow="fold")
    colour = {"holds": "green", "fails": "red", "inconclusive": "yellow"}
    for row in rows:
        reps = ", ".join(f"{escape(s)}: {v}" for s, v in zip(row["replicates"] or [], row["replicate_verdicts"] or []))
        table.add_row(escape(row["claim"]), f"[{colour.get(row['verdict'], 'white')}]{row['verdict']}[/]", reps, escape(row["summary"] or ""))
    out.print(table)
    first = rows[0]
    out.print(f"{len(rows)} claim(s); {first['family_size']} test(s) in the corrected family ({first['correction']}, α = {first['alpha']:g}); "
              f"{first['confidence']:.0%} intervals", highlight=False)
    failing = [r["claim"] for r in rows if r["verdict"] == "fails" or (strict and r["verdict"] == "inconclusive")]
    if failing:
        err.print(f"[bold red]{len(failing)} claim(s) {'do not hold' if strict else 'fail'}:[/] {escape(', '.join(failing))}", highlight=False)
        raise typer.Exit(1)


@app.command(name="sae-check")
def sae_check(
    source: Annotated[str, typer.Argument(help="A published SAE: a file, a folder, or a hub repo id in the local HF cache (`owner/name[/sub/folder]`).", show_default=False)],
    acts: Annotated[Optional[Path], typer.Option(help="Activations (`.npy`, n × d) of the declared model and layer: L0, MSE and FVU are recomputed on them and compared with the stated ones.")] = None,
    select: Annotated[Optional[str], typer.Option(help="Which SAE of a folder holding several (a saev manifest run id, a SAELens sub-folder).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Declared model, checked against the checkpoint's.")] = None,
    layer: Annotated[Optional[int], typer.Option(help="Declared layer (saev-report's numbering: block L counted from 1).")] = None,
    normalization: Annotated[Optional[str], typer.Option(help="Declared normalisation: none, mean_and_scale, scale, per_token_norm, layer_norm.")] = None,
    kind: Annotated[Optional[str], typer.Option(help="Declared SAE kind.")] = None,
    k: Annotated[Optional[int], typer.Option(help="Declared k (TopK / BatchTopK).")] = None,
    save: Annotated[Optional[Path], typer.Option("--save", help="Write the checked SAE here as a saev-report checkpoint (config.json + sae.safetensors).")] = None,
) -> None:
    """Load a published SAE (saev, SAELens), check it against what you declare and, with `--acts`,
    against its own stated metrics. A mislabelled checkpoint exits with code 2."""
    import numpy as np
    import torch
    from pydantic import ValidationError

    from saev_report.published import DeclaredSAE, PublishedSAESpec, load_published, save_published

    try:
        declared = DeclaredSAE(model=model, layer=layer, normalization=normalization, kind=kind, k=k)
    except ValidationError as exc:
        _fail("; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()), 2)
    acts_nd = None
    if acts is not None:
        if acts.suffix != ".npy" or not acts.is_file():
            _fail(f"--acts {acts}: expected an existing .npy file of shape (n, d)", 2)
        array = np.load(acts, mmap_mode="r")
        if array.ndim != 2:
            _fail(f"--acts {acts}: shape {array.shape}, expected (n, d)", 2)
        acts_nd = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: the map is read-only
    with user_errors(err, _debug()):
        sae, pub, check = load_published(PublishedSAESpec(source=source, select=select, declared=declared), acts_nd)
    out.print(escape(pub.describe()), highlight=False)
    facts = {"model": pub.model, "layer": pub.layer, "hook": pub.hook, "dataset": pub.dataset, "normalisation": pub.normalization}
    out.print(escape("  " + ", ".join(f"{key} {value}" for key, value in facts.items() if value is not None)), highlight=False)
    for note in pub.notes:
        out.print(escape(f"  note: {note}"), highlight=False)
    for line in check.lines if check else ["not checked against its stated metrics: pass --acts"]:
        out.print(escape(f"  {line}"), highlight=False)
    if save is not None:
        with user_errors(err, _debug()), _disk_full_ends_cleanly([save]):
            save_published(sae, pub, check, save)
        out.print(escape(f"  saved as a saev-report checkpoint in {save}"), highlight=False)
    if check is not None:
        out.print(f"ok: loaded as saev-report {sae.kind} SAE, checked on {check.measured.n} activations", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
