// Value dynamics (the paper's Figure 4): how the influence of data trained early, in the basin and late
// evolves over the checkpoints, shown when the log recorded checkpoint query sets.
import { api } from "../api.js";
import { byId } from "../dom.js";
import { exportButtons } from "../export.js";
import { html } from "../html.js";
import { latestOnPage } from "../latest.js";

const PLOT_CONFIG = { responsive: true, displaylogo: false };

/** The section's markup: empty when the job has no value dynamics. */
export const dynamicsSection = (summary) => {
  const series = Object.keys(summary.dynamics || {});
  if (!series.length) return html``;
  const options = series.map((name) => html`<option value="${name}">${name}</option>`);
  return html`<section id="dynamics-section">
    <h2>Value dynamics</h2>
    <p class="muted">
      Mean influence on each checkpoint of the examples trained in each tenth of training (before the checkpoint).
    </p>
    <label>Query series <select id="dynamics-series">${options}</select></label>
    <div id="dynamics-plot" style="height:380px"></div>
    <p class="muted">${exportButtons("dynamics", "Every point:")}</p>
  </section>`;
};

/** The series the plot shows. */
export const shownSeries = () => byId("dynamics-series").value;

/** Draws the series picked when called, unless another was picked (or the page left) before its answer arrived. */
const drawSeries = latestOnPage(async (current, jobId) => {
  const figure = await api(`/jobs/${jobId}/figures/dynamics?series=${encodeURIComponent(shownSeries())}`);
  if (!current()) return;
  await Plotly.react("dynamics-plot", figure.data, figure.layout, PLOT_CONFIG);
});

/** Draws the selected series and redraws when another is picked (nothing to do without the section). */
export async function drawDynamics(current, jobId) {
  const picker = byId("dynamics-series");
  if (!picker) return;
  picker.addEventListener("change", () => drawSeries(current, jobId));
  await drawSeries(current, jobId);
}
