"""Chart data for the site: plotly figure specs (plain dicts, drawn by plotly.js in the
browser), tiny inline SVG histograms for feature pages, and JSON that is safe to embed.

Plotly figures are dicts rather than `plotly.graph_objects` so that building
them costs nothing; the browser validates them. Feature pages never get a
plotly chart (24K of them would not render in bounded time): an inline SVG
of a few hundred bytes shows their histogram instead.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any, Sequence

import numpy as np
from markupsafe import Markup

PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569", "#ea580c"]
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"


# --------------------------------------------------------------------------- safe JSON


def _plain(value: Any) -> Any:
    """JSON-able copy: numpy scalars/arrays to Python, NaN/inf to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def script_json(value: Any) -> str:
    """JSON that can sit inside <script> (inline or in a .js file): `<`, `>`, `&` and
    U+2028/9 are \\u-escaped, so `</script>` or `<!--` in a label cannot end the script."""
    try:  # plain Python data (most page data) needs no conversion pass
        text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):  # numpy values, NaN/inf
        text = json.dumps(_plain(value), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def data_script(path: str, value: Any) -> str:
    """A JS file that registers `value` under `SAEV.data[path]` (loaded with a script tag: works on file://)."""
    return f"window.SAEV=window.SAEV||{{data:{{}}}};SAEV.data[{script_json(path)}]={script_json(value)};\n"


def plotly_text(text: str) -> str:
    """Plotly draws text as pseudo-HTML (`<b>`, `<a href>`): escape it so labels show literally."""
    return html.escape(str(text), quote=False)


def sig(value: float | None, digits: int = 4) -> float | None:
    """One value to `digits` significant digits (None for missing or non-finite)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def round_sig(values: Sequence[float] | np.ndarray, digits: int = 4) -> list[float | None]:
    """Shortest JSON for chart data: `digits` significant digits, null for missing."""
    out: list[float | None] = []
    for v in np.asarray(values, dtype=np.float64).tolist():
        out.append(float(f"{v:.{digits}g}") if math.isfinite(v) else None)
    return out


# --------------------------------------------------------------------------- inline SVG


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def svg_histogram(
    counts: Sequence[int] | None,
    edges: Sequence[float] | None,
    *,
    width: int = 360,
    height: int = 96,
    x_label: str = "log₁₀ activation",
    unit: str = "patches",
    color: str = "#2563eb",
) -> Markup:
    """Bar histogram as inline SVG (numbers only are interpolated, so it is safe markup).

    All bars are one `<path>` (a few hundred bytes: this sits on every feature page);
    the peak bin and the total are in the accessible label."""
    counts_b = np.nan_to_num(np.asarray(counts if counts is not None else [], dtype=np.float64), nan=0.0)
    edges_b1 = np.asarray(edges if edges is not None else [], dtype=np.float64)
    if counts_b.size == 0 or edges_b1.size != counts_b.size + 1 or counts_b.max(initial=0) <= 0 or not np.isfinite(edges_b1).all():
        return Markup('<p class="muted">No histogram.</p>')
    pad_l, pad_b, pad_t = 4, 18, 4
    plot_w, plot_h = width - 2 * pad_l, height - pad_b - pad_t
    bar_w = plot_w / counts_b.size
    top = counts_b.max()
    base = pad_t + plot_h
    bars = "".join(
        f"M{pad_l + i * bar_w:.1f} {base}v{-plot_h * count / top:.1f}h{max(bar_w - 1, 0.5):.1f}V{base}z".replace(".0", "")
        for i, count in enumerate(counts_b) if count > 0
    )
    peak = int(counts_b.argmax())
    label = (f"histogram of {int(counts_b.sum()):,} {unit} over {_fmt(edges_b1[0])} to {_fmt(edges_b1[-1])}; "
             f"most in {_fmt(edges_b1[peak])} to {_fmt(edges_b1[peak + 1])}")
    return Markup(
        f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
        f"<title>{label}</title><path d=\"{bars}\" fill=\"{color}\"/>"
        f'<line x1="{pad_l}" x2="{width - pad_l}" y1="{base + 0.5}" y2="{base + 0.5}" stroke="#94a3b8"/>'
        f'<text x="{pad_l}" y="{height - 4}" class="tick">{_fmt(edges_b1[0])}</text>'
        f'<text x="{width / 2:.0f}" y="{height - 4}" class="tick" text-anchor="middle">{x_label}</text>'
        f'<text x="{width - pad_l}" y="{height - 4}" class="tick" text-anchor="end">{_fmt(edges_b1[-1])}</text></svg>'
    )


def score_histogram(scores: Sequence[float], bins: int = 40) -> tuple[list[int], list[float]]:
    """Counts and edges of match scores over the correlation range [-1, 1]."""
    values = np.asarray([s for s in scores if s is not None and math.isfinite(s)], dtype=np.float64)
    low = min(-0.2, float(values.min())) if values.size else -1.0
    counts, edges = np.histogram(values, bins=bins, range=(max(-1.0, math.floor(low * 10) / 10), 1.0))
    return counts.tolist(), edges.tolist()


# --------------------------------------------------------------------------- plotly specs


def base_layout(title: str, x_title: str, y_title: str, **extra: Any) -> dict[str, Any]:
    layout = {
        "title": {"text": title, "x": 0, "xanchor": "left", "font": {"size": 14}},
        "font": {"family": FONT, "size": 12, "color": "#1f2937"},
        "margin": {"l": 56, "r": 12, "t": 60, "b": 40},
        "height": 320,
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "#ffffff",
        "xaxis": {"title": {"text": x_title, "standoff": 6}, "gridcolor": "#e5e7eb", "zeroline": False, "automargin": True},
        "yaxis": {"title": {"text": y_title}, "gridcolor": "#e5e7eb", "zeroline": False, "automargin": True},
        # Above the plot, right-aligned: never collides with the axis title below.
        "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom", "font": {"size": 11}, "bgcolor": "rgba(255,255,255,0)"},
        "hovermode": "closest",
        "modebar": {"remove": ["select2d", "lasso2d"]},
    }
    layout.update(extra)
    return layout


KIND_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "cross", "x", "star", "pentagon")
"""Marker of each SAE kind in the L0 scatter, in the order kinds first appear."""


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower L0 and lower error), by increasing L0."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def metric_scatter(saes: list[dict[str, Any]], y: str, y_title: str, sub_models: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """L0 against a reconstruction metric: colour per model, marker per SAE kind, and each (model, kind)'s
    frontier as a line; `sub_models` rows (a Matryoshka SAE's prefixes, with `model_label`, `kind`,
    `sae_id`, `name`, `list_page`) as their own open markers. Hover names the SAE."""
    traces = []
    kinds = list(dict.fromkeys(s.get("kind") or "sae" for s in saes))
    for i, model in enumerate(dict.fromkeys(s["model_label"] for s in saes)):
        colour = PALETTE[i % len(PALETTE)]
        for kind in kinds:
            rows = [s for s in saes if s["model_label"] == model and (s.get("kind") or "sae") == kind
                    and s.get("l0") is not None and s.get(y) is not None]
            if not rows:
                continue
            name = plotly_text(f"{model} · {kind}" if len(kinds) > 1 else model)
            symbol = KIND_SYMBOLS[kinds.index(kind) % len(KIND_SYMBOLS)]
            traces.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "name": name,
                    "legendgroup": name,
                    "x": round_sig([r["l0"] for r in rows]),
                    "y": round_sig([r[y] for r in rows]),
                    "text": [plotly_text(r["sae_id"]) for r in rows],
                    "customdata": [r["list_page"] for r in rows],
                    "hovertemplate": "%{text}<br>L0 %{x}<br>" + y_title + " %{y}<extra></extra>",
                    "marker": {"size": 10, "color": colour, "symbol": symbol, "line": {"width": 1, "color": "#fff"}},
                }
            )
            front = pareto_front([(float(r["l0"]), float(r[y])) for r in rows])
            if len(front) > 1:
                traces.append({"type": "scatter", "mode": "lines", "name": name + " frontier", "legendgroup": name, "showlegend": False,
                               "x": round_sig([p[0] for p in front]), "y": round_sig([p[1] for p in front]), "hoverinfo": "skip",
                               "line": {"width": 1.5, "color": colour, "dash": "dot" if kinds.index(kind) else "solid"}})
        subs = [r for r in sub_models if r["model_label"] == model and r.get("l0") is not None and r.get(y) is not None]
        if subs:
            name = plotly_text(f"{model} · {subs[0].get('kind') or 'nested'} prefixes")
            traces.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "name": name,
                    "x": round_sig([r["l0"] for r in subs]),
                    "y": round_sig([r[y] for r in subs]),
                    "text": [plotly_text(f"{r['sae_id']} · {r['name']} ({r['n_features']} features)") for r in subs],
                    "customdata": [r["list_page"] for r in subs],
                    "hovertemplate": "%{text}<br>L0 %{x}<br>" + y_title + " %{y}<extra></extra>",
                    "marker": {"size": 9, "color": "rgba(0,0,0,0)", "symbol": "circle-open", "line": {"width": 2, "color": colour}},
                }
            )
    return {"data": traces, "layout": base_layout(f"L0 vs {y_title}", "L0 (active features per patch)", y_title)}


def training_curves(logs: dict[str, dict[str, list[float]]], metric: str, title: str, names: dict[str, str] | None = None) -> dict[str, Any]:
    """One line per SAE of `metric` against optimiser step; `names` gives legend names by SAE id."""
    traces = []
    for i, (sae_id, log) in enumerate(logs.items()):
        if not log.get(metric) or all(v is None for v in log[metric]):
            continue
        traces.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": plotly_text((names or {}).get(sae_id, sae_id)),
                "x": log["step"],
                "y": round_sig(log[metric]),
                "line": {"width": 1.5, "color": PALETTE[i % len(PALETTE)]},
                "hovertemplate": "%{fullData.name}<br>step %{x}<br>" + title + " %{y}<extra></extra>",
            }
        )
    layout = base_layout(title, "step", title)
    if len(traces) > 3:  # a long sweep: hover names the SAE; a legend would bury the plot
        layout["showlegend"] = False
    return {"data": traces, "layout": layout}


def ap_distributions(series: list[dict[str, Any]], level: str) -> dict[str, Any]:
    """Box plots (quartiles and 5–95 % whiskers, precomputed so the page stays small) of each SAE's
    best-concept AP per feature, each next to the same statistic under permuted labels (the null).
    `series`: {"name", "ap": values, "null_ap": values}; a newline in a name breaks its axis label."""
    traces = []

    def box(name: str, values: Sequence[float], color: str, group: str) -> dict[str, Any] | None:
        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
        if not v.size:
            return None
        q05, q1, med, q3, q95 = (float(x) for x in np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95]))
        return {
            "type": "box", "name": plotly_text(name), "x": [plotly_text(group).replace("\n", "<br>")], "offsetgroup": "null" if color == "#94a3b8" else "sae",
            "q1": [round_sig([q1])[0]], "median": [round_sig([med])[0]], "q3": [round_sig([q3])[0]],
            "lowerfence": [round_sig([q05])[0]], "upperfence": [round_sig([q95])[0]],
            "marker": {"color": color}, "line": {"width": 1.5}, "showlegend": False,
            "hovertemplate": f"{plotly_text(name)} · {v.size:,} features<br>median %{{median}}<br>quartiles %{{q1}} – %{{q3}}<extra></extra>",
        }

    for i, s in enumerate(series):
        for trace in (box(s["name"], s["ap"], PALETTE[i % len(PALETTE)], s["name"]),
                      box(f"{s['name']} · permuted labels", s["null_ap"], "#94a3b8", s["name"])):
            if trace is not None:
                traces.append(trace)
    layout = base_layout(f"Best-concept AP per feature ({level} level); grey: permuted labels",
                         "SAE", "AP of the best concept", boxmode="group")
    layout["yaxis"]["rangemode"] = "tozero"
    layout["height"] = 380
    return {"data": traces, "layout": layout}


LIFT_THRESHOLDS = np.round(np.arange(0.05, 1.0001, 0.05), 2)
"""Where `lift_tails` counts features: AP lift 0.05, 0.10, …, 1."""


def lift_tails(series: list[dict[str, Any]], level: str) -> dict[str, Any]:
    """For each SAE (solid) and its permuted-label null (dotted grey), how many features' best concept
    is detected at AP lift (AP above chance, `concepts.ap_lift`) ≥ t, for t in `LIFT_THRESHOLDS`.
    Lift is comparable across concepts of any base rate, where raw AP is not: a feature whose best
    concept is a background covering 85 % of the patches has AP ≥ 0.85 and may know nothing.
    `series`: {"name", "lift": values, "null_lift": values}. Counts of 0 are left out (log axis)."""
    traces = []

    def line(name: str, group: str, values: Sequence[float], color: str, null: bool) -> dict[str, Any]:
        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
        counts = [int((v >= t).sum()) for t in LIFT_THRESHOLDS]
        return {
            "type": "scatter", "mode": "lines", "name": plotly_text(name), "x": LIFT_THRESHOLDS.tolist(),
            "y": [c if c > 0 else None for c in counts], "line": {"color": color, "dash": "dot" if null else "solid", "width": 1.5},
            "legendgroup": plotly_text(group), "showlegend": not null,  # the legend toggles an SAE and its null together
            "hovertemplate": f"{plotly_text(name)}<br>%{{y}} features with AP lift ≥ %{{x}}<extra></extra>",
        }

    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        traces.append(line(s["name"], s["name"], s["lift"], color, null=False))
        traces.append(line(f"{s['name']} · permuted labels", s["name"], s["null_lift"], color, null=True))
    layout = base_layout(f"Features at AP lift ≥ t ({level} level); dotted: permuted labels",
                         "t: AP lift = (AP − base rate) / (1 − base rate)", "features",
                         legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -0.28, "yanchor": "top", "font": {"size": 11}})
    layout["height"] = 380
    layout["yaxis"]["type"] = "log"
    return {"data": traces, "layout": layout}
