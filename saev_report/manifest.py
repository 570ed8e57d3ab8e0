"""`runs/<name>/manifest.json`: how a run was built, enough to build it again.

Every build writes it (atomically, when the build ends, and when a stage fails):

- the spec as resolved, every default filled in and the `--set` overrides applied, and its hash
  (`Spec` → YAML → `Spec` is exact, so `saev-report build` of `spec.resolved.yaml` makes the
  same stages with the same keys, hence the same tables);
- the spec file, its own hash and the overrides as typed;
- saev-report's version and git commit (when it runs from a checkout), Python, the libraries
  whose versions move results, the device and the CPU / GPU model;
- every stage: its status in this build (`ran`, `cached`, `failed`, `not run`), its key, and what
  was measured when it ran (wall time, peak RSS, disk), next to `plan`'s estimate where there is
  one, with their ratio.

A stage's measurements are kept beside its output folder (`cache/<kind>/<label>-<key>.measured.json`,
written just before the folder is renamed into place), so a cached stage still reports the run
that made it, and the stage folder itself stays byte-identical whatever machine built it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from saev_report import __version__
from saev_report.fsutil import atomic_write_text
from saev_report.spec import Spec, content_hash

MANIFEST_FILE = "manifest.json"
RESOLVED_SPEC_FILE = "spec.resolved.yaml"
FORMAT_VERSION = 1

LIBRARIES: dict[str, str] = {
    "torch": "torch",
    "transformers": "transformers",
    "timm": "timm",
    "open_clip": "open_clip_torch",
    "duckdb": "duckdb",
    "pyarrow": "pyarrow",
    "numpy": "numpy",
}
"""Libraries whose versions the manifest records: name shown → distribution name (null if absent)."""


# --------------------------------------------------------------------------- one stage's measurements


@dataclass(frozen=True)
class StageMeasurement:
    """What one run of a stage took, measured on the process that ran it (rank 0 under torchrun)."""

    wall_s: float
    """Wall-clock seconds of the stage's action."""
    peak_rss_bytes: int | None
    """Peak resident memory during the stage (the kernel's high-water mark, reset when it starts)."""
    peak_rss_scope: str
    """`stage` when the high-water mark was reset at its start (Linux), `process` when it is the
    process's peak so far (it then includes the stages before)."""
    disk_bytes: int
    """Bytes of the finished output folder (hard links counted once)."""
    finished: str
    """UTC time the stage finished (ISO 8601)."""
    device: str
    """The device the stage ran on (`cpu`, `cuda`, `mps`)."""


def measured_path(out_dir: Path) -> Path:
    """Where the measurements of the stage whose output folder is `out_dir` are kept."""
    return out_dir.with_name(out_dir.name + ".measured.json")


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ≥ 4.0); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process's RSS high-water mark (since the last reset where there was one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


@dataclass
class Meter:
    """Filled by `measure` when its block ends."""

    wall_s: float = 0.0
    peak_rss_bytes: int | None = None
    peak_rss_scope: str = "process"


@contextmanager
def measure() -> Iterator[Meter]:
    """Time a block and take its peak RSS."""
    meter = Meter(peak_rss_scope="stage" if _reset_peak_rss() else "process")
    started = time.perf_counter()
    try:
        yield meter
    finally:
        meter.wall_s = time.perf_counter() - started
        meter.peak_rss_bytes = peak_rss_bytes()


def write_measurement(out_dir: Path, meter: Meter, folder: Path, device: str) -> StageMeasurement:
    """Record a finished stage's measurements (its output is in `folder`, about to become `out_dir`)."""
    measurement = StageMeasurement(
        wall_s=round(meter.wall_s, 3), peak_rss_bytes=meter.peak_rss_bytes, peak_rss_scope=meter.peak_rss_scope,
        disk_bytes=folder_bytes(folder), finished=now_utc(), device=device)
    atomic_write_text(measured_path(out_dir), json.dumps(asdict(measurement), indent=1) + "\n")
    return measurement


