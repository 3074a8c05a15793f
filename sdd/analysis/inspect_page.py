"""The `sdd inspect` page: one self-contained HTML file (inline CSS and JS, the data as embedded JSON).

No network, no files beside it: the page is meant to be copied off a cluster and opened anywhere. The
script renders the tokens of the chosen student from the JSON, colours each by its KL to the teacher,
and fills a tooltip from the same JSON on hover. The URL fragment `#view=I&hover=S:T` opens view I and
hovers token T of sample S once the page is drawn (headless screenshots and the browser test use it).
"""

from __future__ import annotations

import html
import json

# Significant digits kept for the numbers in the embedded JSON (the page shows three).
DIGITS = 4


def compact(value):
    """Floats to DIGITS significant digits, recursively: the page's data shrinks by about half."""
    if isinstance(value, float):
        return float(f"{value:.{DIGITS}g}")
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [compact(v) for v in value]
    return value


def embedded_json(document: dict) -> str:
    """JSON safe inside <script>: no '<' survives, so neither '</script>' nor '<!--' can end the block."""
    return json.dumps(compact(document), ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def render(document: dict) -> str:
    """The page for a document made by sdd/stages/inspect.py (its `views`, `meta` and `scale`)."""
    return (_TEMPLATE.replace("__TITLE__", html.escape(document["meta"]["title"]))
            .replace("__DATA__", embedded_json(document)))


_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root { --ink: #1f2328; --muted: #656d76; --line: #d0d7de; --soft: #f6f8fa; --good: #1a7f37; --bad: #cf222e; }
  * { box-sizing: border-box; }
  body { margin: 0 auto; max-width: 1280px; padding: 18px 22px 60px; color: var(--ink);
         font: 14px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  h2 { font-size: 16px; margin: 22px 0 8px; }
  .meta { color: var(--muted); font-size: 12.5px; }
  .meta code, td code { font-size: 12px; }
  table { border-collapse: collapse; margin: 6px 0; }
  th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: right; font-variant-numeric: tabular-nums; }
  th { background: var(--soft); font-weight: 600; }
  td:first-child, th:first-child { text-align: left; }
  .note { color: var(--muted); font-size: 12.5px; max-width: 1100px; }
  .strings { display: flex; gap: 24px; flex-wrap: wrap; }
  .bar { display: inline-block; height: 9px; background: #e5534b; vertical-align: middle; margin-right: 4px; }
  .controls { display: flex; gap: 14px; align-items: center; flex-wrap: wrap; margin: 14px 0 6px; }
  .controls button { border: 1px solid var(--line); background: #fff; border-radius: 6px; padding: 4px 12px;
                     cursor: pointer; font: inherit; }
  .controls button.on { background: var(--ink); color: #fff; border-color: var(--ink); }
  .legend { display: inline-flex; align-items: center; gap: 6px; color: var(--muted); font-size: 12.5px; }
  .ramp { width: 160px; height: 12px; border: 1px solid var(--line);
          background: linear-gradient(90deg, rgba(229,83,75,0), rgba(229,83,75,0.9)); }
  .card { border: 1px solid var(--line); border-radius: 8px; margin: 12px 0; overflow: hidden; }
  .card-head { background: var(--soft); padding: 6px 10px; border-bottom: 1px solid var(--line); }
  .card-head .problem { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
  .card-head .facts { color: var(--muted); font-size: 12.5px; }
  .pair { display: grid; grid-template-columns: 1fr 1fr; }
  .side { padding: 8px 10px; min-width: 0; }
  .side + .side { border-left: 1px solid var(--line); background: #fbfbfc; }
  .side h3 { margin: 0 0 4px; font-size: 12.5px; font-weight: 600; color: var(--muted); }
  .text { white-space: pre-wrap; word-break: break-word; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace;
          font-size: 13px; line-height: 1.7; }
  .tok { border-radius: 2px; cursor: default; }
  .tok:hover, .tok.hovered { outline: 2px solid #0969da; }
  .tok:empty { display: inline-block; width: 4px; height: 1em; vertical-align: middle; }  /* part of a character */
  .tok.special { color: var(--muted); font-style: italic; }
  .ok { color: var(--good); font-weight: 600; }
  .no { color: var(--bad); font-weight: 600; }
  #tip { position: absolute; display: none; z-index: 10; background: #fff; border: 1px solid #8c959f; border-radius: 6px;
         box-shadow: 0 6px 18px rgba(0,0,0,.18); padding: 8px 10px; font-size: 12.5px; min-width: 250px; }
  #tip table { margin: 4px 0 0; width: 100%; }
  #tip td, #tip th { padding: 2px 6px; }
  #tip tr.chosen td { background: #ddf4ff; font-weight: 600; }
  #tip .k { color: var(--muted); }
  #tip code { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre; }
</style>
</head>
<body>
<script type="application/json" id="sdd-data">__DATA__</script>
<h1 id="title"></h1>
<div class="meta" id="meta"></div>
<h2>Summary</h2>
<div id="summary"></div>
<h2>Which tokens carry the KL mass</h2>
<div class="note">Token strings ranked by their share of the summed KL(student &Vert; teacher) over every
  student sample on this page; count = how often the string occurs, mean = its token-mean KL (nats).</div>
<div class="strings" id="strings"></div>
<div class="controls">
  <span id="views"></span>
  <span>order: <button data-order="problem" class="on">problem</button> <button data-order="kl">KL sum</button></span>
  <span class="legend">KL per token <span>0</span><span class="ramp"></span><span id="scale"></span>
    <span>(hover a token for the teacher's top alternatives)</span></span>
</div>
<div id="samples"></div>
<div id="tip"></div>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("sdd-data").textContent);
const TEXT = 0, KL = 1, PS = 2, PT = 3, TOP = 4, RANK = 5;  // fields of one token record (RANK: of the sampled token in TOP, -1 if absent)
let view = DATA.selected, order = "problem";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}
const num = (x, d = 3) => (x === null || x === undefined) ? "–" : Number(x).toPrecision(d);
const pct = (x) => (x === null || x === undefined) ? "–" : (100 * x).toFixed(1) + "%";
// a token as text, quoted, so spaces and \\n stay visible; "" is a token holding part of a multi-byte character
const shown = (s) => s === "" ? "(part of a character)" : JSON.stringify(s);
const verdict = (c) => c === null || c === undefined ? el("span", {text: "unverified"})
  : el("span", {class: c ? "ok" : "no", text: c ? "\\u2713 correct" : "\\u2717 incorrect"});

function header() {
  const m = DATA.meta;
  document.getElementById("title").textContent = m.title;
  const meta = document.getElementById("meta");
  const lines = [
    ["run", m.run], ["problems", m.problems], ["sampling", m.sampling], ["KL", m.kl], ["command", m.command],
    ["made", m.made],
  ];
  for (const [k, v] of lines) meta.append(el("div", {}, el("b", {text: k + ": "}), el("code", {text: v})));
}

function summary() {
  const rows = [["student", "student \u2192 teacher checkpoints", "student acc.", "teacher acc.", "tokens",
                 "token-mean KL", "KL share, top 5% of tokens", "top 1% / 10% / 20%",
                 "mean KL, correct (samples)", "mean KL, incorrect (samples)"]];
  const table = el("table", {id: "summary-table"});
  table.append(el("tr", {}, ...rows[0].map(h => el("th", {text: h}))));
  DATA.views.forEach((v, i) => {
    const s = v.summary, ms = s.mass_share;
    table.append(el("tr", {"data-view": i},
      el("td", {text: v.label}), el("td", {}, el("code", {text: v.student.name + " \u2192 " + v.teacher.name})),
      el("td", {text: pct(s.accuracy)}), el("td", {text: pct(v.teacher_accuracy)}), el("td", {text: s.tokens}),
      el("td", {text: num(s.mean_kl)}), el("td", {text: pct(s.top5_share)}),
      el("td", {text: [ms["0.01"], ms["0.1"], ms["0.2"]].map(pct).join(" / ")}),
      el("td", {text: num(s.correct.mean_kl) + " (" + s.correct.samples + ")"}),
      el("td", {text: num(s.incorrect.mean_kl) + " (" + s.incorrect.samples + ")"})));
  });
  const box = document.getElementById("summary");
  box.append(table);
  if (DATA.change) box.append(el("p", {class: "note", id: "change", text: DATA.change}));
  box.append(el("p", {class: "note", text: DATA.meta.notes}));
  const strings = document.getElementById("strings");
  DATA.views.forEach(v => {
    const t = el("table", {}, el("tr", {}, el("th", {text: v.label + ": string"}), el("th", {text: "share"}),
                                 el("th", {text: "count"}), el("th", {text: "mean"})));
    for (const r of v.summary.top_strings) {
      t.append(el("tr", {}, el("td", {}, el("code", {text: shown(r.text)})),
        el("td", {}, el("span", {class: "bar", style: "width:" + Math.round(60 * (r.share || 0)) + "px"}), pct(r.share)),
        el("td", {text: r.count}), el("td", {text: num(r.mean_kl)})));
    }
    strings.append(t);
  });
}

function tabs() {
  const box = document.getElementById("views");
  box.replaceChildren(el("span", {text: "student: "}));
  DATA.views.forEach((v, i) => {
    const b = el("button", {class: i === view ? "on" : "", text: v.label});
    b.onclick = () => { view = i; tabs(); draw(); };
    box.append(b, " ");
  });
  document.getElementById("scale").textContent = num(DATA.scale) + "+ nats";
}

function colour(kl) {
  const a = Math.max(0, Math.min(1, kl / DATA.scale)) * 0.9;
  return "rgba(229,83,75," + a.toFixed(3) + ")";
}

function draw() {
  const v = DATA.views[view];
  const box = document.getElementById("samples");
  box.replaceChildren();
  const indices = v.samples.map((_, i) => i);
  if (order === "kl") indices.sort((a, b) => v.samples[b].kl_sum - v.samples[a].kl_sum);
  let count = 0;
  for (const s of indices) {
    const sample = v.samples[s];
    const text = el("div", {class: "text student-text"});
    sample.tokens.forEach((t, i) => {
      const span = el("span", {class: "tok" + ((sample.special || []).includes(i) ? " special" : ""),
                               "data-s": s, "data-t": i, style: "background:" + colour(t[KL])});
      span.textContent = t[TEXT];
      text.append(span);
      count++;
    });
    const n = sample.tokens.length;
    const card = el("div", {class: "card", "data-sample": s},
      el("div", {class: "card-head"},
        el("div", {class: "problem", text: "#" + (s + 1) + "  " + sample.problem}),
        el("div", {class: "facts"}, "gold " + sample.answer + " \u00b7 student: ", verdict(sample.correct),
           " \u00b7 " + n + " tokens \u00b7 KL sum " + num(sample.kl_sum) + " \u00b7 mean " +
           num(n ? sample.kl_sum / n : null) + (sample.finish === "length" ? " \u00b7 cut at max_new_tokens" : ""))),
      el("div", {class: "pair"},
        el("div", {class: "side"}, el("h3", {text: "student (" + v.student.name + "), coloured by KL to the teacher"}), text),
        el("div", {class: "side"}, el("h3", {}, "teacher (" + v.teacher.name + ") on the same problem: ",
                                       verdict(sample.teacher.correct)),
           el("div", {class: "text teacher-text", text: sample.teacher.text}))));
    box.append(card);
  }
  document.body.dataset.view = v.label;
  document.body.dataset.renderedTokens = count;
}

function showTip(span) {
  const v = DATA.views[view], s = +span.dataset.s, i = +span.dataset.t;
  const t = v.samples[s].tokens[i];
  const tip = document.getElementById("tip");
  const table = el("table", {}, el("tr", {}, el("th", {text: "teacher's top " + t[TOP].length}), el("th", {text: "p_T"})));
  t[TOP].forEach(([alt, p], rank) => {
    table.append(el("tr", {class: rank === t[RANK] ? "chosen" : ""}, el("td", {}, el("code", {text: shown(alt)})),
                    el("td", {}, el("span", {class: "bar", style: "width:" + Math.round(50 * p) + "px"}), num(p))));
  });
  tip.replaceChildren(
    el("div", {}, el("span", {class: "k", text: "token "}), el("code", {id: "tip-token", text: shown(t[TEXT])}),
       el("span", {class: "k", text: "  #" + i + " of sample " + (s + 1)})),
    el("div", {id: "tip-kl"}, el("span", {class: "k", text: "KL(student \u2016 teacher) "}), num(t[KL]) + " nats"),
    el("div", {}, el("span", {class: "k", text: "student p of this token "}), num(t[PS]),
       el("span", {class: "k", text: "   teacher p "}), num(t[PT])),
    table);
  tip.dataset.sample = s;
  tip.dataset.token = i;
  tip.style.display = "block";
  const r = span.getBoundingClientRect();
  const left = Math.min(window.scrollX + r.left, window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8);
  tip.style.left = Math.max(4, left) + "px";
  tip.style.top = (window.scrollY + r.bottom + 6) + "px";
  document.querySelectorAll(".tok.hovered").forEach(x => x.classList.remove("hovered"));
  span.classList.add("hovered");
}

document.getElementById("samples").addEventListener("mouseover", e => {
  if (e.target.classList && e.target.classList.contains("tok")) showTip(e.target);
});
document.getElementById("samples").addEventListener("mouseout", e => {
  if (e.target.classList && e.target.classList.contains("tok")) {
    document.getElementById("tip").style.display = "none";
    e.target.classList.remove("hovered");
  }
});
document.querySelectorAll("[data-order]").forEach(b => b.onclick = () => {
  order = b.dataset.order;
  document.querySelectorAll("[data-order]").forEach(x => x.classList.toggle("on", x === b));
  draw();
});

header();
summary();
const args = new URLSearchParams(location.hash.slice(1));
if (args.has("view")) view = Math.max(0, Math.min(DATA.views.length - 1, +args.get("view")));
tabs();
draw();
if (args.has("hover")) {
  const [s, t] = args.get("hover").split(":");
  const span = document.querySelector('.tok[data-s="' + (+s) + '"][data-t="' + (+t) + '"]');
  if (span) span.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
}
</script>
</body>
</html>
"""
