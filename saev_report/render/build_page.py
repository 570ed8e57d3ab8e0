"""The "How this was built" page (`build.html`): a run's manifest, readable, with the resolved spec
to download (`build/spec.resolved.yaml`, and `build/manifest.json` whole).

It reads only `<run>/manifest.json` (`saev_report.manifest`), never the tables, so a site
re-rendered with `saev-report render` shows the build that made the tables.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Protocol

import yaml

from saev_report.plan import human_bytes, human_seconds

PAGE = "build.html"
FOLDER = "build"


class BuildPageSite(Protocol):
    """What this page needs of the site being built (`builder.SiteBuilder` is one)."""

    manifest: Mapping[str, Any] | None
    """The run's `manifest.json`; None (no page) for a run built before manifests."""
    resolved_spec: str | None
    """The run's `spec.resolved.yaml` as written, if there is one."""

    def render(self, template: str, page: str, **context: Any) -> None: ...
    def write(self, rel: str, text: str) -> None: ...


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}×"


def stage_rows(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each stage as the page's table shows it: measured next to estimated, and their ratios."""
    rows = []
    for stage in manifest.get("stages", []):
        measured = stage.get("measured") or {}
        estimate = stage.get("estimate") or {}
        rows.append({
            "name": stage["name"], "key": stage["key"], "status": stage["status"],
            "wall": human_seconds(measured.get("wall_s")), "rss": human_bytes(measured.get("peak_rss_bytes")),
            "rss_scope": measured.get("peak_rss_scope"), "disk": human_bytes(measured.get("disk_bytes")),
            "finished": measured.get("finished"), "device": measured.get("device"),
            "est_time": human_seconds(estimate.get("seconds")) if estimate else "—",
            "time_ratio": _ratio(estimate.get("time_ratio")), "est_disk": human_bytes(estimate.get("disk_bytes")) if estimate else "—",
            "disk_ratio": _ratio(estimate.get("disk_ratio")),
        })
    return rows


def build_build_page(site: BuildPageSite) -> None:
    """The page kind (`site.PAGE_KINDS`): `build.html` and its downloads, when the run has a manifest."""
    manifest = site.manifest
    if manifest is None:
        return
    spec_yaml = site.resolved_spec if site.resolved_spec is not None else yaml.safe_dump(manifest.get("spec", {}), sort_keys=False, allow_unicode=True)
    site.write(f"{FOLDER}/spec.resolved.yaml", spec_yaml)
    site.write(f"{FOLDER}/manifest.json", json.dumps(manifest, indent=1, default=str) + "\n")
    env = manifest.get("environment", {})
    total = sum((s.get("measured") or {}).get("wall_s", 0.0) for s in manifest.get("stages", []) if s.get("status") == "ran")
    site.render("build.html", PAGE, manifest=manifest, env=env, libraries=env.get("libraries", {}), device=env.get("device", {}),
                git=env.get("git"), stages=stage_rows(manifest), spec_yaml=spec_yaml, ran_s=human_seconds(total),
                steps={k: human_seconds(v.get("wall_s")) for k, v in (manifest.get("steps") or {}).items()})
