// The results' figures: influence across training (with the phases' summary) and the scores by phase. A click on
// a point lists that step's examples in the "Top training examples" tables.
import { api } from "../api.js";
import { byId } from "../dom.js";
import { latestOnPage } from "../latest.js";
import { controls, setGiven } from "./controls.js";

const PLOT_CONFIG = { responsive: true, displaylogo: false };

/** "early: steps 0–9, 41% of |influence / lr| · basin: ..." (the shares of the view's measure). */
function phaseSummary(phases, view) {
  const key = view === "raw" ? "share_abs" : "share_abs_per_lr";
  const measure = view === "raw" ? "|influence|" : "|influence / lr|";
  const share = (name) => (100 * phases[key][name]).toFixed(0);
  return Object.entries(phases.ranges)
    .map(([name, [first, last]]) => `${name}: steps ${first}–${last}, ${share(name)}% of ${measure}`)
    .join(" · ");
}

/** The step range of the top tables becomes the clicked step: the tables then list that step's examples. */
function showStepExamples(step) {
  byId("step-min").value = String(step);
  byId("step-max").value = String(step);
  byId("step-min").dispatchEvent(new Event("change", { bubbles: true }));
  byId("top-chosen").scrollIntoView({ block: "start" });
}

function linkPoints() {
  const plot = byId("phase-plot");
  if (plot.dataset.linked) return;
  plot.dataset.linked = "true";
  plot.on("plotly_click", (event) => {
    const point = event.points?.[0];
    if (point && Number.isInteger(point.x)) showStepExamples(point.x);
  });
}

/** Draws the phase plot, the phases' summary and the distribution for the current controls; when the controls
 * change again before the answers arrive, only the newest request's answers are drawn (none once the page was left). */
export const drawPlots = latestOnPage(async (current, jobId) => {
  const c = controls();
  const params = new URLSearchParams({ query_set: c.querySet, view: c.view, smooth: c.smooth, points: "1000" });
  const querySet = encodeURIComponent(c.querySet);
  const [figure, phases, dist] = await Promise.all([
    api(`/jobs/${jobId}/figures/phase?${setGiven(params, [["query", c.query]])}`),
    api(`/jobs/${jobId}/phases?query_set=${querySet}`),
    api(`/jobs/${jobId}/figures/distribution?query_set=${querySet}`),
  ]);
  if (!current()) return; // a newer request was made meanwhile: its answer is the one to show
  await Plotly.react("phase-plot", figure.data, figure.layout, PLOT_CONFIG);
  // A newer request's answers may have arrived while this plot was drawn: its summary and distribution are the ones
  // to show (and its own phase plot has replaced this one).
  if (!current()) return;
  linkPoints();
  byId("phase-summary").textContent = phaseSummary(phases, c.view);
  await Plotly.react("distribution", dist.data, dist.layout, PLOT_CONFIG);
  byId("distribution-note").textContent = distributionNote(dist);
});

/** What the box plot draws: every occurrence or a sample (of how many), and how many lie beyond its axis. */
function distributionNote({ drawn, occurrences, beyond }) {
  const count = (n) => n.toLocaleString("en");
  const what =
    drawn >= occurrences
      ? `All ${count(occurrences)} occurrences (the query-set mean of each).`
      : `An evenly spaced sample of ${count(drawn)} of the ${count(occurrences)} occurrences.`;
  const cut = beyond ? ` The axis spans the boxes' whiskers: ${count(beyond)} occurrence(s) lie beyond it.` : "";
  return what + cut;
}
