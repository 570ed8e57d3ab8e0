"""Patch heat-maps as data: quantised per feature, packed per page, drawn by the browser.

The site stores each picture once (one thumbnail per distinct image) and draws
every exemplar's heat-map in the browser, from a patch map of one byte per
patch. The bytes of a feature are on one colour scale: 0 means the feature is
silent at that patch, 1–255 map (0, vmax] linearly, rounding up so that a
patch where it fires is never drawn as silent. `vmax` is the feature's
strongest shown exemplar activation.

A page carries all of its maps in one zlib stream (`pack`), base64 inside a
`<script type="application/json">`: mostly-zero maps compress several-fold,
and browsers inflate it with `DecompressionStream` (no server, works on
file://). When scripts fail the `<img>` under each map still shows.

The colour map (inferno, sampled at 9 points) is written to the site as
`assets/colormap.js`, so Python and JavaScript use the same 256 colours.
"""

from __future__ import annotations

import base64
import zlib
from typing import Sequence

import numpy as np

# Inferno, sampled at 9 points; dark → bright reads as low → high on any photo.
_INFERNO_ANCHORS = np.array(
    [(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85), (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)],
    dtype=np.float64,
)
_STOPS = np.linspace(0, 1, len(_INFERNO_ANCHORS))
COLORMAP_256x3 = np.stack([np.interp(np.linspace(0, 1, 256), _STOPS, _INFERNO_ANCHORS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)
MAX_ALPHA = 0.85
"""Opacity of a patch at vmax; a patch at t = q/255 gets MAX_ALPHA·√t (weak patches stay visible)."""
OUTLINE_RGB = (34, 211, 238)  # cyan: stands out against every inferno colour


def quantize(acts_np: np.ndarray, vmax: float | np.ndarray) -> np.ndarray:
    """Activations → uint8 on the feature's scale (see the module docstring); `vmax` is a number or an
    array broadcast against the activations (one scale per value: a whole chunk of features at once)."""
    acts = np.asarray(acts_np, dtype=np.float64)
    vmax = np.asarray(vmax, dtype=np.float64)
    unusable = ~((vmax > 0) & np.isfinite(vmax))  # no scale: silent everywhere
    with np.errstate(divide="ignore", invalid="ignore"):
        q = acts / np.where(unusable, np.inf, vmax)  # in place from here: a chunk holds millions of values
    np.clip(q, 0.0, 1.0, out=q)
    q *= 255.0
    np.ceil(q, out=q)
    np.nan_to_num(q, copy=False, nan=0.0)
    # A firing patch is never silent, even where its ratio underflows (acts > 0 is False for NaN and with no scale).
    np.maximum(q, (acts > 0) & ~unusable, out=q)
    return q.astype(np.uint8)


def rgba(q_p: np.ndarray) -> np.ndarray:
    """[patches, 4] straight-alpha RGBA the browser draws for quantised values (the reference for tests)."""
    q = np.asarray(q_p, dtype=np.int64)
    alpha = np.where(q > 0, np.round(255 * MAX_ALPHA * np.sqrt(q / 255.0)), 0)
    return np.column_stack([COLORMAP_256x3[q], alpha]).astype(np.uint8)


def pack(maps: Sequence[np.ndarray]) -> str:
    """Concatenated uint8 maps → base64 of their zlib stream ('' for none, or only empty ones)."""
    raw = b"".join(np.ascontiguousarray(m, dtype=np.uint8).tobytes() for m in maps)
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii") if raw else ""


def unpack(text: str) -> bytes:
    """Inverse of `pack` (tests; the browser inflates with DecompressionStream)."""
    return zlib.decompress(base64.b64decode(text)) if text else b""


def colormap_script() -> str:
    """`assets/colormap.js`: the 256 colours and the opacity rule as JS."""
    flat = ",".join(str(int(v)) for v in COLORMAP_256x3.reshape(-1))
    outline = "#%02x%02x%02x" % OUTLINE_RGB
    return f'window.SAEV=window.SAEV||{{data:{{}}}};SAEV.colormap={{rgb:[{flat}],maxAlpha:{MAX_ALPHA},outline:"{outline}"}};\n'
