// A run's page: its files (upload more by picking or dropping them), the analysis job and its results.
import { api, postJson } from "../api.js";
import { byId } from "../dom.js";
import { html, render } from "../html.js";
import { state } from "../state.js";
import { table } from "../table.js";
import { showJob } from "./job.js";
import { uploadFiles } from "./upload.js";

const FILE_COLUMNS = [
  { head: "file", cell: (f) => f.name },
  { head: "status", cell: (f) => f.status },
  { head: "problem", cell: (f) => f.error, td: () => ({ class: "error" }) },
];

function missing(names) {
  if (!names.length) return "";
  return html`<p class="muted">missing: ${names.slice(0, 8).join(", ")}${names.length > 8 ? "…" : ""}</p>`;
}

const page = (run) => html`<h1>${run.name} <span class="muted">(${run.status})</span></h1>
  <section>
    <h2>Upload a gradient log</h2>
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
    ${run.status === "ready" ? html`<button id="analyze">Start analysis</button>` : ""}
  </section>
  <section id="job"></section>
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

function bindUploads(view, runId) {
  const take = (files) => uploadFiles(runId, [...files], () => renderRun(view, runId));
  byId("file-input").addEventListener("change", (e) => take(e.target.files));
  byId("dir-input").addEventListener("change", (e) => take(e.target.files));
  bindDropzone(take);
}

function bindAnalyze(view, runId) {
  byId("analyze")?.addEventListener("click", async () => {
    await postJson(`/runs/${runId}/jobs`, {});
    renderRun(view, runId);
  });
}

/** Shows a run's page, with its latest job. */
export async function renderRun(view, runId) {
  clearTimeout(state.pollTimer);
  const run = await api(`/runs/${runId}`);
  const jobs = (await api(`/runs/${runId}/jobs`)).data;
  render(view, page(run));
  bindUploads(view, runId);
  bindAnalyze(view, runId);
  if (jobs[0]) showJob(jobs[0]);
}
