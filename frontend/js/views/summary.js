// The run page's summary card: what a succeeded analysis found, first: the run's size, the optimizer and how the
// scores model it, the phases, and the top finding (the phase with the most influence per step, and the most
// helpful and harmful examples).
import { api } from "../api.js";
import { byId } from "../dom.js";
import { fmtScore } from "../format.js";
import { html, render } from "../html.js";
import { viewParams } from "../url.js";

const percent = (x) => `${(100 * x).toFixed(0)}%`;

/** Each phase with its steps and its shares of the steps and of |influence / lr|. */
function phaseRows(phases, steps) {
  return Object.entries(phases.ranges).map(([name, [first, last]]) => ({
    name,
    first,
    last,
    stepShare: Math.max(0, last - first + 1) / Math.max(steps, 1),
    share: phases.share_abs_per_lr[name] ?? 0,
  }));
}

/** The phase that carries the most influence per step (its share of influence over its share of steps). */
const densest = (rows) =>
  rows
    .filter((r) => r.stepShare > 0)
    .reduce((best, r) => (r.share / r.stepShare > best.share / best.stepShare ? r : best));

function exampleLink(jobId, querySet, row, what) {
  if (!row) return "";
  const href = `#/jobs/${jobId}/examples/${encodeURIComponent(row.example_id)}?qs=${encodeURIComponent(querySet)}`;
  return html`most ${what}: <a href="${href}">example ${row.example_id}</a> (total ${fmtScore(row.total)})`;
}

function card({ job, summary, querySet, rows, helpful, harmful }) {
  const top = densest(rows);
  const phaseText = rows.map(
    (r) => html`<li><b>${r.name}</b>: steps ${r.first}–${r.last} (${percent(r.stepShare)} of the steps),
      ${percent(r.share)} of |influence / lr|</li>`,
  );
  return html`<h2>What analysis ${job.id} found</h2>
    <p class="facts">${summary.steps} steps · ${summary.examples} examples · ${summary.occurrences} occurrences ·
      optimizer <b>${summary.optimizer || "unknown"}</b>, modelled as <b>${summary.propagation_label}</b>
      ${summary.note ? html`<span class="muted">(${summary.note})</span>` : ""}</p>
    <p>Phases of the influence on <b>${querySet}</b>:</p>
    <ul>${phaseText}</ul>
    <p id="top-finding"><b>Top finding:</b> the ${top.name} phase carries ${percent(top.share)} of |influence / lr|
      in ${percent(top.stepShare)} of the steps; ${exampleLink(job.id, querySet, helpful, "helpful")};
      ${exampleLink(job.id, querySet, harmful, "harmful")}.</p>`;
}

/** Fills the run page's #summary-card for a succeeded job (query set: the URL's qs=, else the job's first), unless
 * current() is false by then (the page was left). */
export async function showSummaryCard(current, job) {
  const summary = await api(`/jobs/${job.id}/summary`);
  const asked = viewParams().get("qs");
  const querySet = asked in summary.query_sets ? asked : Object.keys(summary.query_sets)[0];
  const first = (kind) =>
    api(`/jobs/${job.id}/examples?query_set=${encodeURIComponent(querySet)}&kind=${kind}&limit=1`);
  const [helpful, harmful] = await Promise.all([first("helpful"), first("harmful")]);
  const rows = phaseRows(summary.query_sets[querySet].phases, summary.steps);
  if (!current()) return; // another page (perhaps another run's, with its own card) was asked for meanwhile
  const box = byId("summary-card");
  render(box, card({ job, summary, querySet, rows, helpful: helpful.data[0], harmful: harmful.data[0] }));
  box.hidden = false;
}
