// A run's page: what was found (the summary card), its analyses (each with its options; cancel, retry, show), the
// upload panel (folded away once the log is complete), and the shown analysis's results. ?job= picks the analysis.
import { api, postJson } from "../api.js";
import { byId } from "../dom.js";
import { attrs, html, render } from "../html.js";
import { state } from "../state.js";
import { table } from "../table.js";
import { viewParams } from "../url.js";
import { analyseForm, followJobs, readOptions } from "./job.js";
import { uploadFiles } from "./upload.js";
import { FileStatus, RunStatus } from "../statuses.js";

const FILE_COLUMNS = [
  { head: "file", cell: (f) => f.name },
  { head: "status", cell: (f) => f.status },
  { head: "problem", cell: (f) => f.error, td: () => ({ class: "error" }) },
];

function missing(names) {
  if (!names.length) return "";
  return html`<p class="muted">missing: ${names.slice(0, 8).join(", ")}${names.length > 8 ? "…" : ""}</p>`;
}

const isReady = (run) => run.status === RunStatus.READY;

const uploadPanel = (run) => html`<details id="upload-panel" class="panel"${attrs({ open: !isReady(run) })}>
    <summary><h2>Upload a gradient log</h2>
      <span class="muted">${run.files.length} file(s)${isReady(run) ? ", complete" : ""}</span></summary>
    <div id="dropzone" class="dropzone" tabindex="0">
      Drop the log's files here, or <label>pick files <input id="file-input" type="file" multiple /></label>
      or <label>a directory <input id="dir-input" type="file" webkitdirectory /></label>
    </div>
    <div id="upload-progress" class="bar" role="progressbar" aria-label="upload progress" aria-valuemin="0"
      aria-valuemax="100"><div></div></div>
    <p id="upload-status" class="muted"></p>
    <ul id="upload-files"></ul>
    ${table({ columns: FILE_COLUMNS, rows: run.files })}
    ${missing(run.missing_files)}
  </details>`;

const page = (run) => html`<h1>${run.name} <span class="muted">(${run.status})</span>
    <button id="delete-run" type="button" class="danger">Delete run</button></h1>
  <section id="summary-card" class="card" hidden></section>
  ${uploadPanel(run)}
  <section>
    <h2>Analyses</h2>
    <div id="jobs"></div>
    ${isReady(run) ? analyseForm() : html`<p class="muted">Analyses start once the log is complete.</p>`}
  </section>
  <section id="job" hidden></section>
  <div id="results"></div>`;

function bindDropzone(take) {
  const zone = byId("dropzone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    take(e.dataTransfer.files);
  });
}

function bindUploads(runId, drawAgain) {
  const take = (files) => uploadFiles(runId, [...files], drawAgain);
  byId("file-input").addEventListener("change", (e) => take(e.target.files));
  byId("dir-input").addEventListener("change", (e) => take(e.target.files));
  bindDropzone(take);
}

function bindAnalyze(view, runId) {
  byId("analyze-form")?.addEventListener("submit", async (event) => {
    event.preventDefault();
    const job = await postJson(`/runs/${runId}/jobs`, readOptions());
    location.hash = `#/runs/${runId}?job=${job.id}`; // the hashchange shows it
  });
}

/** The run's "Delete run" button: asks first, then deletes the run with its files and analyses (DELETE /runs/{id})
 * and goes back to the runs list. */
function bindDelete(run) {
  byId("delete-run").addEventListener("click", async () => {
    const files = `${run.files.length} file(s)`;
    const asked = `Delete run "${run.name}" with its ${files} and every analysis? This cannot be undone.`;
    if (!confirm(asked)) return;
    try {
      await api(`/runs/${run.id}`, { method: "DELETE" });
      location.hash = "#/runs";
    } catch (err) {
      alert(`The run was not deleted: ${err.message}`);
    }
  });
}

const VALIDATING = [FileStatus.RECEIVED, FileStatus.VALIDATING];

/** Shows a run's page with its analyses; the one shown is ?job= or the latest. While files wait for their verdict,
 * the page is drawn again every second (unless an upload is under way in it). Nothing is drawn once current() is
 * false (another page was asked for). */
export async function renderRun(current, view, runId) {
  clearTimeout(state.pollTimer);
  clearTimeout(state.runTimer);
  const [run, jobs] = await Promise.all([api(`/runs/${runId}`), api(`/runs/${runId}/jobs`)]);
  if (!current()) return; // the page was left while it loaded: the page asked for since is the one to show
  render(view, page(run));
  // An upload ends long after it began: the page is drawn again only if it is still the one shown (a call on a
  // page left would also stop that page's timers).
  const drawAgain = () => current() && renderRun(current, view, runId);
  bindUploads(runId, drawAgain);
  bindAnalyze(view, runId);
  bindDelete(run);
  const asked = Number(viewParams().get("job"));
  const shown = jobs.data.find((j) => j.id === asked) || jobs.data[0];
  if (run.files.some((f) => VALIDATING.includes(f.status))) {
    state.runTimer = setTimeout(() => byId("upload-files")?.childElementCount || drawAgain(), 1000);
  }
  await followJobs(current, runId, jobs.data, shown?.id);
}
