// An example's page: what it is, its total influence, and its influence at each occurrence in training (on the
// whole query set or on one query, named by its id); a link back to the run's analysis it came from.
import { api } from "../api.js";
import { byId } from "../dom.js";
import { bindExports, exportButtons } from "../export.js";
import { fmtScore } from "../format.js";
import { html, render } from "../html.js";
import { table, tableRows } from "../table.js";
import { drawImage } from "../thumbs.js";
import { setViewParams, viewParams } from "../url.js";
import { approximationMarker } from "./trust.js";

/** The history table's columns; value(h) is the influence shown (on the whole set, or on one query). scores:
 * {propagation, approximations} of the job. */
const historyColumns = (scores, value = (h) => h.score) => [
  { head: "step", cell: (h) => h.step },
  { head: "epoch", cell: (h) => h.epoch },
  { head: "phase", cell: (h) => h.phase },
  {
    head: html`influence (${scores.propagation})${approximationMarker(scores.approximations)}`,
    cell: (h) => fmtScore(value(h)),
  },
];

function thumb(image) {
  if (!image) return "";
  const [height, width] = image.shape;
  return html`<canvas id="thumb" class="thumb" width="${width}" height="${height}"
    style="width:${width * 8}px"></canvas>`;
}

const queryOption = (id, i) => html`<option value="${i}">query ${id}</option>`;

const backLink = (job, run, querySet) =>
  html`<p><a id="back-to-run" href="#/runs/${job.run_id}?job=${job.id}&qs=${encodeURIComponent(querySet)}"
    >← ${run.name}, analysis ${job.id}</a></p>`;

const page = ({ exampleId, querySet, ex, meta, scores, job, run, queryIds }) => html`${backLink(job, run, querySet)}
  <h1>Example ${exampleId}</h1>
  <section>
    <h2>What it is</h2>
    ${thumb(meta.image)}
    ${meta.text ? html`<pre class="example-text">${meta.text}</pre>` : ""}
    <p>label: <b>${meta.label ?? ex.label}</b> · source: ${meta.source ?? ex.source}</p>
    <p>total influence on <b>${querySet}</b> over ${ex.occurrences} occurrence(s): ${fmtScore(ex.total)}
      <span class="muted">(${scores.propagation})</span>${approximationMarker(scores.approximations)}</p>
  </section>
  <section id="history-section">
    <h2>Influence at each occurrence</h2>
    <label>On <select id="on-query"><option value="">the whole query set</option>
      ${queryIds.map(queryOption)}</select></label>
    <div id="history-plot" style="height:280px"></div>
    ${table({ columns: historyColumns(scores), attributes: { id: "history" } })}
    ${exportButtons("history", "Every occurrence:")}
  </section>`;

/** The query set of the page's ?qs=, or else the job's first. */
function querySetOf(summary) {
  const given = viewParams().get("qs");
  return given in summary.query_sets ? given : Object.keys(summary.query_sets)[0];
}

/** The bars on the whole run's steps (one bar alone would otherwise fill the plot's width). */
const historyLayout = (steps) => ({
  xaxis: { title: { text: "training step" }, range: [-0.5, steps - 0.5] },
  yaxis: { title: { text: "influence (+ helped)" } },
  margin: { t: 20 },
});

/** Shows the history table and bar chart for the query picked in #on-query (or the whole set). */
async function showHistory(ex, scores, queryIds, steps) {
  const q = byId("on-query").value;
  const value = (h) => (q === "" ? h.score : h.per_query[Number(q)]);
  render(document.querySelector("#history tbody"), html`${tableRows(historyColumns(scores, value), ex.history)}`);
  const name = q === "" ? "on the set" : `on query ${queryIds[Number(q)]}`;
  const bars = { type: "bar", x: ex.history.map((h) => h.step), y: ex.history.map(value), name };
  await Plotly.react("history-plot", [bars], historyLayout(steps), { displaylogo: false });
}

/** Shows the page of one example of a job, unless current() is false once its answers arrive (the page was left). */
export async function renderExample(current, view, jobId, exampleId) {
  const [job, summary] = await Promise.all([api(`/jobs/${jobId}`), api(`/jobs/${jobId}/summary`)]);
  const querySet = querySetOf(summary);
  // the id as a query parameter: any id works, a "/" in it too (a path segment would be split there)
  const query = new URLSearchParams({ query_set: querySet, example_id: exampleId });
  const [ex, run] = await Promise.all([api(`/jobs/${jobId}/example?${query}`), api(`/runs/${job.run_id}`)]);
  if (!current()) return; // another page was asked for meanwhile: it is the one to show
  const scores = { propagation: job.propagation || "exact SGD", approximations: job.approximations };
  const meta = ex.metadata || {};
  const queryIds = summary.query_sets[querySet].query_ids;
  render(view, page({ exampleId, querySet, ex, meta, scores, job, run, queryIds }));
  if (meta.image) drawImage(byId("thumb"), meta.image);
  const show = () => showHistory(ex, scores, queryIds, summary.steps);
  const asked = viewParams().get("query"); // the query picked is kept in the URL (?query=)
  if (asked && Number(asked) < queryIds.length) byId("on-query").value = asked;
  byId("on-query").addEventListener("change", () => {
    setViewParams({ query: byId("on-query").value });
    show();
  });
  bindExports(byId("history-section"), (_, format) => {
    const params = new URLSearchParams({ query_set: querySet, example_id: exampleId, format });
    if (byId("on-query").value !== "") params.set("query", byId("on-query").value);
    return `/jobs/${jobId}/export/example?${params}`;
  });
  await show();
}
