// The run's analysis job: its status and progress, polled every second until it ends; then its results.
import { api } from "../api.js";
import { byId } from "../dom.js";
import { html, render } from "../html.js";
import { state } from "../state.js";
import { showResults } from "./results.js";

function jobMarkup(job, pct) {
  const step = job.current_step != null ? ` · step ${job.current_step}` : "";
  const eta = job.eta_seconds ? ` · ETA ${Math.round(job.eta_seconds)} s` : "";
  return html`<h2>Analysis ${job.id}: <span id="job-status">${job.status}</span></h2>
    <div class="bar" role="progressbar" aria-label="analysis progress" aria-valuenow="${pct}" aria-valuemin="0"
      aria-valuemax="100"><div style="width:${pct}%"></div></div>
    <p class="muted">${pct}%${step}${eta}</p>
    ${job.error ? html`<p class="error" role="alert">${job.error}</p>` : ""}`;
}

/** Shows a job in the run page's #job box (when the run page is still shown), polling it while it runs. */
export async function showJob(job) {
  const box = byId("job");
  if (!box) return;
  render(box, jobMarkup(job, Math.round(100 * job.progress)));
  if (job.status === "queued" || job.status === "running") {
    state.pollTimer = setTimeout(async () => showJob(await api(`/jobs/${job.id}`)), 1000);
  } else if (job.status === "succeeded") {
    await showResults(job);
  }
}
