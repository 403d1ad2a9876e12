// A run's analyses (jobs): the form that starts one with its options, the table of every job with its options
// (cancel a queued or running one, retry a failed one, show any), and the shown job's progress, polled every second
// while a job of the run is queued or running; a succeeded job's summary card and results.
import { api, postJson } from "../api.js";
import { byId, valueOf } from "../dom.js";
import { html, render } from "../html.js";
import { state } from "../state.js";
import { table } from "../table.js";
import { showResults } from "./results.js";
import { showSummaryCard } from "./summary.js";
import { approximationMarker } from "./trust.js";
import { JobStatus } from "../statuses.js";

const LIVE = [JobStatus.QUEUED, JobStatus.RUNNING];

/** The form that starts an analysis; an option left at "default" takes the engine's default. */
export const analyseForm = () => html`<form id="analyze-form" class="controls">
  <label>Propagation <select id="opt-propagation">
    <option value="">default (auto)</option><option value="optimizer">optimizer-exact</option>
    <option value="sgd-proxy">SGD proxy</option></select></label>
  <label>Curvature <select id="opt-curvature">
    <option value="">default (the log's)</option><option>empirical</option><option>ggn</option></select></label>
  <label>Top rows kept <input id="opt-top-k" type="number" min="1" max="1000" placeholder="100" size="5" /></label>
  <button id="analyze" type="submit">Start analysis</button>
</form>`;

/** The options the form asks for (those left at their default are left out). */
export function readOptions() {
  const options = {};
  if (valueOf("opt-propagation")) options.propagation = valueOf("opt-propagation");
  if (valueOf("opt-curvature")) options.curvature = valueOf("opt-curvature");
  if (valueOf("opt-top-k")) options.top_k = Number(valueOf("opt-top-k"));
  return options;
}

const optionsText = (options) =>
  Object.entries(options || {})
    .map(([name, value]) => `${name}=${Array.isArray(value) ? value.join("+") : value}`)
    .join(", ") || "defaults";

function actions(job, runId, shownId) {
  const show = job.id === shownId ? html`<b>shown</b>` : html`<a href="#/runs/${runId}?job=${job.id}">show</a>`;
  const cancel = LIVE.includes(job.status) ? html` <button type="button" data-cancel="${job.id}">Cancel</button>` : "";
  const retry = [JobStatus.FAILED, JobStatus.CANCELLED].includes(job.status)
    ? html` <button type="button" data-retry="${job.id}">Retry</button>`
    : "";
  return html`${show}${cancel}${retry}`;
}

const jobColumns = (runId, shownId) => [
  { head: "analysis", cell: (j) => j.id },
  { head: "status", cell: (j) => j.status, td: (j) => ({ class: "job-status", "data-job": j.id }) },
  { head: "options", cell: (j) => optionsText(j.options) },
  { head: "scores follow", cell: (j) => html`${j.propagation || ""}${approximationMarker(j.approximations)}` },
  { head: "started", cell: (j) => new Date(j.created_at).toLocaleString() },
  { head: "", cell: (j) => actions(j, runId, shownId) },
];

const STAGE_TEXT = {
  "reading the log": "reading the log",
  "storing results": "computed · storing results (the tables appear when they are stored)",
  [JobStatus.QUEUED]: "queued: waiting for a worker",
  "worker not responding": "worker not responding: the analysis is queued again if it stays silent",
  [JobStatus.SUCCEEDED]: "done",
};

/** Where the job stands, in words: the share, step and estimate only while it computes (the API's stage: an ETA
 * only then); "storing results" once computed, with the share of its rows stored; nothing that suggests work goes
 * on once it stopped. */
export function progressText(job) {
  const pct = Math.round(100 * job.progress);
  const stage = job.stage ?? job.status;
  if (stage === "computing") {
    const step = job.current_step != null ? ` · step ${job.current_step}` : "";
    const eta = job.eta_seconds != null ? ` · ETA ${Math.round(job.eta_seconds)} s` : "";
    return `computing · ${pct}%${step}${eta}`;
  }
  if (stage === JobStatus.CANCELLED || stage === JobStatus.FAILED) return `${stage} at ${pct}%`;
  if (stage === "storing results" && job.stored_fraction != null) {
    const stored = Math.round(100 * job.stored_fraction);
    return `computed · storing results · ${stored}% stored (the tables appear when they are stored)`;
  }
  return STAGE_TEXT[stage] ?? stage;
}

function progressMarkup(job) {
  // While the rows are stored the bar follows them (the computation is done): it fills again from 0.
  const storing = (job.stage ?? job.status) === "storing results" && job.stored_fraction != null;
  const pct = Math.round(100 * (storing ? job.stored_fraction : job.progress));
  return html`<h2>Analysis ${job.id}: <span id="job-status">${job.status}</span></h2>
    <div class="bar" role="progressbar" aria-label="analysis progress" aria-valuenow="${pct}" aria-valuemin="0"
      aria-valuemax="100"><div style="width:${pct}%"></div></div>
    <p id="job-progress" class="muted" data-stage="${job.stage ?? job.status}">${progressText(job)}</p>
    ${job.error ? html`<p class="error" role="alert">${job.error}</p>` : ""}`;
}

function bindJobButtons(current, runId, shownId) {
  byId("jobs").addEventListener("click", async (event) => {
    const id = event.target.dataset.cancel || event.target.dataset.retry;
    if (!id) return;
    event.target.disabled = true;
    await postJson(`/jobs/${id}/${event.target.dataset.cancel ? "cancel" : "retry"}`, {});
    clearTimeout(state.pollTimer);
    await followJobs(current, runId, (await api(`/runs/${runId}/jobs`)).data, shownId);
  });
}

/** Shows the run's jobs and the shown one (its results once it succeeded), polling while any is live; nothing once
 * current() is false (the run page was left). */
export async function followJobs(current, runId, jobs, shownId, drawn = null) {
  if (!current()) return; // every caller awaited jobs just before: the page may have been left meanwhile
  const jobsBox = byId("jobs");
  if (!jobsBox.dataset.bound) {
    bindJobButtons(current, runId, shownId);
    jobsBox.dataset.bound = "true";
  }
  render(jobsBox, jobs.length ? table({ columns: jobColumns(runId, shownId), rows: jobs }) : html`<p>None yet.</p>`);
  const shown = jobs.find((j) => j.id === shownId);
  if (shown) {
    byId("job").hidden = false;
    render(byId("job"), progressMarkup(shown));
  }
  if (shown?.status === JobStatus.SUCCEEDED && drawn !== shown.id) {
    await Promise.all([showSummaryCard(current, shown), showResults(current, shown)]);
  }
  if (jobs.some((j) => LIVE.includes(j.status))) {
    state.pollTimer = setTimeout(async () => {
      const fresh = (await api(`/runs/${runId}/jobs`)).data;
      await followJobs(current, runId, fresh, shownId, shown?.status === JobStatus.SUCCEEDED ? shown.id : drawn);
    }, 1000);
  }
}
