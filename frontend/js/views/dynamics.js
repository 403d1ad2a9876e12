// Value dynamics (the paper's Figure 4): how the influence of data trained early, in the basin and late
// evolves over the checkpoints, shown when the log recorded checkpoint query sets.
import { api } from "../api.js";
import { byId } from "../dom.js";
import { html } from "../html.js";

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
  </section>`;
};

/** Draws the selected series and redraws when another is picked (nothing to do without the section). */
export async function drawDynamics(jobId) {
  const picker = byId("dynamics-series");
  if (!picker) return;
  const draw = async () => {
    const series = encodeURIComponent(picker.value);
    const figure = await api(`/jobs/${jobId}/figures/dynamics?series=${series}`);
    await Plotly.react("dynamics-plot", figure.data, figure.layout, PLOT_CONFIG);
  };
  picker.addEventListener("change", draw);
  await draw();
}