def read_measurement(out_dir: Path) -> StageMeasurement | None:
    """The measurements of the stage at `out_dir`, None when it was built before they were kept."""
    try:
        data = json.loads(measured_path(out_dir).read_text(encoding="utf-8"))
        return StageMeasurement(**data)
    except (OSError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------- the environment


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str | None]:
    """Version of each of `LIBRARIES`, None for one that is not installed."""
    versions: dict[str, str | None] = {}
    for name, dist in LIBRARIES.items():
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(folder: Path | None = None) -> dict[str, Any] | None:
    """{commit, dirty} of the checkout saev-report runs from; None outside a git checkout."""
    folder = folder or Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device_name: str) -> dict[str, Any]:
    """The device the spec asks for, the one it resolved to, and the CPU and GPU models."""
    info: dict[str, Any] = {"requested": device_name, "resolved": None, "cpu": cpu_model(),
                            "cpu_count": os.cpu_count(), "gpu": None}
    try:
        import torch

        from saev_report.runtime import pick_device

        info["resolved"] = pick_device(device_name).type
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except (ImportError, RuntimeError):
        pass
    return info


def environment(device_name: str) -> dict[str, Any]:
    return {
        "saev_report": __version__,
        "git": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "device": device_info(device_name),
    }


# --------------------------------------------------------------------------- the manifest


def resolved_spec(spec: Spec) -> dict[str, Any]:
    """The spec with every default filled in, as plain YAML/JSON data."""
    return spec.model_dump(mode="json")


def resolved_spec_yaml(spec: Spec) -> str:
    return ("# The resolved spec of this run (defaults and --set overrides applied), written by saev-report.\n"
            "# Build it again with: saev-report build spec.resolved.yaml\n"
            + yaml.safe_dump(resolved_spec(spec), sort_keys=False, allow_unicode=True))


@dataclass(frozen=True)
class Provenance:
    """Where the spec came from: the file and the `--set` flags, as the user typed them."""

    spec_file: Path | None = None
    overrides: tuple[str, ...] = ()


@dataclass
class StageRecord:
    """One stage in the manifest."""

    name: str
    kind: str
    label: str
    key: str
    status: str
    """`ran` in this build, `cached` (done before), `failed`, or `not run` (left out by `--only`, or after a failure)."""
    measured: dict[str, Any] | None = None
    """`StageMeasurement` of the run that made the output, if kept."""
    estimate: dict[str, Any] | None = None
    """`plan`'s estimate on the device it ran on: seconds and disk bytes, with measured / estimated ratios."""


def stage_record(stage, run_dir: Path, status: str, estimates: Mapping[str, Any]) -> StageRecord:
    """`stage` (a `stages.Stage`) as the manifest shows it."""
    from saev_report.plan import ratio

    out_dir = stage.out_dir(run_dir)
    measurement = read_measurement(out_dir) if out_dir.is_dir() else None
    measured = asdict(measurement) if measurement else None
    estimate = None
    found = estimates.get(stage.name)
    if found is not None:
        device = measurement.device if measurement else "cpu"
        seconds = found.seconds_on(device)
        estimate = {"device": device, "seconds": seconds, "disk_bytes": found.disk_bytes,
                    "time_ratio": ratio(measurement.wall_s, seconds) if measurement else None,
                    "disk_ratio": ratio(measurement.disk_bytes, found.disk_bytes) if measurement else None}
    return StageRecord(stage.name, stage.kind.name, stage.label, stage.key, status, measured, estimate)


def build_manifest(spec: Spec, run_dir: Path, stage_list: Sequence, statuses: Mapping[str, str],
                   provenance: Provenance, cache_dir: Path, started: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from saev_report.plan import stage_estimates

    estimates = stage_estimates(spec)
    spec_file = None
    if provenance.spec_file is not None:
        path = Path(provenance.spec_file)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        except OSError:
            digest = None
        spec_file = {"path": str(path), "sha256": digest}
    return {
        "format": FORMAT_VERSION,
        "run": spec.run.name,
        "started": started,
        "finished": now_utc(),
        "cwd": os.getcwd(),
        "cache_dir": str(cache_dir),
        "spec_file": spec_file,
        "overrides": list(provenance.overrides),
        "spec_hash": content_hash(spec),
        "spec": resolved_spec(spec),
        "environment": environment(spec.run.device),
        "stages": [asdict(stage_record(s, run_dir, statuses.get(s.name, "not run"), estimates)) for s in stage_list],
        **(extra or {}),
    }


def write_manifest(run_dir: Path, manifest: Mapping[str, Any], spec: Spec) -> Path:
    """`<run>/manifest.json` and `<run>/spec.resolved.yaml`, each written atomically."""
    atomic_write_text(Path(run_dir) / RESOLVED_SPEC_FILE, resolved_spec_yaml(spec))
    return atomic_write_text(Path(run_dir) / MANIFEST_FILE, json.dumps(manifest, indent=1, default=str) + "\n")


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
