/* saev-report atlas: index charts, per-SAE density scatter, and the searchable feature list.
 * Plain JS, no frameworks, no network: every data file is a <script> that registers itself in
 * SAEV.data, so the site works from file://. Text from the data is only ever set with
 * textContent (never innerHTML), and escaped before plotly draws it as pseudo-HTML. */
(function () {
  "use strict";
  var SAEV = (window.SAEV = window.SAEV || { data: {} });
  SAEV.data = SAEV.data || {};
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

  // ------------------------------------------------------------------ feature list

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

  /* "1234" → ids starting with 1234; "#1234" or "DINOv2-6K/1234" → exactly 1234; else label substring. */
  function matcher(d, query) {
    var q = query.trim().toLowerCase();
    if (!q) return function () { return true; };
    var m = /^(?:.*\/|#)?(\d+)$/.exec(q);
    if (m) {
      var exact = q !== m[1];
      return function (i) {
        var id = String(d.feature[i]);
        return exact ? id === m[1] : id.indexOf(m[1]) === 0;
      };
    }
    var hits = d.labels.map(function (l) { return l.toLowerCase().indexOf(q) >= 0; });
    return function (i) { return d.label[i] >= 0 && hits[d.label[i]]; };
  }

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

    function readHash() {
      var params = new URLSearchParams(window.location.hash.slice(1));
      var set = function (id, name) { if (params.has(name)) $(id).value = params.get(name); };
      set("q", "q"); set("sort", "sort"); set("dir", "dir"); set("fmin", "fmin"); set("fmax", "fmax"); set("amin", "amin"); set("pmin", "pmin");
      set("apmin", "apmin");
      if (hasConcepts && params.has("concept")) {
        var ci = d.concepts.indexOf(params.get("concept"));
        $("concept").value = ci >= 0 ? String(ci) : "";
      }
      if (params.has("label")) {
        var li = d.labels.indexOf(params.get("label"));
        $("label").value = li >= 0 ? String(li) : "";
      }
      if (params.has("dead")) $("hide-dead").checked = params.get("dead") === "1";
      if (params.has("dense")) $("hide-dense").checked = params.get("dense") === "1";
      if (params.has("pages")) $("pages-only").checked = params.get("pages") === "1";
      return Math.max(0, (parseInt(params.get("p"), 10) || 1) - 1);
    }

    function writeHash() {
      var params = new URLSearchParams();
      ["q", "fmin", "fmax", "amin", "pmin", "apmin"].forEach(function (id) { if ($(id).value.trim()) params.set(id, $(id).value.trim()); });
      if ($("sort").value !== "max_act") params.set("sort", $("sort").value);
      if ($("dir").value !== "desc") params.set("dir", $("dir").value);
      if ($("label").value !== "") params.set("label", d.labels[Number($("label").value)]);
      if (hasConcepts && $("concept").value !== "") params.set("concept", d.concepts[Number($("concept").value)]);
      if (!$("hide-dead").checked) params.set("dead", "0");
      if ($("hide-dense").checked) params.set("dense", "1");
      if ($("pages-only").checked) params.set("pages", "1");
      if (page > 0) params.set("p", String(page + 1));
      var hash = params.toString();
      history.replaceState(null, "", hash ? "#" + hash : window.location.pathname + window.location.search);
    }

    function recompute() {
      var match = matcher(d, $("q").value);
      var fmin = parseNumber($("fmin").value), fmax = parseNumber($("fmax").value);
      var amin = parseNumber($("amin").value), pmin = parseNumber($("pmin").value);
      var label = $("label").value === "" ? -1 : Number($("label").value);
      var concept = !hasConcepts || $("concept").value === "" ? -1 : Number($("concept").value);
      var apmin = hasConcepts ? parseNumber($("apmin").value) : null;
      var hideDead = $("hide-dead").checked, hideDense = $("hide-dense").checked, pagesOnly = $("pages-only").checked;
      order = [];
      for (var i = 0; i < d.feature.length; i++) {
        if (hideDead && d.dead[i]) continue;
        if (hideDense && d.dense[i]) continue;
        if (pagesOnly && !d.page[i]) continue;
        if (label >= 0 && d.label[i] !== label) continue;
        if (fmin !== null && !(d.freq[i] >= fmin)) continue;
        if (fmax !== null && !(d.freq[i] <= fmax)) continue;
        if (amin !== null && !(d.max_act[i] >= amin)) continue;
        if (pmin !== null && !(d.purity[i] >= pmin)) continue;
        if (concept >= 0 && d.concept[i] !== concept) continue;
        if (apmin !== null && !(d.concept_ap[i] >= apmin)) continue;
        if (!match(i)) continue;
        order.push(i);
      }
      var get = SORTS[$("sort").value] || SORTS.max_act;
      var sign = $("dir").value === "asc" ? 1 : -1;
      order.sort(function (a, b) {
        var va = get(d, a), vb = get(d, b);
        if (va === null && vb === null) return d.feature[a] - d.feature[b];
        if (va === null) return 1; // missing values last in either direction
        if (vb === null) return -1;
        if (va < vb) return -sign;
        if (va > vb) return sign;
        return d.feature[a] - d.feature[b];
      });
    }

    function render() {
      var pages = Math.max(1, Math.ceil(order.length / PAGE_SIZE));
      page = Math.min(page, pages - 1);
      var tbody = $("rows");
      tbody.textContent = "";
      order.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE).forEach(function (i) {
        var tr = el("tr");
        var f = d.feature[i];
        var thumbCell = el("td", { class: "thumb" });
        if (d.thumb[i]) {
          var img = el("img", { src: root + d.thumb[i], alt: "", loading: "lazy", width: "48", height: "48" });
          var a = el("a", { href: f + ".html" });
          a.appendChild(img);
          thumbCell.appendChild(a);
        } else {
          thumbCell.appendChild(el("span"));
        }
        tr.appendChild(thumbCell);
        var name = el("td", { class: "mono" });
        if (d.page[i]) name.appendChild(el("a", { href: f + ".html" }, d.short + "/" + f));
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
      writeHash();
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

    page = readHash();
    recompute();
    render();
  }

  var kind = body.getAttribute("data-page");
  if (kind === "index") initIndex();
  else if (kind === "sae") initFeatureList();
})();
