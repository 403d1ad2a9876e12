// "When to select data": the step windows that carry a chosen share of the influence in the fewest steps, the
// paper's early+late rule on this run and the early phase alone, from /jobs/{id}/selection (docs/dashboard.md).
import { api } from "../api.js";
import { byId, onEach, valueOf } from "../dom.js";
import { exportButtons } from "../export.js";
import { html, render } from "../html.js";
import { latestOnPage } from "../latest.js";
import { table } from "../table.js";
import { controls } from "./controls.js";

const percent = (x) => `${(100 * x).toFixed(1)}%`;
const spans = (windows) => windows.map((w) => `${w.first}–${w.last}`).join(", ") || "none";

/** The section's controls: the API parameter each one sets, and its element id. */
const CHOICES = { share: "sel-share", windows: "sel-windows", measure: "sel-measure" };

/** The section's controls as [parameter, value] pairs: what the recommendation and its export are asked with. */
export const selectionChoices = () => Object.entries(CHOICES).map(([name, id]) => [name, valueOf(id)]);

/** The section's markup (its controls and empty boxes). */
export const selectionSection = () => html`<section id="selection">
  <h2>When to select data</h2>
  <div class="controls">
    <label>Share of influence <select id="sel-share">
      <option value="0.5">50%</option><option value="0.8">80%</option><option value="0.9" selected>90%</option>
      <option value="0.95">95%</option>
    </select></label>
    <label>At most <select id="sel-windows">
      <option>1</option><option selected>2</option><option>3</option><option>4</option>
    </select> window(s)</label>
    <label>Measure <select id="sel-measure">
      <option value="per_lr">|influence / lr| (paper)</option><option value="raw">|influence|</option>
    </select></label>
  </div>
  <p id="selection-text"></p>
  <div id="selection-table"></div>
  ${exportButtons("selection")}
  <p class="muted">Where the run's influence on the queries was concentrated: the steps in which choosing better data
    would have mattered most. A guide to timing selection, not a promise of its gain (see docs/dashboard.md).</p>
</section>`;

const COLUMNS = [
  { head: "selection", cell: (r) => r.name },
  { head: "steps", cell: (r) => spans(r.windows) },
  { head: "share of steps", cell: (r) => percent(r.share_of_steps), td: () => ({ class: "num" }) },
  { head: "share of influence", cell: (r) => percent(r.share_of_influence), td: () => ({ class: "num" }) },
];

/** Draws the recommendation for the current query set and the section's controls (the newest request's answer,
 * while the page is shown). */
export const showSelection = latestOnPage(async (current, jobId) => {
  const params = new URLSearchParams([["query_set", controls().querySet], ...selectionChoices()]);
  const found = await api(`/jobs/${jobId}/selection?${params}`);
  if (!current()) return; // the controls changed meanwhile: the newer answer is drawn
  byId("selection-text").textContent = found.recommendation;
  const rows = [
    { name: `fewest steps carrying ${percent(found.share)}`, ...found.fewest_steps },
    { name: "the paper's rule: early + late phases", ...found.early_late },
    { name: "early phase only", ...found.early_only },
  ];
  const note = found.resolution_steps > 1 ? `searched on bins of ${found.resolution_steps} steps` : "exact per step";
  render(
    byId("selection-table"),
    html`${table({ columns: COLUMNS, rows, attributes: { id: "selection-rows" } })}
      <p class="muted">${found.measure_label} · ${found.steps} steps · ${note}</p>`,
  );
});

/** Redraws the recommendation when one of the section's controls changes. */
export function bindSelection(current, jobId) {
  onEach(Object.values(CHOICES), "change", () => showSelection(current, jobId));
}
