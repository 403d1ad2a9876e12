// Comparing analyses (docs/compare-and-export.md): pick two or more succeeded jobs of the project; their curves
// overlaid on the share of training done, their phase shares side by side, and per pair the overlap and rank
// correlation of their top examples (matched by example id) and the examples whose influence differs most. The
// picks and options live in the URL (#/compare?jobs=3,5&qs=val), so a comparison has a link.
import { api } from "../api.js";
import { byId, onEach, valueOf } from "../dom.js";
import { bindExports, exportButtons } from "../export.js";
import { fmtScore } from "../format.js";
import { html, render } from "../html.js";
import { latestOnPage } from "../latest.js";
import { table } from "../table.js";
import { setViewParams, viewParams } from "../url.js";
import { approximationMarker } from "./trust.js";

const PLOT_CONFIG = { responsive: true, displaylogo: false };
const fixed = (x) => (x == null ? "n/a" : x.toFixed(3));

const pickColumns = [
  {
    head: "compare",
    cell: (j) =>
      html`<input type="checkbox" name="pick" value="${j.job_id}" aria-label="compare analysis ${j.job_id}" />`,
  },
  { head: "run", cell: (j) => html`<a href="#/runs/${j.run_id}?job=${j.job_id}">${j.run_name}</a>` },
  { head: "analysis", cell: (j) => j.job_id },
  {
    head: "options",
    cell: (j) =>
      Object.entries(j.options)
        .map(([k, v]) => `${k}=${v}`)
        .join(", ") || "defaults",
  },
  { head: "scores follow", cell: (j) => html`${j.propagation || ""}${approximationMarker(j.approximations)}` },
  { head: "query sets", cell: (j) => j.query_sets.join(", ") },
];

const page = (jobs) => html`<h1>Compare analyses</h1>
  <section>
    <h2>Pick two or more analyses</h2>
    ${table({ columns: pickColumns, rows: jobs, attributes: { id: "compare-picks" } })}
    <div class="controls">
      <label>Query set <select id="cmp-qs"></select></label>
      <label>View <select id="cmp-view"><option value="per_lr">per learning rate (paper)</option>
        <option value="raw">raw</option></select></label>
      <label>Smoothing <select id="cmp-smooth"><option value="1">none</option><option value="5">5</option>
        <option value="21">21</option></select></label>
      <label>Scale <select id="cmp-scale"><option value="">as computed</option>
        <option value="max">each run ÷ its largest |value|</option></select></label>
      <label>Top examples matched <input id="cmp-top" type="number" min="1" max="1000" value="100" size="5" /></label>
      <button id="compare" type="button">Compare</button>
    </div>
    <p id="compare-error" class="error" role="alert"></p>
  </section>
  <div id="comparison"></div>`;

/** The picked analyses, oldest first (a pair's differences are the newer's totals less the older's). */
const picked = () =>
  [...document.querySelectorAll("input[name=pick]:checked")].map((i) => Number(i.value)).sort((x, y) => x - y);

/** The query set picker offers the sets every picked analysis has (or every set, before two are picked). */
function fillQuerySets(jobs, wanted) {
  const chosen = jobs.filter((j) => picked().includes(j.job_id));
  const lists = (chosen.length ? chosen : jobs).map((j) => j.query_sets);
  const sets = lists.length ? lists.reduce((common, names) => common.filter((s) => names.includes(s))) : [];
  render(byId("cmp-qs"), html`${sets.map((s) => html`<option>${s}</option>`)}`);
  if (sets.includes(wanted)) byId("cmp-qs").value = wanted;
}

const pairColumns = (label) => [
  { head: "pair", cell: (p) => `${label[p.a]} vs ${label[p.b]}` },
  { head: "shared examples", cell: (p) => `${p.shared_examples} of ${p.examples_a} / ${p.examples_b}` },
  { head: "top helpful shared", cell: (p) => `${p.overlap.helpful.shared} of ${p.overlap.helpful.of}` },
  { head: "top harmful shared", cell: (p) => `${p.overlap.harmful.shared} of ${p.overlap.harmful.of}` },
  {
    head: "Spearman (shared examples)",
    cell: (p) => fixed(p.spearman_all),
    td: (p) => ({ "data-rho": p.spearman_all }),
  },
  { head: "Spearman (top examples)", cell: (p) => fixed(p.spearman_top), td: (p) => ({ "data-rho": p.spearman_top }) },
];

const diffColumns = (pair, querySet, label) => [
  {
    head: "example",
    cell: (d) => {
      const href = `#/jobs/${pair.a}/examples/${encodeURIComponent(d.example_id)}?qs=${encodeURIComponent(querySet)}`;
      return html`<a href="${href}">${d.example_id}</a>`;
    },
  },
  { head: `total in ${label[pair.a]}`, cell: (d) => fmtScore(d.total_a) },
  { head: `total in ${label[pair.b]}`, cell: (d) => fmtScore(d.total_b) },
  { head: "difference (b − a)", cell: (d) => fmtScore(d.difference), td: (d) => ({ "data-difference": d.difference }) },
];

