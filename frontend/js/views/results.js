// A succeeded job's results: the phase plot with its controls, the ranking tables and the scores by phase.
import { api } from "../api.js";
import { byId, onEach } from "../dom.js";
import { bindExports, exportButtons } from "../export.js";
import { html, render } from "../html.js";
import { state } from "../state.js";
import { keepControlsInUrl, restoreControls, viewParams } from "../url.js";
import { drawDynamics, dynamicsSection } from "./dynamics.js";
import { resultsExportPath } from "./exports.js";
import { drawPlots } from "./plots.js";
import { showExamples, showTop } from "./rankings.js";
import { bindSelection, selectionSection, showSelection } from "./selection.js";
import { trustBox } from "./trust.js";
import { fillWindows } from "./windows.js";

const setOption = (name) => html`<option>${name}</option>`;

const plotSection = (summary, propagation) => html`<section>
  <h2>Influence across training</h2>
  <div class="controls">
    <label>Query set <select id="qs">${Object.keys(summary.query_sets).map(setOption)}</select></label>
    <label>Query <select id="query"></select></label>
    <label>View <select id="view-kind">
      <option value="per_lr">per learning rate (paper)</option><option value="raw">raw</option>
    </select></label>
    <label>Smoothing <select id="smooth">
      <option value="1">none</option><option value="5">5</option><option value="21" selected>21</option>
      <option value="51">51</option>
    </select></label>
  </div>
  <p id="propagation">Scores follow the optimizer as <b>${propagation}</b>.</p>
  ${summary.note ? html`<p class="muted">${summary.note}</p>` : ""}
  <div id="phase-plot" style="height:420px"></div>
  <p id="phase-summary" class="muted"></p>
  <p class="muted">Hover a step for its influence, learning rate and loss; click it to list its examples below.
    ${exportButtons("curve", "Curve (every step):")} ${exportButtons("phases", "Phases:")}</p>
</section>`;

const topSection = () => html`<section>
  <h2>Top training examples</h2>
  <div class="controls">
    <label>Window <select id="window"><option value="">whole run (overall top)</option></select></label>
    <label>Steps <input id="step-min" type="number" min="0" size="6" placeholder="from" /> –
      <input id="step-max" type="number" min="0" size="6" placeholder="to" /></label>
    <button id="prev">◀ previous</button><button id="next">next ▶</button>
    <span id="top-page" class="muted" role="status"></span>
  </div>
  <p id="top-chosen" class="muted" role="status"></p>
  <div class="cols">
    <div><h2>Helpful</h2><div id="top-helpful"></div>${exportButtons("top-helpful", "Every row:")}</div>
    <div><h2>Harmful</h2><div id="top-harmful"></div>${exportButtons("top-harmful", "Every row:")}</div>
  </div>
</section>`;

const examplesSection = () => html`<section>
  <h2>Examples by total influence (all their occurrences)</h2>
  <div class="cols">
    <div><h2>Most helpful</h2><div id="examples-helpful"></div>${exportButtons("examples-helpful", "All:")}</div>
    <div><h2>Most harmful</h2><div id="examples-harmful"></div>${exportButtons("examples-harmful", "All:")}</div>
  </div>
</section>`;

const distributionSection = () =>
  html`<section><h2>Scores by phase</h2><div id="distribution" style="height:320px"></div>
    <p class="muted"><span id="distribution-note"></span> ${exportButtons("distribution", "Its points:")}</p>
  </section>`;

const resultsPage = (summary, propagation) =>
  html`${trustBox(summary.approximations, summary.replay_agreements)}${plotSection(summary, propagation)}
    ${selectionSection()}${topSection()}
    ${examplesSection()}${distributionSection()}${dynamicsSection(summary)}`;

/** Fills the query picker with the current query set's queries. */
function fillQueries(summary) {
  const info = summary.query_sets[byId("qs").value];
  const options = info.query_ids.map((id, i) => html`<option value="${i}">${id}</option>`);
  render(byId("query"), html`<option value="">whole set</option>${options}`);
}

function bindControls(summary, refresh) {
  byId("qs").addEventListener("change", async () => {
    fillQueries(summary);
    state.page = 0;
    refresh.plots();
    refresh.selection();
    refresh.examples();
    await refresh.windows();
    refresh.top();
  });
  onEach(["query", "view-kind", "smooth"], "change", () => {
    refresh.plots();
    refresh.top();
  });
  onEach(["window", "step-min", "step-max"], "change", (event) => {
    if (event.target.id !== "window") byId("window").value = "steps"; // a step range is its own window
    state.page = 0;
    refresh.top();
  });
  byId("prev").addEventListener("click", () => {
    state.page = Math.max(0, state.page - 1);
    refresh.top();
  });
  byId("next").addEventListener("click", () => {
    if (state.page >= Number(byId("next").dataset.last ?? Infinity)) return; // the last page: nothing after it
    state.page += 1;
    refresh.top();
  });
}

/** Shows a succeeded job's results in the run page's #results, which gets data-ready="true" once all is drawn;
 * nothing more is drawn once current() is false (the page was left). */
export async function showResults(current, job) {
  const summary = await api(`/jobs/${job.id}/summary`);
  if (!current()) return; // another page (perhaps another run's, with its own results) was asked for meanwhile
  const propagation = summary.propagation_label || "exact SGD";
  const scores = { propagation, approximations: summary.approximations }; // how the score columns are labelled
  const results = byId("results");
  render(results, resultsPage(summary, propagation));
  restoreControls(["qs"]); // the view in the URL (a link, a reload), else the defaults
  state.page = Number(viewParams().get("page")) || 0;
  const refresh = {
    plots: () => drawPlots(current, job.id),
    top: () => showTop(current, job.id, scores, summary.steps - 1),
    examples: () => showExamples(current, job.id, scores),
    windows: () => fillWindows(current, job.id),
    selection: () => showSelection(current, job.id),
  };
  fillQueries(summary);
  restoreControls(["query", "view-kind", "smooth", "step-min", "step-max"]);
  bindControls(summary, refresh);
  bindSelection(current, job.id);
  bindExports(results, (name, format) => resultsExportPath(job.id, summary.steps - 1, name, format));
  await refresh.windows();
  if (!current()) return;
  restoreControls(["window"]);
  keepControlsInUrl(results);
  await Promise.all([
    refresh.plots(),
    refresh.top(),
    refresh.examples(),
    refresh.selection(),
    drawDynamics(current, job.id),
  ]);
  results.dataset.ready = "true";
}
