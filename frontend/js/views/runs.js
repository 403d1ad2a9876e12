// The runs list: search, create a run, and the table of runs. The name pattern is compiled with the v flag, in
// which a "-" inside a class must be escaped.
import { api, postJson } from "../api.js";
import { byId } from "../dom.js";
import { fmtBytes } from "../format.js";
import { html, render } from "../html.js";
import { latestOnPage } from "../latest.js";
import { table } from "../table.js";

const COLUMNS = [
  { head: "name", cell: (r) => html`<a href="#/runs/${r.id}">${r.name}</a>` },
  { head: "status", cell: (r) => r.status },
  { head: "size", cell: (r) => fmtBytes(r.size_bytes) },
  { head: "steps", cell: (r) => r.num_steps },
  {
    head: "examples",
    cell: (r) => r.num_examples ?? html`<span class="muted" title="known once an analysis has read the log">–</span>`,
  },
  { head: "created", cell: (r) => new Date(r.created_at).toLocaleString() },
];

const page = (runs, search) => html`<h1>Runs</h1>
  <section>
    <div class="controls">
      <label>Search <input id="search" value="${search}" /></label>
      <form id="create">
        <label>New run <input id="new-name" required pattern="[A-Za-z0-9][A-Za-z0-9_. \\-]*" /></label>
        <button>Create</button>
      </form>
      <span id="create-error" class="error" role="alert"></span>
    </div>
    ${table({ columns: COLUMNS, rows: runs.data, attributes: { id: "runs" } })}
    <p class="muted">${runs.count} run(s) · <a href="#/compare">compare their analyses</a></p>
  </section>`;

async function createRun(event) {
  event.preventDefault();
  try {
    const run = await postJson("/runs", { name: byId("new-name").value });
    location.hash = `#/runs/${run.id}`;
  } catch (err) {
    byId("create-error").textContent = err.message;
  }
}

/** Draws the runs whose names match search; searchAgain(text) is what the search box calls. Only the newest
 * search's answer is drawn (two searches in a row: the older answer may arrive last), none once the page was left. */
const showRuns = latestOnPage(async (current, view, search, searchAgain) => {
  const runs = await api(`/runs?limit=200&search=${encodeURIComponent(search)}`);
  if (!current()) return; // a newer search, or another page, was asked for meanwhile: it is the one to show
  render(view, page(runs, search));
  byId("search").addEventListener("change", (e) => searchAgain(e.target.value));
  byId("create").addEventListener("submit", createRun);
});

/** Shows the runs page (every run), unless current() is false once they arrive (the page was left). */
export function renderRuns(current, view) {
  const searchAgain = (search) => showRuns(current, view, search, searchAgain);
  return searchAgain("");
}
