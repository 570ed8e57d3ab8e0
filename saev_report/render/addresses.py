"""Stable, citable addresses of the site's pages and the paper's feature notation.

Every page lives at a path derived only from table values, so a link to a
feature stays valid across rebuilds:

    index.html                                    runs, SAEs, metrics, charts
    features/<model>/<sae_slug>/index.html        searchable feature list of one SAE
    features/<model>/<sae_slug>/<feature>.html    one feature
    edits/index.html, edits/<edit>/<n>.html       intervention gallery
    compare/<comparison>.html                     cross-model / cross-seed matches
    data/<model>/<sae_slug>.js                    columnar feature index (a JS file, so file:// works)
    img/<kind>/<hash>.jpg                         thumbnails and overlays, content-addressed

SAE slugs. An `sae_id` is `<model>/L<layer>/<tag>` (it contains slashes), so
the page folder uses a slug: the model prefix is dropped (the model is already
the parent folder) and `L<layer>/<tag>` becomes `L<layer>-<tag>`, e.g.
`dino/L10/relu-x16-l1_0.0004-s0` → `features/dino/L10-relu-x16-l1_0.0004-s0/`.
That mapping is one-to-one because `L<digits>` holds no `-`. Any id outside this
shape, or any character outside `[A-Za-z0-9._~-]`, is replaced by `_` and the
first 8 hex digits of the SHA-256 of the original text are appended, which keeps
distinct ids distinct (`safe_name`).
"""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._~-]")
_CANONICAL_SAE = re.compile(r"^L(\d+)/([A-Za-z0-9._~-]+)$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_MAX_LEN = 96


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def safe_name(text: str) -> str:
    """A path component safe on every filesystem and in a URL without quoting.

    Unchanged when `text` is already safe; otherwise unsafe characters become `_`
    and a digest of the original is appended, so distinct inputs stay distinct.
    """
    cleaned = _UNSAFE.sub("_", text)
    needs_digest = (
        cleaned != text
        or not cleaned
        or not cleaned[0].isalnum()  # no hidden files, no `..`, no leading `-` or `~`
        or cleaned.split(".")[0].lower() in _WINDOWS_RESERVED
        or len(cleaned) > _MAX_LEN
    )
    if not needs_digest:
        return cleaned
    stem = cleaned.lstrip("._~-")[: _MAX_LEN - 9] or "x"
    return f"{stem}-{_digest(text)}"


def sae_slug(sae_id: str, model: str) -> str:
    """Folder name of an SAE below `features/<model>/` (see the module docstring)."""
    rest = sae_id[len(model) + 1 :] if sae_id.startswith(model + "/") else sae_id
    canonical = _CANONICAL_SAE.match(rest)
    if canonical:
        candidate = "L{}-{}".format(*canonical.groups())
        if safe_name(candidate) == candidate:
            return candidate
    return safe_name(rest)  # `/` is unsafe, so this appends a digest


def unique_slugs(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """`(model, sae_id)` → slug, adding a digest where two slugs would collide on a case-insensitive filesystem."""
    slugs = {key: sae_slug(key[1], key[0]) for key in keys}
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for key, slug in sorted(slugs.items()):
        folder = (safe_name(key[0]).lower(), slug.lower())
        if folder in seen:
            slugs[key] = f"{slug[: _MAX_LEN - 9]}-{_digest(key[1])}"
        seen[folder] = key
    return slugs


def width_label(n_features: int) -> str:
    """Dictionary width as the paper writes it: 24,576 → `24K`, 6,144 → `6K`."""
    if n_features >= 1024 and n_features % 1024 == 0:
        return f"{n_features // 1024}K"
    if n_features >= 1000 and n_features % 1000 == 0:
        return f"{n_features // 1000}K"
    if n_features >= 10_000:
        return f"{round(n_features / 1024)}K"
    return str(n_features)


def feature_title(model_label: str, n_features: int, feature: int) -> str:
    """The paper's MODEL-WIDTH/INDEX notation, e.g. `CLIP-24K/20652`."""
    return f"{model_label}-{width_label(n_features)}/{feature}"


def sae_dir(model: str, slug: str) -> str:
    return f"features/{safe_name(model)}/{slug}"


def feature_page(model: str, slug: str, feature: int) -> str:
    return f"{sae_dir(model, slug)}/{int(feature)}.html"


def sae_page(model: str, slug: str) -> str:
    return f"{sae_dir(model, slug)}/index.html"


def sae_data(model: str, slug: str) -> str:
    return f"data/{safe_name(model)}/{slug}.js"


def edit_page(edit_id: str) -> str:
    """`<edit>/<n>` → `edits/<edit>/<n>.html` (controls are shown on their edit's page)."""
    edit, _, rest = edit_id.partition("/")
    return f"edits/{safe_name(edit)}/{safe_name(rest or '0')}.html"


def compare_page(comparison: str) -> str:
    return f"compare/{safe_name(comparison)}.html"


def image_file(kind: str, name: str) -> str:
    """Content-addressed image: two-level fan-out keeps directories small at 300K files."""
    return f"img/{kind}/{name[:2]}/{name}.jpg"


def root_of(page: str) -> str:
    """Relative prefix from `page` back to the site root (`features/a/b/1.html` → `../../../`)."""
    return "../" * page.count("/")
