/* prefix-probe attention view: draws the payload of probe.view (see its docstring) into a div.
   No dependencies and no network access; every figure is inline SVG whose cells carry their
   value (data-v), so what is drawn can be read back. */
(function () {
  "use strict";
  if (window.PrefixProbeView) return;  // several views in one notebook share one definition

  var SVGNS = "http://www.w3.org/2000/svg";
  var BLUE = [[247, 251, 255], [8, 48, 107]];
  var ORANGE = [[255, 245, 235], [166, 54, 3]];
  var RED = [178, 24, 43], NAVY = [33, 102, 172];
  var LINES = {z: "#222222", base: "#2166ac", bias: "#e6550d", residual: "#b2182b"};
  var LINE_LABELS = {
    z: "\u2016z\u1d62\u2016 tuned head output",
    base: "\u2016(1\u2212\u03b1\u1d62) z_base,\u1d62\u2016 rescaled base output",
    bias: "\u2016\u03b1\u1d62 b\u1d62\u2016 prefix bias",
    residual: "\u2016z\u1d62 \u2212 both\u2016 what the identity misses"
  };

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }
  function mix(c, t) {
    t = Math.max(0, Math.min(1, t));
    return "rgb(" + [0, 1, 2].map(function (k) {
      return Math.round(c[0][k] + (c[1][k] - c[0][k]) * t);
    }).join(",") + ")";
  }
  function shade(c, v) { return mix(c, Math.sqrt(Math.max(0, v))); }  // sqrt: small weights show
  function diverging(t) {  // t in [-1, 1]: navy (negative), white, red (positive)
    var end = t < 0 ? NAVY : RED;
    return mix([[255, 255, 255], end], Math.abs(t));
  }
  function fmt(x, digits) {
    if (x === null || x === undefined) return "n/a";
    if (typeof x === "boolean") return x ? "yes" : "no";
    if (typeof x !== "number") return esc(x);
    if (x === 0) return "0";
    var a = Math.abs(x);
    return (a >= 1e-3 && a < 1e4) ? x.toFixed(digits === undefined ? 4 : digits) : x.toExponential(2);
  }
  function short(tok) {
    var s = String(tok).replace(/\s/g, "\u00b7");
    return s.length > 7 ? s.slice(0, 6) + "\u2026" : s;
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function View(root, data) {
    this.root = root;
    this.data = data;
    this.scale = data.scale;
    this.digits = data.digits;
    this.state = {model: 0, layer: 0, head: 0};
    this.build();
    this.draw();
  }

  /* One cell size for every matrix of the model, so that rows line up across panels. */
  View.prototype.cellSize = function () {
    var m = this.model();
    return Math.max(6, Math.min(16, Math.floor(220 / (m.P + m.tokens.length))));
  };

  View.prototype.model = function () { return this.data.models[this.state.model]; };
  View.prototype.headData = function () {
    return this.model().layers[this.state.layer].heads[this.state.head];
  };
  View.prototype.value = function (q) { return q < 0 ? NaN : q / this.scale; };

  View.prototype.build = function () {
    var d = this.data, self = this, root = this.root;
    root.innerHTML = "";
    root.appendChild(el("h2", "ppv-title", d.title));
    root.appendChild(el("p", "ppv-lede",
      "Per attention head: the tuned model's pattern (prefix columns first), the prefix's share " +
      "\u03b1 of each query's attention, the content attention renormalised beside the frozen " +
      "base head on the same layer input, and the head output split as " +
      "z = (1\u2212\u03b1)\u00b7z_base + \u03b1\u00b7b. A prefix can only do the last: its renormalised " +
      "pattern equals the base's, and the difference panel stays white."));
    var bar = el("div", "ppv-controls");
    function select(label, cls, options, onchange) {
      var wrap = el("label", "ppv-control");
      wrap.appendChild(el("span", null, label));
      var s = el("select", cls);
      options.forEach(function (o, i) {
        var opt = el("option", null, o);
        opt.value = String(i);
        s.appendChild(opt);
      });
      s.addEventListener("change", function () { onchange(parseInt(s.value, 10)); });
      wrap.appendChild(s);
      bar.appendChild(wrap);
      return s;
    }
    this.modelSel = select("Model", "ppv-model", d.models.map(function (m) { return m.name; }),
      function (i) { self.state.model = i; self.draw(); });
    this.layerSel = select("Layer", "ppv-layer", d.models[0].layers.map(function (l) {
      return "layer " + l.layer;
    }), function (i) { self.state.layer = i; self.draw(); });
    this.headSel = select("Head", "ppv-head", d.models[0].layers[0].heads.map(function (h) {
      return "head " + h.head;
    }), function (i) { self.state.head = i; self.draw(); });
    root.appendChild(bar);
    this.what = root.appendChild(el("p", "ppv-what"));

    var gridBox = root.appendChild(el("div", "ppv-gridbox"));
    gridBox.appendChild(el("div", "ppv-caption",
      "Every head (click one): colour = local drift, the largest total-variation change of a " +
      "query's renormalised content attention vs the frozen base head (white: none; red: 0.5+). " +
      "Number = mean \u03b1."));
    this.grid = gridBox.appendChild(el("div", "ppv-grid"));

    this.panels = root.appendChild(el("div", "ppv-panels"));
    this.decomp = root.appendChild(el("div", "ppv-decomp"));
    var lower = root.appendChild(el("div", "ppv-lower"));
    this.stats = lower.appendChild(el("table", "ppv-stats"));
    this.legend = lower.appendChild(el("div", "ppv-legend"));
    var notes = root.appendChild(el("ul", "ppv-notes"));
    d.notes.forEach(function (n) { notes.appendChild(el("li", null, n)); });
    this.tip = root.appendChild(el("div", "ppv-tip"));
    this.tip.style.display = "none";
    root.addEventListener("mouseleave", function () { self.hover(null); });
  };

  View.prototype.drawGrid = function () {
    var self = this, m = this.model();
    this.grid.innerHTML = "";
    var n = m.layers[0].heads.length;
    this.grid.style.gridTemplateColumns = "auto repeat(" + n + ", minmax(22px, 34px))";
    this.grid.appendChild(el("div", "ppv-grid-corner", ""));
    m.layers[0].heads.forEach(function (h) { self.grid.appendChild(el("div", "ppv-grid-col", "H" + h.head)); });
    m.layers.forEach(function (layer, li) {
      self.grid.appendChild(el("div", "ppv-grid-row", "L" + layer.layer));
      layer.heads.forEach(function (h, hi) {
        var tv = h.stats.local_tv_max, a = h.stats.alpha_mean;
        var cell = el("button", "ppv-head-cell", a === null ? "?" : (a < 0.005 ? "0" : a.toFixed(2).replace(/^0/, "")));
        cell.type = "button";
        cell.dataset.layer = layer.layer;
        cell.dataset.head = h.head;
        cell.style.background = tv === null ? "#999" : diverging(Math.min(1, 2 * tv));
        cell.title = "layer " + layer.layer + ", head " + h.head + ": local drift " + fmt(tv) +
          ", mean \u03b1 " + fmt(a) + ", check " + h.stats.check;
        if (li === self.state.layer && hi === self.state.head) cell.classList.add("ppv-selected");
        cell.addEventListener("click", function () {
          self.state.layer = li; self.state.head = hi; self.draw();
        });
        self.grid.appendChild(cell);
      });
    });
  };

  /* One matrix panel: rows are queries, columns keys; cells(i) -> [{j, v, color}]. */
  View.prototype.matrix = function (kind, title, subtitle, nCols, colLabels, cells, marks) {
    var toks = this.model().tokens, T = toks.length;
    var cell = this.cellSize();
    var left = 44, top = 40, W = left + nCols * cell + 6, H = top + T * cell + 6;
    var parts = [];
    var labelEvery = cell >= 11 ? 1 : Math.ceil(11 / cell);
    for (var c = 0; c < nCols; c += labelEvery) {
      var x = left + c * cell + cell / 2;
      parts.push('<text class="ppv-tick" transform="translate(' + x + "," + (top - 4) +
        ') rotate(-60)">' + esc(short(colLabels[c])) + "</text>");
    }
    for (var r = 0; r < T; r += labelEvery) {
      parts.push('<text class="ppv-tick" text-anchor="end" x="' + (left - 4) + '" y="' +
        (top + r * cell + cell * 0.75) + '">' + esc(short(toks[r])) + "</text>");
    }
    parts.push('<rect class="ppv-frame" x="' + left + '" y="' + top + '" width="' + nCols * cell +
      '" height="' + T * cell + '"/>');
    for (var i = 0; i < T; i++) {
      cells(i).forEach(function (e) {
        parts.push('<rect class="ppv-cell" data-i="' + i + '" data-j="' + e.j + '" data-v="' +
          e.text + '" x="' + (left + e.j * cell) + '" y="' + (top + i * cell) + '" width="' + cell +
          '" height="' + cell + '" fill="' + e.color + '"/>');
      });
    }
    (marks || []).forEach(function (mk) {
      var xm = left + mk.col * cell;
      parts.push('<line class="ppv-mark" x1="' + xm + '" x2="' + xm + '" y1="' + (top - 2) +
        '" y2="' + (top + T * cell) + '"/>');
    });
    var box = el("figure", "ppv-panel ppv-" + kind);
    box.dataset.kind = kind;
    box.appendChild(el("figcaption", "ppv-panel-title", title));
    box.appendChild(el("div", "ppv-panel-sub", subtitle));
    var svg = document.createElementNS(SVGNS, "svg");
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.innerHTML = parts.join("");
    box.appendChild(svg);
    return box;
  };

  View.prototype.drawPanels = function () {
    var self = this, m = this.model(), h = this.headData(), P = m.P, T = m.tokens.length;
    var fmtq = function (q) { return q < 0 ? "n/a" : (q / self.scale).toFixed(self.digits); };
    var prefixLabels = [];
    for (var p = 0; p < P; p++) prefixLabels.push("P" + (p + 1));
    var raw = this.matrix("raw", "Tuned model: raw pattern",
      P ? "prefix columns (orange) first, then the content" : "no prefix: content only",
      P + T, prefixLabels.concat(m.tokens), function (i) {
        var out = [], mass = 0;
        for (var p = 0; p < P; p++) {
          var v = self.value(h.prefix[i][p]);
          mass += v;
          out.push({j: p, v: v, text: fmtq(h.prefix[i][p]), color: shade(ORANGE, v)});
        }
        // the content block of the raw pattern is the renormalised row times (1 - prefix mass)
        h.content[i].forEach(function (q, j) {
          var v = self.value(q) * (1 - mass);
          out.push({j: P + j, v: v, text: isNaN(v) ? "n/a" : v.toFixed(self.digits), color: shade(BLUE, v)});
        });
        return out;
      }, P ? [{col: P, span: P}] : []);
    var tri = function (rows) {
      return function (i) {
        return rows[i].map(function (q, j) {
          return {j: j, v: self.value(q), text: fmtq(q), color: shade(BLUE, self.value(q))};
        });
      };
    };
    var content = this.matrix("content", "Tuned: content renormalised",
      "raw content block, rows rescaled to sum to 1", T, m.tokens, tri(h.content));
    var base = this.matrix("base", "Base head, same layer input",
      "the frozen head's pattern A (no prefix)", T, m.tokens, tri(h.base));
    var maxDiff = 0;
    h.content.forEach(function (row, i) {
      row.forEach(function (q, j) { maxDiff = Math.max(maxDiff, Math.abs(q - h.base[i][j])); });
    });
    this.diffRange = Math.max(maxDiff / this.scale, 0.05);
    var diff = this.matrix("diff", "Difference: renormalised \u2212 base",
      "largest shown: " + (maxDiff / this.scale).toFixed(this.digits), T, m.tokens, function (i) {
        return h.content[i].map(function (q, j) {
          var v = (q - h.base[i][j]) / self.scale;
          return {j: j, v: v, text: v.toFixed(self.digits), color: diverging(v / self.diffRange)};
        });
      });
    this.panels.innerHTML = "";
    var first = el("div", "ppv-pair");
    first.appendChild(raw);
    first.appendChild(this.alphaPanel(h));
    this.panels.appendChild(first);
    [content, base, diff].forEach(function (p) { self.panels.appendChild(p); });
    this.panels.querySelectorAll("svg").forEach(function (svg) {
      svg.addEventListener("mousemove", function (ev) { self.onMove(ev); });
    });
  };

  View.prototype.alphaPanel = function (h) {
    var T = h.alpha.length, cell = this.cellSize();
    var top = 40, width = 90, H = top + T * cell + 6, parts = [];
    parts.push('<line class="ppv-axis" x1="4" x2="4" y1="' + top + '" y2="' + (top + T * cell) + '"/>');
    parts.push('<text class="ppv-tick" x="4" y="' + (top - 6) + '">0</text>');
    parts.push('<text class="ppv-tick" text-anchor="end" x="' + (4 + width - 8) + '" y="' + (top - 6) + '">1</text>');
    h.alpha.forEach(function (a, i) {
      var w = a === null ? 0 : Math.max(0.5, a * (width - 8));
      parts.push('<rect class="ppv-alpha" data-i="' + i + '" data-v="' + fmt(a) + '" x="4" y="' +
        (top + i * cell + 1) + '" width="' + w + '" height="' + Math.max(1, cell - 2) + '"/>');
    });
    var box = el("figure", "ppv-panel ppv-alphabox");
    box.dataset.kind = "alpha";
    box.appendChild(el("figcaption", "ppv-panel-title", "\u03b1 per query"));
    box.appendChild(el("div", "ppv-panel-sub", "prefix share"));
    var svg = document.createElementNS(SVGNS, "svg");
    svg.setAttribute("width", width + 8);
    svg.setAttribute("height", H);
    svg.innerHTML = parts.join("");
    box.appendChild(svg);
    return box;
  };

  View.prototype.drawDecomp = function () {
    var h = this.headData(), toks = this.model().tokens, T = toks.length;
    var W = Math.max(360, Math.min(900, 28 * T + 80)), H = 214, left = 56, right = 12, top = 14, bottom = 62;
    var keys = ["z", "base", "bias", "residual"], ymax = 0;
    keys.forEach(function (k) { h.norms[k].forEach(function (v) { if (v !== null) ymax = Math.max(ymax, v); }); });
    ymax = ymax || 1;
    var xs = function (i) { return left + (T === 1 ? 0.5 : i / (T - 1)) * (W - left - right); };
    var ys = function (v) { return top + (1 - v / ymax) * (H - top - bottom); };
    var parts = ['<line class="ppv-axis" x1="' + left + '" x2="' + (W - right) + '" y1="' + ys(0) + '" y2="' + ys(0) + '"/>',
      '<line class="ppv-axis" x1="' + left + '" x2="' + left + '" y1="' + top + '" y2="' + ys(0) + '"/>',
      '<text class="ppv-tick" text-anchor="end" x="' + (left - 4) + '" y="' + (top + 4) + '">' + fmt(ymax, 2) + "</text>",
      '<text class="ppv-tick" text-anchor="end" x="' + (left - 4) + '" y="' + ys(0) + '">0</text>'];
    parts.push('<text class="ppv-axislabel" x="' + ((left + W - right) / 2) + '" y="' + (H - 2) +
      '" text-anchor="middle">query position (its token)</text>');
    parts.push('<text class="ppv-axislabel" text-anchor="middle" transform="translate(12,' +
      ((top + ys(0)) / 2) + ') rotate(-90)">vector norm</text>');
    var every = Math.ceil(T / 32);
    toks.forEach(function (t, i) {
      if (i % every) return;
      parts.push('<text class="ppv-tick" transform="translate(' + xs(i) + "," + (ys(0) + 8) + ') rotate(60)">' + esc(short(t)) + "</text>");
    });
    keys.forEach(function (k) {
      var pts = h.norms[k].map(function (v, i) { return v === null ? null : xs(i) + "," + ys(v); }).filter(Boolean);
      parts.push('<polyline class="ppv-line" stroke="' + LINES[k] + '" points="' + pts.join(" ") + '"/>');
      h.norms[k].forEach(function (v, i) {
        if (v !== null) parts.push('<circle class="ppv-dot" data-i="' + i + '" data-k="' + k + '" data-v="' + fmt(v) + '" cx="' + xs(i) + '" cy="' + ys(v) + '" r="3" fill="' + LINES[k] + '"/>');
      });
    });
    this.decomp.innerHTML = "";
    this.decomp.appendChild(el("div", "ppv-panel-title",
      "Head output per query: z\u1d62 = (1\u2212\u03b1\u1d62)\u00b7z_base,\u1d62 + \u03b1\u1d62\u00b7b\u1d62 (vector norms, before W_O)"));
    var svg = document.createElementNS(SVGNS, "svg");
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    svg.innerHTML = parts.join("");
    var self = this;
    svg.addEventListener("mousemove", function (ev) { self.onMove(ev); });
    this.decomp.appendChild(svg);
    var key = el("div", "ppv-keys");
    keys.forEach(function (k) {
      var item = el("span", "ppv-key");
      var sw = el("i", "ppv-swatch");
      sw.style.background = LINES[k];
      item.appendChild(sw);
      item.appendChild(document.createTextNode(LINE_LABELS[k]));
      key.appendChild(item);
    });
    this.decomp.appendChild(key);
  };

  View.prototype.drawStats = function () {
    var m = this.model(), layer = m.layers[this.state.layer], h = this.headData(), s = h.stats;
    var inputs = m.n_inputs ? "over " + m.n_inputs + " input(s)" : "over the inputs checked";
    var rows = [
      ["identity expected here", s.identity_expected ? "yes: a prefix meets a frozen head" :
        (m.P ? "no: ln1/W_Q/W_K/W_V changed" : "no: no prefix")],
      ["check (identity within tolerance)", s.check],
      ["pattern error (tolerance)", fmt(s.pattern_error) + " (" + fmt(s.pattern_tol) + ")"],
      ["head-output z error (tolerance)", fmt(s.z_error) + " (" + fmt(s.z_tol) + ")"],
      ["local drift: max |renormalised \u2212 base|", fmt(s.local_max_abs)],
      ["local drift: total variation, max / mean", fmt(s.local_tv_max) + " / " + fmt(s.local_tv_mean)],
      ["downstream drift vs base model (TV mean)", "downstream_tv_mean" in s ? fmt(s.downstream_tv_mean) : "n/a"],
      ["bias rank / P (rank of the whole change)", s.bias_rank + " / " + s.P + " (" + s.change_rank + ")"],
      ["\u03b1 mean / max", fmt(s.alpha_mean) + " / " + fmt(s.alpha_max)]
    ];
    var body = "<caption>Layer " + layer.layer + ", head " + h.head + ": the check's numbers " +
      esc(inputs) + "</caption>";
    rows.forEach(function (r) {
      var cls = r[1] === "FAIL" ? ' class="ppv-fail"' : (r[1] === "ok" ? ' class="ppv-ok"' : "");
      body += "<tr><th>" + esc(r[0]) + "</th><td" + cls + ">" + esc(r[1]) + "</td></tr>";
    });
    this.stats.innerHTML = body;
    this.what.textContent = (m.what ? m.what + ". " : "") + "Input " + (this.data.example + 1) +
      ": " + m.tokens.length + " content tokens, P = " + m.P + " prefix position(s).";
  };

  View.prototype.drawLegend = function () {
    var ramp = function (stops, lo, hi, label) {
      return '<div class="ppv-ramp"><span class="ppv-end">' + lo + '</span><span class="ppv-bar" ' +
        'style="background:linear-gradient(90deg,' + stops.join(",") + ')"></span><span class="ppv-end">' +
        hi + "</span><em>" + label + "</em></div>";
    };
    var steps = [0, 0.1, 0.25, 0.5, 0.75, 1];
    var seq = function (c) { return steps.map(function (t) { return shade(c, t) + " " + (t * 100) + "%"; }); };
    var r = this.diffRange;
    this.legend.innerHTML = '<div class="ppv-panel-title">Colour scales</div>' +
      ramp(seq(BLUE), "0", "1", "attention weight on a content key (square-root scale)") +
      ramp(seq(ORANGE), "0", "1", "attention weight on a prefix position") +
      ramp([diverging(-1), diverging(0), diverging(1)], "\u2212" + r.toFixed(2), "+" + r.toFixed(2),
        "renormalised \u2212 base") +
      "<p>Hover a cell for its query and key tokens and its value in every panel.</p>";
  };

  View.prototype.draw = function () {
    var m = this.model();
    if (this.state.layer >= m.layers.length) this.state.layer = 0;
    if (this.state.head >= m.layers[this.state.layer].heads.length) this.state.head = 0;
    this.modelSel.value = String(this.state.model);
    this.layerSel.value = String(this.state.layer);
    this.headSel.value = String(this.state.head);
    this.drawGrid();
    this.drawPanels();
    this.drawDecomp();
    this.drawStats();
    this.drawLegend();
    this.root.dataset.model = String(this.state.model);
    this.root.dataset.layer = String(m.layers[this.state.layer].layer);
    this.root.dataset.head = String(this.headData().head);
  };

  View.prototype.onMove = function (ev) {
    var t = ev.target, i = t.getAttribute && t.getAttribute("data-i");
    if (i === null || i === undefined) { this.hover(null); return; }
    this.hover({i: +i, j: t.getAttribute("data-j"), k: t.getAttribute("data-k"),
      kind: t.closest(".ppv-panel") ? t.closest(".ppv-panel").dataset.kind : "decomp"}, ev);
  };

  View.prototype.hover = function (at, ev) {
    this.root.querySelectorAll(".ppv-hot").forEach(function (e) { e.classList.remove("ppv-hot"); });
    if (!at) { this.tip.style.display = "none"; return; }
    var m = this.model(), h = this.headData(), P = m.P, toks = m.tokens, i = at.i, lines = [];
    lines.push("<b>query " + i + " \u201c" + esc(toks[i]) + "\u201d</b>, \u03b1 = " + fmt(h.alpha[i]));
    var j = at.j === null ? null : +at.j;
    if (j !== null) {
      var c = at.kind === "raw" ? j - P : j;  // content key index
      if (at.kind === "raw" && j < P) {
        lines.push("key: prefix position P" + (j + 1) + ", weight " + this.cellText("raw", i, j));
      } else {
        lines.push("key " + c + " \u201c" + esc(toks[c]) + "\u201d");
        lines.push("raw " + this.cellText("raw", i, c + P) + " \u00b7 renormalised " +
          this.cellText("content", i, c) + " \u00b7 base " + this.cellText("base", i, c) +
          " \u00b7 difference " + this.cellText("diff", i, c));
        this.highlight(i, c);
      }
    } else {
      var n = h.norms;
      lines.push("\u2016z\u2016 " + fmt(n.z[i]) + " \u00b7 \u2016(1\u2212\u03b1)z_base\u2016 " + fmt(n.base[i]) +
        " \u00b7 \u2016\u03b1b\u2016 " + fmt(n.bias[i]) + " \u00b7 residual " + fmt(n.residual[i]));
    }
    if (h.unobservable.indexOf(i) >= 0) lines.push("(the prefix left this query no representable content mass)");
    this.tip.innerHTML = lines.join("<br>");
    this.tip.style.display = "block";
    var box = this.root.getBoundingClientRect();
    this.tip.style.left = (ev.clientX - box.left + 14) + "px";
    this.tip.style.top = (ev.clientY - box.top + 14) + "px";
  };

  View.prototype.cellText = function (kind, i, j) {
    var e = this.panels.querySelector('.ppv-' + kind + ' rect[data-i="' + i + '"][data-j="' + j + '"]');
    return e ? e.getAttribute("data-v") : "\u2013";
  };

  View.prototype.highlight = function (i, c) {
    var P = this.model().P, self = this;
    [["raw", c + P], ["content", c], ["base", c], ["diff", c]].forEach(function (kj) {
      var e = self.panels.querySelector('.ppv-' + kj[0] + ' rect[data-i="' + i + '"][data-j="' + kj[1] + '"]');
      if (e) e.classList.add("ppv-hot");
    });
  };

  window.PrefixProbeView = {
    mount: function (root, data) {
      root.__ppv = new View(root, data);
      return root.__ppv;
    }
  };
})();