function comparisonMarkup(found) {
  const label = Object.fromEntries(found.runs.map((r) => [r.job_id, r.label]));
  const diffs = found.pairs.map(
    (p) => html`<h3>${label[p.a]} → ${label[p.b]}</h3>
      ${table({
        columns: diffColumns(p, found.query_set, label),
        rows: p.differences,
        attributes: {
          class: "compare-diff",
          "data-pair": `${p.a}-${p.b}`,
        },
      })}`,
  );
  return html`<section><h2>Influence across training</h2>
      <div id="compare-curves" style="height:380px"></div>${exportButtons("curves", "Curves (every step):")}</section>
    <section><h2>Phase shares</h2>
      <div id="compare-shares" style="height:320px"></div>${exportButtons("phases", "Phases:")}</section>
    <section><h2>Do they agree on the top examples?</h2>
      ${table({ columns: pairColumns(label), rows: found.pairs, attributes: { id: "compare-pairs" } })}
      <p class="muted">Examples are matched by id: meaningful for runs over the same data. Top: each run's
        ${found.pairs[0]?.top} most helpful and most harmful examples by total influence.</p>
      ${exportButtons("overlap")}</section>
    <section><h2>Examples whose influence differs most</h2>${diffs}${exportButtons("differences")}</section>`;
}

function comparisonParams() {
  return new URLSearchParams({ jobs: picked().join(","), query_set: valueOf("cmp-qs"), top: valueOf("cmp-top") });
}

/** The curves' figure, each run's curve divided by its largest |value| when the scale asks for it: one run's curve
 * 10-50x another's (AdamW against SGD) no longer flattens the other to zero. The shapes compare, not the sizes. */
function scaled(figure, scale) {
  if (scale !== "max") return figure;
  const data = figure.data.map((trace) => {
    if (!Array.isArray(trace.y)) return trace;
    const largest = Math.max(...trace.y.filter((v) => v != null).map(Math.abs), 0) || 1;
    const y = trace.y.map((v) => (v == null ? v : v / largest));
    return { ...trace, y, name: `${trace.name} (÷ ${largest.toExponential(2)})` };
  });
  const yaxis = { ...figure.layout.yaxis, title: { text: "influence ÷ the run's largest |value|" } };
  return { data, layout: { ...figure.layout, yaxis } };
}

/** Draws the comparison of the picked analyses and keeps the picks and options in the URL; when they change again
 * before the answer arrives, only the newest comparison is drawn (none once the page was left). */
const showComparison = latestOnPage(async (current) => {
  const params = comparisonParams();
  setViewParams({
    jobs: params.get("jobs"),
    qs: params.get("query_set"),
    view: valueOf("cmp-view"),
    smooth: valueOf("cmp-smooth"),
    scale: valueOf("cmp-scale"),
    top: params.get("top"),
  });
  params.set("view", valueOf("cmp-view"));
  params.set("smooth", valueOf("cmp-smooth"));
  render(byId("compare-error"), html``);
  try {
    const found = await api(`/compare?${params}`);
    if (!current()) return; // the picks or options changed meanwhile: the newer comparison is the one to show
    render(byId("comparison"), comparisonMarkup(found));
    const curves = scaled(found.figures.curves, valueOf("cmp-scale"));
    await Plotly.react("compare-curves", curves.data, curves.layout, PLOT_CONFIG);
    if (!current()) return; // (the plots are found by id: a newer comparison's markup may have replaced them)
    await Plotly.react("compare-shares", found.figures.shares.data, found.figures.shares.layout, PLOT_CONFIG);
    if (current()) byId("comparison").dataset.ready = "true";
  } catch (err) {
    if (current()) byId("compare-error").textContent = err.message;
  }
});

function restore(jobs) {
  const params = viewParams();
  const wanted = (params.get("jobs") || "").split(",").map(Number);
  document.querySelectorAll("input[name=pick]").forEach((i) => (i.checked = wanted.includes(Number(i.value))));
  fillQuerySets(jobs, params.get("qs"));
  for (const [id, name] of [
    ["cmp-view", "view"],
    ["cmp-smooth", "smooth"],
    ["cmp-scale", "scale"],
    ["cmp-top", "top"],
  ]) {
    if (params.get(name)) byId(id).value = params.get(name);
  }
  return picked().length >= 2;
}

/** Shows the comparison page; a link with jobs= draws its comparison at once. Nothing is drawn once current() is
 * false (the page was left while it loaded). */
export async function renderCompare(current, view) {
  const jobs = (await api("/compare/jobs")).data;
  if (!current()) return; // another page was asked for meanwhile: it is the one to show
  render(view, page(jobs));
  byId("compare-picks").addEventListener("change", () => fillQuerySets(jobs, valueOf("cmp-qs")));
  byId("compare").addEventListener("click", () => showComparison(current));
  onEach(["cmp-view", "cmp-smooth", "cmp-scale"], "change", () => {
    if (byId("comparison").childElementCount) showComparison(current);
  });
  bindExports(byId("comparison"), (name, format) => {
    const params = comparisonParams();
    params.set("format", format);
    return `/compare/export/${name}?${params}`;
  });
  if (restore(jobs)) await showComparison(current);
}
