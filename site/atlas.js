/* saev-report atlas: index charts, per-SAE density scatter, the searchable feature list, heat-maps
 * painted over shared thumbnails, and keyboard navigation between feature pages.
 * Plain JS, no frameworks, no network: every data file is a <script> that registers itself in
 * SAEV.data, so the site works from file://. Text from the data is only ever set with
 * textContent (never innerHTML), and escaped before plotly draws it as pseudo-HTML. */
(function () {
  "use strict";
  var SAEV = (window.SAEV = window.SAEV || { data: {} });
  SAEV.data = SAEV.data || {};
  // Field positions of the rows Python writes as lists (generated from saev_report/render/contract.py
  // and prepended to this file by the site build; an unknown row or field name throws).
  var F = SAEV.F;
  var body = document.body;
  var root = body.getAttribute("data-root") || "";
  var PLOT_CONFIG = { responsive: true, displaylogo: false, displayModeBar: "hover" }; // plotly.js 4 pins the modebar unless told
  var FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif";
  var PAGE_SIZE = 50;

  // ------------------------------------------------------------------ helpers

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function plotlyText(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(parseFloat(v.toPrecision(4)));
  }

  function pct(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    return String(parseFloat((100 * v).toPrecision(3))) + "%";
  }

  function loadScript(src, done) {
    var s = document.createElement("script");
    s.src = src;
    s.onload = done;
    s.onerror = function () { console.warn("saev-report: cannot load " + src); };
    document.head.appendChild(s);
  }

  function hasWebGL() {
    try {
      var c = document.createElement("canvas");
      return !!(window.WebGLRenderingContext && (c.getContext("webgl") || c.getContext("experimental-webgl")));
    } catch (e) {
      return false;
    }
  }

  function hasPlotly() {
    return typeof window.Plotly !== "undefined";
  }

  function layout(extra) {
    var base = {
      font: { family: FONT, size: 12, color: "#1f2937" },
      margin: { l: 56, r: 12, t: 16, b: 44 },
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "#ffffff",
      hovermode: "closest",
      modebar: { remove: ["select2d", "lasso2d"] },
      xaxis: { gridcolor: "#e5e7eb", zeroline: false },
      yaxis: { gridcolor: "#e5e7eb", zeroline: false }
    };
    Object.keys(extra || {}).forEach(function (k) { base[k] = extra[k]; });
    return base;
  }

  // ------------------------------------------------------------------ density scatter

  /* One point per live feature: log10 frequency against log10 mean activation, coloured by
   * label purity. WebGL (scattergl) keeps 24K points responsive; SVG is the fallback. */
  function densityScatter(div, d, pagePrefix) {
    var x = [], y = [], text = [], color = [], idx = [];
    var hasPurity = false;
    for (var i = 0; i < d.feature.length; i++) {
      if (d.log10_freq[i] === null || d.log10_mean_act[i] === null) continue;
      x.push(d.log10_freq[i]);
      y.push(d.log10_mean_act[i]);
      var label = d.label[i] >= 0 ? d.labels[d.label[i]] : null;
      text.push(plotlyText(d.short + "/" + d.feature[i] + (label !== null ? " · " + label : "")));
      color.push(d.purity[i] === null ? 0 : d.purity[i]);
      if (d.purity[i] !== null) hasPurity = true;
      idx.push(i);
    }
    var size = x.length > 5000 ? 3 : x.length > 500 ? 4 : 6;
    var marker = { size: size, opacity: 0.75, color: "#2563eb" };
    if (hasPurity) {
      marker = { size: size, opacity: 0.8, color: color, cmin: 0, cmax: 1, colorscale: "Viridis",
        colorbar: { title: { text: "purity" }, thickness: 12, len: 0.8 } };
    }
    var trace = {
      type: hasWebGL() ? "scattergl" : "scatter",
      mode: "markers",
      x: x,
      y: y,
      text: text,
      customdata: idx,
      hovertemplate: "%{text}<br>log10 freq %{x:.3f}<br>log10 mean act %{y:.3f}<extra></extra>",
      marker: marker
    };
    var lay = layout({
      height: 440,
      xaxis: { title: { text: "log10 frequency" }, gridcolor: "#e5e7eb", zeroline: false },
      yaxis: { title: { text: "log10 mean activation" }, gridcolor: "#e5e7eb", zeroline: false }
    });
    Plotly.react(div, [trace], lay, PLOT_CONFIG);
    if (!div.__saevClick) {
      div.__saevClick = true;
      div.on("plotly_click", function (ev) {
        var p = ev.points && ev.points[0];
        var dd = div.__saevData;
        if (!p || !dd) return;
        var i = p.customdata;
        if (dd.page[i]) window.location.href = div.__saevPrefix + dd.feature[i] + ".html";
      });
    }
    div.__saevData = d;
    div.__saevPrefix = pagePrefix;
  }

  // ------------------------------------------------------------------ index page

  function initIndex() {
    var index = SAEV.data.index || { figures: {}, saes: [] };
    if (!hasPlotly()) return;
    document.querySelectorAll("[data-figure]").forEach(function (div) {
      var fig = index.figures[div.getAttribute("data-figure")];
      if (!fig) return;
      Plotly.newPlot(div, fig.data, fig.layout, PLOT_CONFIG);
      div.on("plotly_click", function (ev) {
        var p = ev.points && ev.points[0];
        if (p && typeof p.customdata === "string") window.location.href = root + p.customdata;
      });
    });
    var select = document.getElementById("scatter-sae");
    var div = document.getElementById("scatter");
    if (!select || !div || !index.saes.length) return;
    function show() {
      var s = index.saes[Number(select.value) || 0];
      var draw = function () {
        var d = SAEV.data[s.data];
        if (d) densityScatter(div, d, root + d.page_dir);
      };
      if (SAEV.data[s.data]) draw();
      else loadScript(root + s.data, draw); // a script tag, not an XHR: browsers allow it on file://
    }
    select.addEventListener("change", show);
    show();
  }

  // ------------------------------------------------------------------ list state (shared by the list and feature pages)

  /* The list's sort and filters live in the address (#sort=freq&dir=asc&q=cat&p=2), so a filtered,
   * sorted list can be shared, and feature pages opened from it step through the same order. */
  var DEFAULTS = { q: "", sort: "max_act", dir: "desc", label: "", concept: "", fmin: "", fmax: "", amin: "", pmin: "", apmin: "", dead: "1", dense: "0", pages: "0", p: "1" };
  var STATE_KEYS = Object.keys(DEFAULTS);

  function readState(hash) {
    var params = new URLSearchParams(String(hash || "").replace(/^#/, ""));
    var state = {};
    STATE_KEYS.forEach(function (k) { state[k] = params.has(k) ? params.get(k) : DEFAULTS[k]; });
    return state;
  }

  function stateHash(state, withPage) {
    var params = new URLSearchParams();
    STATE_KEYS.forEach(function (k) {
      if (k === "p" && !withPage) return;
      var v = String(state[k] === undefined ? DEFAULTS[k] : state[k]).trim();
      if (v !== DEFAULTS[k]) params.set(k, v);
    });
    var text = params.toString();
    return text ? "#" + text : "";
  }

  var SORTS = {
    max_act: function (d, i) { return d.max_act[i]; },
    freq: function (d, i) { return d.freq[i]; },
    mean_act: function (d, i) { return d.mean_act[i]; },
    purity: function (d, i) { return d.purity[i]; },
    label: function (d, i) { return d.label[i] >= 0 ? d.labels[d.label[i]].toLowerCase() : null; },
    concept_ap: function (d, i) { return d.concept_ap ? d.concept_ap[i] : null; },
    concept: function (d, i) { return d.concept && d.concept[i] >= 0 ? d.concepts[d.concept[i]].toLowerCase() : null; },
    feature: function (d, i) { return d.feature[i]; }
  };

  function parseNumber(text) {
    var v = parseFloat(String(text).trim());
    return isFinite(v) ? v : null;
  }

  /* "1234" → ids starting with 1234; "#1234" or "DINOv2-6K/1234" → exactly 1234; else a substring of the
   * top label or (when the concepts stage ran) of the best concept. */
  function matcher(d, query) {
    var q = String(query || "").trim().toLowerCase();
    if (!q) return function () { return true; };
    var m = /^(?:.*\/|#)?(\d+)$/.exec(q);
    if (m) {
      var exact = q !== m[1];
      return function (i) {
        var id = String(d.feature[i]);
        return exact ? id === m[1] : id.indexOf(m[1]) === 0;
      };
    }
    var hit = function (list) { return (list || []).map(function (l) { return l.toLowerCase().indexOf(q) >= 0; }); };
    var labelHits = hit(d.labels), conceptHits = hit(d.concepts);
    return function (i) {
      return (d.label[i] >= 0 && labelHits[d.label[i]]) || (d.concept !== undefined && d.concept[i] >= 0 && conceptHits[d.concept[i]]);
    };
  }

  /* Indices of the features the list shows for `state`, in its order. */
  function computeOrder(d, state) {
    var match = matcher(d, state.q);
    var fmin = parseNumber(state.fmin), fmax = parseNumber(state.fmax), amin = parseNumber(state.amin), pmin = parseNumber(state.pmin);
    var label = state.label === "" ? -1 : d.labels.indexOf(state.label);
    var hasConcepts = !!(d.concepts && d.concepts.length);
    var concept = hasConcepts && state.concept ? d.concepts.indexOf(state.concept) : -1;
    var apmin = hasConcepts ? parseNumber(state.apmin) : null;
    var hideDead = state.dead === "1", hideDense = state.dense === "1", pagesOnly = state.pages === "1";
    var order = [];
    for (var i = 0; i < d.feature.length; i++) {
      if (hideDead && d.dead[i]) continue;
      if (hideDense && d.dense[i]) continue;
      if (pagesOnly && !d.page[i]) continue;
      if (state.label !== "" && d.label[i] !== label) continue;
      if (fmin !== null && !(d.freq[i] >= fmin)) continue;
      if (fmax !== null && !(d.freq[i] <= fmax)) continue;
      if (amin !== null && !(d.max_act[i] >= amin)) continue;
      if (pmin !== null && !(d.purity[i] >= pmin)) continue;
      if (hasConcepts && state.concept && d.concept[i] !== concept) continue;
      if (apmin !== null && !(d.concept_ap[i] >= apmin)) continue;
      if (!match(i)) continue;
      order.push(i);
    }
    var get = SORTS[state.sort] || SORTS.max_act;
    var sign = state.dir === "asc" ? 1 : -1;
    order.sort(function (a, b) {
      var va = get(d, a), vb = get(d, b);
      if (va === null && vb === null) return d.feature[a] - d.feature[b];
      if (va === null) return 1; // missing values last in either direction
      if (vb === null) return -1;
      if (va < vb) return -sign;
      if (va > vb) return sign;
      return d.feature[a] - d.feature[b];
    });
    return order;
  }

  function describeState(state) {
    var sortName = { max_act: "max activation", freq: "frequency", mean_act: "mean activation", purity: "label purity", label: "top label",
                     concept_ap: "concept AP", concept: "best concept", feature: "feature id" };
    var parts = [(sortName[state.sort] || "max activation") + (state.dir === "asc" ? " ↑" : " ↓")];
    if (state.q) parts.push("search “" + state.q + "”");
    if (state.label) parts.push("label " + state.label);
    if (state.concept) parts.push("concept " + state.concept);
    if (state.apmin) parts.push("AP ≥ " + state.apmin);
    return parts.join(", ");
  }

  function thumbOf(d, i) {
    return d.thumb && d.thumb[i] >= 0 ? root + d.thumbs[d.thumb[i]] : null;
  }

  // ------------------------------------------------------------------ feature list

  function initFeatureList() {
    var key = body.getAttribute("data-key");
    var d = SAEV.data[key];
    if (!d) return;
    var $ = function (id) { return document.getElementById(id); };
    if (hasPlotly() && $("scatter")) densityScatter($("scatter"), d, "");

    d.labels.forEach(function (l, i) { $("label").appendChild(el("option", { value: String(i) }, l)); });
    var hasConcepts = !!(d.concepts && d.concepts.length);
    if (hasConcepts) {
      d.concepts.forEach(function (c, i) { $("concept").appendChild(el("option", { value: String(i) }, c)); });
      document.querySelectorAll("[data-needs=concepts]").forEach(function (node) { node.hidden = false; });
    }
    var page = 0;
    var order = [];
    var FIELDS = ["q", "sort", "dir", "fmin", "fmax", "amin", "pmin", "apmin"];

    function stateToForm(state) {
      FIELDS.forEach(function (id) { $(id).value = state[id]; });
      var li = d.labels.indexOf(state.label);
      $("label").value = li >= 0 ? String(li) : "";
      if (hasConcepts) {
        var ci = d.concepts.indexOf(state.concept);
        $("concept").value = ci >= 0 ? String(ci) : "";
      }
      $("hide-dead").checked = state.dead === "1";
      $("hide-dense").checked = state.dense === "1";
      $("pages-only").checked = state.pages === "1";
      return Math.max(0, (parseInt(state.p, 10) || 1) - 1);
    }

    function formState() {
      var state = {};
      FIELDS.forEach(function (id) { state[id] = $(id).value.trim(); });
      state.label = $("label").value === "" ? "" : d.labels[Number($("label").value)];
      state.concept = !hasConcepts || $("concept").value === "" ? "" : d.concepts[Number($("concept").value)];
      state.dead = $("hide-dead").checked ? "1" : "0";
      state.dense = $("hide-dense").checked ? "1" : "0";
      state.pages = $("pages-only").checked ? "1" : "0";
      state.p = String(page + 1);
      return state;
    }

    function recompute() { order = computeOrder(d, formState()); }

    function render() {
      var pages = Math.max(1, Math.ceil(order.length / PAGE_SIZE));
      page = Math.min(page, pages - 1);
      var state = formState();
      var carry = stateHash(state, false); // feature pages step through this order
      var tbody = $("rows");
      tbody.textContent = "";
      order.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE).forEach(function (i) {
        var tr = el("tr");
        var f = d.feature[i];
        var href = f + ".html" + carry;
        var thumbCell = el("td", { class: "thumb" });
        var src = thumbOf(d, i);
        if (src) {
          var img = el("img", { src: src, alt: "", loading: "lazy", width: "48", height: "48" });
          if (d.page[i]) {
            var a = el("a", { href: href });
            a.appendChild(img);
            thumbCell.appendChild(a);
          } else thumbCell.appendChild(img);
        } else {
          thumbCell.appendChild(el("span"));
        }
        tr.appendChild(thumbCell);
        var name = el("td", { class: "mono" });
        if (d.page[i]) name.appendChild(el("a", { href: href }, d.short + "/" + f));
        else name.textContent = d.short + "/" + f;
        if (d.dead[i]) name.appendChild(el("span", { class: "chip chip-warn" }, "dead"));
        if (d.dense[i]) name.appendChild(el("span", { class: "chip chip-warn" }, "dense"));
        tr.appendChild(name);
        tr.appendChild(el("td", { class: "num" }, pct(d.freq[i])));
        tr.appendChild(el("td", { class: "num" }, fmt(d.mean_act[i])));
        tr.appendChild(el("td", { class: "num" }, fmt(d.max_act[i])));
        tr.appendChild(el("td", {}, d.label[i] >= 0 ? d.labels[d.label[i]] : "–"));
        tr.appendChild(el("td", { class: "num" }, pct(d.purity[i])));
        if (hasConcepts) {
          tr.appendChild(el("td", {}, d.concept[i] >= 0 ? d.concepts[d.concept[i]] : "–"));
          tr.appendChild(el("td", { class: "num" }, fmt(d.concept_ap[i])));
        }
        tbody.appendChild(tr);
      });
      $("count").textContent = order.length.toLocaleString() + " of " + d.feature.length.toLocaleString() + " features";
      $("pageinfo").textContent = "page " + (page + 1) + " of " + pages;
      $("prev").disabled = page === 0;
      $("next").disabled = page >= pages - 1;
      var withPages = order.filter(function (i) { return d.page[i]; });
      $("random").disabled = withPages.length === 0;
      var hash = stateHash(formState(), true);
      history.replaceState(null, "", hash || window.location.pathname + window.location.search);
    }

    var timer = null;
    function update() {
      clearTimeout(timer);
      timer = setTimeout(function () { page = 0; recompute(); render(); }, 80);
    }
    $("filters").addEventListener("input", update);
    $("filters").addEventListener("change", update);
    $("q").addEventListener("keydown", function (ev) {
      if (ev.key !== "Enter") return;
      clearTimeout(timer);
      page = 0;
      recompute();
      render();
      if (order.length === 1 && d.page[order[0]]) window.location.href = d.feature[order[0]] + ".html";
    });
    $("prev").addEventListener("click", function () { page = Math.max(0, page - 1); render(); });
    $("next").addEventListener("click", function () { page += 1; render(); });
    $("random").addEventListener("click", function () {
      var withPages = order.filter(function (i) { return d.page[i]; });
      if (!withPages.length) return;
      var i = withPages[Math.floor(Math.random() * withPages.length)];
      window.location.href = d.feature[i] + ".html" + stateHash(formState(), false);
    });
    window.addEventListener("hashchange", function () { page = stateToForm(readState(window.location.hash)); recompute(); render(); });

    page = stateToForm(readState(window.location.hash));
    recompute();
    render();
  }

  // ------------------------------------------------------------------ heat-maps

  function jsonScript(id) {
    var node = document.getElementById(id);
    if (!node) return null;
    try {
      return JSON.parse(node.textContent);
    } catch (e) {
      console.warn("saev-report: bad data in #" + id);
      return null;
    }
  }

  function base64Bytes(text) {
    var bin = atob(text);
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  /* The page's maps are one zlib stream; DecompressionStream needs no server (file:// is fine). */
  function inflate(bytes, done) {
    if (typeof DecompressionStream === "undefined" || typeof Response === "undefined") return; // plain images stay
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    new Response(stream).arrayBuffer().then(function (buf) { done(new Uint8Array(buf)); }, function () {
      console.warn("saev-report: cannot inflate the heat-maps; showing plain images");
    });
  }

  /* One canvas per exemplar, at patch-grid resolution (one pixel per patch), stretched over the
   * thumbnail by CSS with smoothing; colours from assets/colormap.js; the strongest patch outlined. */
  function paintHeat(fig, q, gh, gw) {
    var cmap = SAEV.colormap;
    var box = fig.querySelector(".pic");
    if (!box) { // feature pages leave the wrapper out (bytes × 24K pages): add it now
      var img = fig.querySelector("img");
      if (!img) return;
      box = el("div", { class: "pic" });
      img.parentNode.insertBefore(box, img);
      box.appendChild(img);
    }
    var canvas = el("canvas", { class: "heat-layer", width: String(gw), height: String(gh), "aria-hidden": "true" });
    var ctx = canvas.getContext("2d");
    if (!ctx) return;
    var image = ctx.createImageData(gw, gh);
    var peak = 0;
    for (var p = 0; p < gh * gw; p++) {
      var v = q[p];
      if (v > q[peak]) peak = p;
      image.data[4 * p] = cmap.rgb[3 * v];
      image.data[4 * p + 1] = cmap.rgb[3 * v + 1];
      image.data[4 * p + 2] = cmap.rgb[3 * v + 2];
      image.data[4 * p + 3] = v > 0 ? Math.round(255 * cmap.maxAlpha * Math.sqrt(v / 255)) : 0;
    }
    ctx.putImageData(image, 0, 0);
    box.appendChild(canvas);
    if (q[peak] > 0) {
      var mark = el("span", { class: "peak", "aria-hidden": "true" });
      mark.style.left = (100 * (peak % gw) / gw) + "%";
      mark.style.top = (100 * Math.floor(peak / gw) / gh) + "%";
      mark.style.width = (100 / gw) + "%";
      mark.style.height = (100 / gh) + "%";
      mark.style.borderColor = cmap.outline;
      box.appendChild(mark);
      fig.setAttribute("data-peak", String(peak));
    }
    fig.classList.add("heat-on");
  }

  /* Paints the page's packed maps onto its heat figures in document order. `paint()` takes the figures
   * present now; call it again after adding figures (the quantile bands) and it continues the stream. */
  function heatPainter() {
    var data = jsonScript("heat");
    if (!data || !data.z || !SAEV.colormap || typeof DecompressionStream === "undefined") return function () {};
    var bytes = null, offset = 0, done = [], waiting = [];
    var selector = "figure.heat, .ex > figure:not(.no-heat)";
    function run() {
      Array.prototype.forEach.call(document.querySelectorAll(selector), function (fig) {
        if (done.indexOf(fig) >= 0) return;
        var g = (fig.getAttribute("data-g") || data.g || "").split("x");
        var gh = Number(g[0]), gw = Number(g[1]);
        if (!(gh > 0 && gw > 0) || offset + gh * gw > bytes.length) return;
        paintHeat(fig, bytes.subarray(offset, offset + gh * gw), gh, gw);
        offset += gh * gw;
        done.push(fig);
      });
      body.setAttribute("data-heat-drawn", String(done.length));
    }
    inflate(base64Bytes(data.z), function (b) {
      bytes = b;
      run();
      waiting.forEach(function (f) { f(); });
    });
    return function paint(then) {
      if (bytes) { run(); if (then) then(); } else waiting.push(function () { run(); if (then) then(); });
    };
  }

  function initHeat() {
    heatPainter()();
  }

  // ------------------------------------------------------------------ feature page

  function setLink(id, text, href) {
    var a = document.getElementById(id);
    if (!a) {
      a = el("a", { id: id, rel: id });
      var bar = document.querySelector(".prevnext");
      if (id === "prev") bar.insertBefore(a, bar.firstChild);
      else bar.appendChild(a);
    }
    if (href === null) {
      a.hidden = true;
      return;
    }
    a.hidden = false;
    a.textContent = text;
    a.setAttribute("href", href);
  }

  /* Previous / next / random within the order of the list this page was opened from (its address
   * carries the list's state; without one, the list's default order). Keys: ← → (or p, n) and r. */
  function featureNav(d, feature) {
    var state = readState(window.location.hash);
    var carry = stateHash(state, false);
    var navigable = function (order) { return order.filter(function (i) { return d.page[i]; }); };
    var order = navigable(computeOrder(d, state));
    var pos = -1;
    for (var j = 0; j < order.length; j++) if (d.feature[order[j]] === feature) { pos = j; break; }
    if (pos < 0) { // this feature is outside the filter: step through the same sort without filters
      state = { sort: state.sort, dir: state.dir, dead: "0" };
      Object.keys(DEFAULTS).forEach(function (k) { if (state[k] === undefined) state[k] = DEFAULTS[k]; });
      carry = stateHash(state, false);
      order = navigable(computeOrder(d, state));
      for (j = 0; j < order.length; j++) if (d.feature[order[j]] === feature) { pos = j; break; }
    }
    if (pos < 0) return;
    var hrefOf = function (i) { return d.feature[i] + ".html" + carry; };
    var prev = pos > 0 ? order[pos - 1] : null, next = pos + 1 < order.length ? order[pos + 1] : null;
    setLink("prev", prev === null ? "" : "← " + d.feature[prev], prev === null ? null : hrefOf(prev));
    setLink("next", next === null ? "" : d.feature[next] + " →", next === null ? null : hrefOf(next));
    var random = function () {
      if (order.length < 2) return null;
      var k = Math.floor(Math.random() * (order.length - 1));
      return hrefOf(order[k >= pos ? k + 1 : k]);
    };
    var rnd = el("a", { id: "random", href: "index.html" }, "random");
    var bar = document.querySelector(".prevnext");
    bar.insertBefore(rnd, document.getElementById("next"));
    rnd.hidden = order.length < 2;
    rnd.addEventListener("click", function (ev) { var h = random(); if (h) { ev.preventDefault(); window.location.href = h; } });
    var back = Object.assign({}, state, { p: String(Math.floor(pos / PAGE_SIZE) + 1) });
    document.getElementById("back").setAttribute("href", "index.html" + stateHash(back, true));
    var info = el("p", { id: "order", class: "muted small" });
    var crumbs = document.querySelector("nav.crumbs");
    crumbs.parentNode.insertBefore(info, crumbs.nextSibling);
    info.textContent = (pos + 1).toLocaleString() + " of " + order.length.toLocaleString() + " by " + describeState(state) +
      " · keys: ← → previous / next, r random";
    info.hidden = false;
    document.addEventListener("keydown", function (ev) {
      if (ev.altKey || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
      var tag = (ev.target && ev.target.tagName) || "";
      if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") return;
      var go = null;
      if ((ev.key === "ArrowLeft" || ev.key === "p") && prev !== null) go = hrefOf(prev);
      else if ((ev.key === "ArrowRight" || ev.key === "n") && next !== null) go = hrefOf(next);
      else if (ev.key === "r") go = random();
      if (go) {
        ev.preventDefault();
        window.location.href = go;
      }
    });
  }

  function show(id) {
    var node = document.getElementById(id);
    if (node) node.hidden = false;
    return node;
  }

  /* The panels' frames, made here rather than carried by each of 24K pages. */
  var FRAMES = [
    ["bands", "Across the activation range", "a uniform sample of the images it fires on, by quarter of their activations", "div", "bands"],
    ["split", "Class split", "share of each label's images it fires on · mean max activation there", "ol", "bars"],
    ["similar", "Similar features", "nearest decoder directions (cosine)", "div", "grid mini"],
    ["matches", "Counterparts in other SAEs", null, "div", "table-scroll"]
  ];

  function buildFrames() {
    var more = document.getElementById("more");
    if (!more) return;
    var pair = el("div", { class: "two-col", id: "panels-box", hidden: "" });
    FRAMES.forEach(function (f) {
      var card = el("section", { class: "card", id: f[0], hidden: "" });
      var head = el("div", { class: "card-head" });
      head.appendChild(el("h2", {}, f[1]));
      if (f[2]) head.appendChild(el("span", { class: "muted small" }, f[2]));
      card.appendChild(head);
      var inner = el(f[3], { class: f[4] });
      if (f[0] === "matches") {
        var table = el("table", { class: "data" });
        var tr = el("tr");
        ["comparison", "best match", "correlation", "matched", "mutual"].forEach(function (h, i) { tr.appendChild(el("th", i === 2 ? { class: "num" } : {}, h)); });
        var thead = el("thead");
        thead.appendChild(tr);
        table.appendChild(thead);
        table.appendChild(el("tbody"));
        inner.appendChild(table);
      }
      card.appendChild(inner);
      (f[0] === "split" || f[0] === "similar" ? pair : more).appendChild(card);
      if (f[0] === "bands") more.appendChild(pair);
    });
  }

  /* Bars of the log10 activation histogram as one SVG path (same drawing as charts.svg_histogram). */
  function drawHistogram(hist) {
    var hero = document.querySelector(".feature-hero");
    if (!hero || !hist) return;
    var box = el("figure", { class: "hist-box", id: "hist" });
    box.appendChild(el("figcaption", { class: "muted small" }, "log₁₀ activation over firing patches"));
    hero.appendChild(box);
    var counts = hist[F.hist.counts], W = 360, H = 96, padL = 4, padB = 18, padT = 4;
    var plotW = W - 2 * padL, plotH = H - padB - padT, barW = plotW / counts.length, base = padT + plotH;
    var top = Math.max.apply(null, counts), d = "";
    counts.forEach(function (c, i) {
      if (c > 0) d += "M" + (padL + i * barW).toFixed(1) + " " + base + "v" + (-plotH * c / top).toFixed(1) + "h" + Math.max(barW - 1, 0.5).toFixed(1) + "V" + base + "z";
    });
    var NS = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "hist");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("width", String(W));
    svg.setAttribute("height", String(H));
    var path = document.createElementNS(NS, "path");
    path.setAttribute("d", d);
    path.setAttribute("fill", "#2563eb");
    svg.appendChild(path);
    [[padL, "start", hist[F.hist.lo]], [W - padL, "end", hist[F.hist.hi]]].forEach(function (t) {
      var text = document.createElementNS(NS, "text");
      text.setAttribute("x", String(t[0]));
      text.setAttribute("y", String(H - 4));
      text.setAttribute("class", "tick");
      text.setAttribute("text-anchor", t[1]);
      text.textContent = fmt(t[2]);
      svg.appendChild(text);
    });
    var title = document.createElementNS(NS, "title");
    title.textContent = counts.reduce(function (a, b) { return a + b; }, 0).toLocaleString() + " firing patches";
    svg.appendChild(title);
    box.insertBefore(svg, box.firstChild);
    box.hidden = false;
  }

  /* Quantile-band samples: tiles like the top images (thumbnails named by position in the data file). */
  function drawBands(d, bands) {
    var box = document.querySelector("#bands .bands");
    if (!box || !bands || !bands.length) return;
    var B = F.band, S = F.band_sample;
    bands.forEach(function (band) { // thumbnails and labels are positions in d's lists
      var div = el("div", { class: "band" });
      div.appendChild(el("h3", {}, d.bands[band[B.band]] || "band " + (band[B.band] + 1)));
      var grid = el("div", { class: "grid band-grid ex" });
      band[B.samples].forEach(function (s) {
        var fig = el("figure", s[S.heat] ? {} : { class: "no-heat" });
        fig.appendChild(el("img", { src: s[S.thumb] >= 0 ? root + d.thumbs[s[S.thumb]] : root + "assets/missing.svg", alt: "", loading: "lazy" }));
        fig.appendChild(document.createTextNode(fmt(s[S.act]) + " " + labelOf(d, s[S.label]))); // captioned like the top images
        grid.appendChild(fig);
      });
      div.appendChild(grid);
      box.appendChild(div);
    });
    show("bands");
  }

  function labelOf(d, i) {
    return i >= 0 && i < d.image_labels.length ? d.image_labels[i] : "unlabelled";
  }

  /* Each concept's chance and support (the same on every page of the SAE) as its row's tooltip. */
  function conceptTips(d) {
    var base = {}, C = F.concept_base;
    (d.concept_base || []).forEach(function (c) { base[c[C.concept] + "\n" + c[C.level]] = c; });
    document.querySelectorAll("table.ct tr").forEach(function (tr) {
      var cells = tr.querySelectorAll("td"), c = cells.length > 1 ? base[cells[0].textContent + "\n" + cells[1].textContent] : null;
      if (c) tr.title = "chance (the concept's share of samples): " + fmt(c[C.chance]) + " · support: " + c[C.support].toLocaleString() + " samples";
    });
  }

  function drawMatches(d, matches) {
    var box = document.getElementById("matches");
    if (!box || !matches || !matches.length) return;
    var tbody = box.querySelector("tbody");
    var M = F.match, R = F.sae_ref, K = F.comparison_ref;
    matches.forEach(function (m) { // comparison and SAE are positions in d's lists
      var cmp = d.comparisons[m[M.comparison]], sae = m[M.sae] >= 0 ? d.saes[m[M.sae]] : null;
      var feature = m[M.feature];
      var title = !sae ? String(feature) : feature === null ? "— (dead feature: no match)" : sae[R.short] + "/" + feature;
      var tr = el("tr");
      var c = el("td");
      c.appendChild(el("a", { href: root + cmp[K.href] }, cmp[K.name]));
      tr.appendChild(c);
      var b = el("td");
      b.appendChild(sae && m[M.has_page] ? el("a", { class: "mono", href: root + sae[R.dir] + feature + ".html" }, title) : el("span", { class: "mono" }, title));
      tr.appendChild(b);
      tr.appendChild(el("td", { class: "num" }, fmt(m[M.score])));
      tr.appendChild(el("td", {}, m[M.matched] ? "yes" : "no"));
      tr.appendChild(el("td", {}, m[M.mutual] ? "yes" : "no"));
      tbody.appendChild(tr);
    });
    box.hidden = false;
  }

  function renderPanels(d, panels) {
    if (!panels) return;
    var at = {};
    d.feature.forEach(function (f, i) { at[f] = i; });
    var shown = false;
    var split = document.getElementById("split");
    if (split && panels.split && panels.split.length) {
      var list = split.querySelector(".bars");
      var P = F.split;
      panels.split.forEach(function (row) { // n_images only where it is not the label's usual count
        var label = labelOf(d, row[P.label]);
        var n = row.length > P.n_images ? row[P.n_images] : d.label_images[row[P.label]];
        var rate = n > 0 ? row[P.n_fire] / n : 0;
        var li = el("li", { title: row[P.n_fire] + " of " + n + " images" });
        li.appendChild(el("span", { class: "bar-label", title: label }, label));
        var track = el("span", { class: "bar-track" });
        var fill = el("span", { class: "bar-fill" });
        fill.style.width = Math.max(0, Math.min(100, 100 * rate)) + "%";
        track.appendChild(fill);
        li.appendChild(track);
        li.appendChild(el("span", { class: "bar-value" }, pct(rate) + " · " + fmt(row[P.mean_act])));
        list.appendChild(li);
      });
      split.hidden = false;
      shown = true;
    }
    var similar = document.getElementById("similar");
    if (similar && panels.similar && panels.similar.length) {
      var grid = similar.querySelector(".grid");
      var Q = F.similar;
      panels.similar.forEach(function (row) {
        var f = row[Q.feature], i = at[f];
        var fig = el("figure", { class: "tile" });
        var src = i === undefined ? null : thumbOf(d, i);
        var href = i !== undefined && d.page[i] ? f + ".html" : null;
        if (src) {
          var img = el("img", { src: src, alt: "top image of feature " + f, loading: "lazy" });
          if (href) { var a = el("a", { href: href }); a.appendChild(img); fig.appendChild(a); } else fig.appendChild(img);
        }
        var cap = el("figcaption");
        cap.appendChild(href ? el("a", { class: "mono", href: href }, String(f)) : el("span", { class: "mono" }, String(f)));
        if (i !== undefined && d.label[i] >= 0) cap.appendChild(el("span", { class: "chip" }, d.labels[d.label[i]]));
        cap.appendChild(el("span", { class: "muted" }, "cos " + fmt(row[Q.cosine])));
        fig.appendChild(cap);
        grid.appendChild(fig);
      });
      similar.hidden = false;
      shown = true;
    }
    if (shown) document.getElementById("panels-box").hidden = false;
  }

  function initFeature() {
    var paint = heatPainter();
    paint(); // the top images at once
    buildFrames();
    var panels = jsonScript("panels") || {};
    drawHistogram(panels.hist);
    var key = body.getAttribute("data-key");
    var feature = Number(body.getAttribute("data-feature"));
    var ready = function () {
      var d = SAEV.data[key];
      if (!d) return;
      drawBands(d, panels.bands);
      paint(); // and the band samples, continuing the page's map stream
      featureNav(d, feature);
      renderPanels(d, panels);
      drawMatches(d, panels.matches);
      conceptTips(d);
      body.setAttribute("data-nav", "ready");
    };
    if (SAEV.data[key]) ready();
    else loadScript(root + key, ready); // a script tag, not an XHR: browsers allow it on file://
  }

  var kind = body.getAttribute("data-page");
  if (kind === "index") initIndex();
  else if (kind === "sae") initFeatureList();
  else if (kind === "feature") initFeature();
  else if (kind === "compare") initHeat();
})();
