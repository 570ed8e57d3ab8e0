"""The static feature atlas (see `site.build_site`; page addresses in `addresses`).

`build_site` is imported lazily: pool workers import `render.overlays` and need
not pay for DuckDB, pyarrow and jinja2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from saev_report.render.addresses import feature_title, safe_name, sae_slug, width_label

if TYPE_CHECKING:
    from saev_report.render.site import SiteStats, build_site

__all__ = ["build_site", "SiteStats", "feature_title", "safe_name", "sae_slug", "width_label"]


def __getattr__(name: str) -> Any:
    if name in ("build_site", "SiteStats"):
        from saev_report.render import site

        return getattr(site, name)
    raise AttributeError(name)
