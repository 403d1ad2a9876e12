// The results' figures: influence across training (with the phases' summary) and the scores by phase.
import { api } from "../api.js";
import { byId } from "../dom.js";
import { controls, setGiven } from "./controls.js";

const PLOT_CONFIG = { responsive: true, displaylogo: false };

/** "early: steps 0–9, 41% of |influence / lr| · basin: ..." */
function phaseSummary(phases) {
  const share = (name) => (100 * phases.share_abs_per_lr[name]).toFixed(0);
  return Object.entries(phases.ranges)
    .map(([name, [first, last]]) => `${name}: steps ${first}–${last}, ${share(name)}% of |influence / lr|`)
    .join(" · ");
}

/** Draws the phase plot, the phases' summary and the distribution for the current controls. */
export async function drawPlots(jobId) {
  const c = controls();
  const params = new URLSearchParams({ query_set: c.querySet, view: c.view, smooth: c.smooth, points: "1000" });
  const figure = await api(`/jobs/${jobId}/figures/phase?${setGiven(params, [["query", c.query]])}`);
  await Plotly.react("phase-plot", figure.data, figure.layout, PLOT_CONFIG);
  const querySet = encodeURIComponent(c.querySet);
  byId("phase-summary").textContent = phaseSummary(await api(`/jobs/${jobId}/phases?query_set=${querySet}`));
  const dist = await api(`/jobs/${jobId}/figures/distribution?query_set=${querySet}`);
  await Plotly.react("distribution", dist.data, dist.layout, PLOT_CONFIG);
}
