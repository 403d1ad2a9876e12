// The results' four ranking tables: the top training examples (helpful and harmful; filtered and paged) and the
// examples by total influence (helpful and harmful), all drawn by the one table renderer.
import { api } from "../api.js";
import { byId } from "../dom.js";
import { fmtScore } from "../format.js";
import { html, render } from "../html.js";
import { latestOnPage } from "../latest.js";
import { state } from "../state.js";
import { table } from "../table.js";
import { describe, drawThumbs } from "../thumbs.js";
import { controls, setGiven } from "./controls.js";
import { approximationMarker } from "./trust.js";
import { chosenWindow } from "./windows.js";

const KINDS = ["helpful", "harmful"];

/** The metadata of the rows' examples, by example id. */
async function metadataOf(jobId, rows) {
  if (!rows.length) return {};
  const ids = new URLSearchParams(rows.map((r) => ["id", r.example_id])); // id= once per example: any id, commas too
  return api(`/jobs/${jobId}/metadata?${ids}`);
}

/** The columns the ranking tables share: the example (a link to its page), what it is, its label. */
function exampleColumns(jobId, querySet, meta) {
  const href = (r) => `#/jobs/${jobId}/examples/${encodeURIComponent(r.example_id)}?qs=${encodeURIComponent(querySet)}`;
  return [
    { head: "example", cell: (r) => html`<a href="${href(r)}">${r.example_id}</a>` },
    { head: "what it is", cell: (r) => describe(meta[r.example_id], r) },
    { head: "label", cell: (r) => r.label },
  ];
}

const scoreColumn = (head, key) => ({
  head,
  cell: (r) => fmtScore(r[key]),
  td: (r) => ({ class: "score", "data-score": r[key] }),
});

const plainColumn = (key) => ({ head: key, cell: (r) => r[key] });

/** A score column's header: what it is, how the scores follow the optimizer and how many approximations they carry
 * (the list in the marker's tooltip). */
const scoreHead = (what, propagation, approximations) =>
  html`${what} (${propagation})${approximationMarker(approximations)}`;

/** Renders a ranking table (and what follows it) into its container and draws its examples' images; its columns
 * are lead, the shared example columns, then tail. */
async function showRanking(container, jobId, { kind, cls, rows, lead = [], tail, after = "", current }) {
  const meta = await metadataOf(jobId, rows);
  if (!current()) return; // a newer request was made while the examples' metadata was fetched
  const columns = [...lead, ...exampleColumns(jobId, controls().querySet, meta), ...tail];
  render(container, html`${table({ columns, rows, attributes: { class: cls, "data-kind": kind } })}${after}`);
  drawThumbs(container, meta);
}

/** One kind's page of the chosen window's own top rows, or of the whole run's top when window is null. */
function topOf(jobId, kind, window) {
  const c = controls();
  const params = setGiven(new URLSearchParams({ kind, limit: "10", offset: String(10 * state.page) }), [
    ["query", c.query],
  ]);
  if (window) return api(`/jobs/${jobId}/windows/${window.id}/top?${params}`);
  params.set("query_set", c.querySet);
  return api(`/jobs/${jobId}/top?${params}`);
}

/** Says how the rows were chosen ("top 100 of steps 0–99 (early phase), exact"), or what went wrong. */
function showChosen(text, failed = false) {
  const box = byId("top-chosen");
  box.className = failed ? "error" : "muted";
  box.setAttribute("role", failed ? "alert" : "status");
  box.textContent = text;
}

/** The "Top training examples" tables, for the current controls and page; a newer call wins over a slower older one,
 * and nothing is drawn once the page was left. scores: {propagation, approximations} of the job. */
export const showTop = latestOnPage(async (current, jobId, scores, lastStep) => {
  showChosen("…");
  try {
    const window = await chosenWindow(jobId, lastStep);
    const tops = await Promise.all(KINDS.map((kind) => topOf(jobId, kind, window)));
    if (!current()) return;
    const count = tops[0].window?.occurrences; // a window's answer describes the window
    const where = count != null ? ` · ${count} occurrence(s) in the window` : "";
    await Promise.all(KINDS.map((kind, i) => showTopTable(jobId, kind, tops[i], scores, current)));
    if (current()) showChosen(`Rows: ${tops[0].chosen}${where}`); // said once its rows are shown
  } catch (err) {
    if (current()) showChosen(err.message, true);
  }
});

async function showTopTable(jobId, kind, top, scores, current) {
  const lead = [{ head: "#", cell: (r) => r.rank + 1 }];
  const head = scoreHead("score", top.propagation || scores.propagation, top.approximations ?? scores.approximations);
  const score = scoreColumn(head, "score");
  const tail = [...["step", "epoch", "phase"].map(plainColumn), score];
  const after = html`<p class="muted">${top.count} row(s)</p>`;
  await showRanking(byId(`top-${kind}`), jobId, { kind, cls: "top", rows: top.data, lead, tail, after, current });
}

/** The "Examples by total influence" tables, for the current query set; a newer call wins over a slower older one,
 * and nothing is drawn once the page was left. scores: {propagation, approximations} of the job. */
export const showExamples = latestOnPage(async (current, jobId, scores) => {
  for (const kind of KINDS) {
    const querySet = encodeURIComponent(controls().querySet);
    const ranked = await api(`/jobs/${jobId}/examples?query_set=${querySet}&kind=${kind}&limit=10`);
    if (!current()) return;
    const head = scoreHead("total", scores.propagation, scores.approximations);
    const tail = [plainColumn("occurrences"), scoreColumn(head, "total")];
    await showRanking(byId(`examples-${kind}`), jobId, { kind, cls: "examples", rows: ranked.data, tail, current });
  }
});
