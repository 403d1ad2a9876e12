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
const PAGE_ROWS = 10;

/** A kind's sign: a helpful row has a positive score, a harmful row a negative one (the API's rule for the top rows;
 * the examples ranked by total are every example, in the kind's order, so their tables keep those of its sign). */
const OF_ITS_SIGN = { helpful: (v) => v > 0, harmful: (v) => v < 0 };
const SIGN_WORD = { helpful: "positive", harmful: "negative" };

/** The metadata of the rows' examples, by example id. */
async function metadataOf(jobId, rows) {
  if (!rows.length) return {};
  const ids = new URLSearchParams(rows.map((r) => ["id", r.example_id])); // id= once per example: any id, commas too
  return api(`/jobs/${jobId}/metadata?${ids}`);
}

/** The columns the ranking tables share: the example (a link to its page), what it is, its label. */
function exampleColumns(jobId, querySet, meta) {
  const href = (r) => `#/jobs/${jobId}/examples/${encodeURIComponent(r.example_id)}?qs=${encodeURIComponent(querySet)}`;
  // Long ids and texts are cut with an ellipsis (the whole of them in the tooltip, and on the example's page): the
  // step, epoch, phase and score columns stay in the table's box whatever the examples hold.
  return [
    {
      head: "example",
      cell: (r) => html`<a href="${href(r)}" title="${r.example_id}">${r.example_id}</a>`,
      th: { class: "col-example" },
      td: () => ({ class: "clip" }),
    },
    {
      head: "what it is",
      cell: (r) => describe(meta[r.example_id], r),
      th: { class: "col-what" },
      td: () => ({ class: "clip" }),
    },
    { head: "label", cell: (r) => r.label, th: { class: "col-label" }, td: (r) => ({ class: "clip", title: r.label }) },
  ];
}

const scoreColumn = (head, key) => ({
  head,
  cell: (r) => fmtScore(r[key]),
  th: { class: "col-score" },
  td: (r) => ({ class: "score", "data-score": r[key] }),
});

const plainColumn = (key) => ({ head: key, cell: (r) => r[key], th: { class: `col-${key}` } });

/** Said in place of a table with no row of its kind's sign. */
const noneOfItsSign = (kind) =>
  html`<p class="none" data-kind="${kind}">No ${kind} example here: no score is ${SIGN_WORD[kind]}.</p>`;

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
  const shown = rows.length
    ? table({ columns, rows, attributes: { class: `ranked ${cls}`, "data-kind": kind } })
    : noneOfItsSign(kind);
  render(container, html`${shown}${after}`);
  if (Object.values(meta).some((m) => m?.text)) container.closest(".cols")?.classList.add("stacked"); // a text run
  drawThumbs(container, meta);
}

/** One kind's page of the chosen window's own top rows, or of the whole run's top when window is null. */
function topOf(jobId, kind, window, page) {
  const c = controls();
  const offset = String(PAGE_ROWS * page);
  const params = setGiven(new URLSearchParams({ kind, limit: String(PAGE_ROWS), offset }), [["query", c.query]]);
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
    let tops = await Promise.all(KINDS.map((kind) => topOf(jobId, kind, window, state.page)));
    const last = lastPage(tops);
    if (state.page > last) {
      state.page = last; // a page past the end (an old link, fewer rows in this window): its last page instead
      tops = await Promise.all(KINDS.map((kind) => topOf(jobId, kind, window, last)));
    }
    if (!current()) return;
    showPaging(last);
    const count = tops[0].window?.occurrences; // a window's answer describes the window
    const where = count != null ? ` · ${count} occurrence(s) in the window` : "";
    await Promise.all(KINDS.map((kind, i) => showTopTable(jobId, kind, tops[i], scores, current)));
    if (current()) showChosen(`Rows: ${tops[0].chosen}${where}`); // said once its rows are shown
  } catch (err) {
    if (current()) showChosen(err.message, true);
  }
});

/** The last page (from 0) that holds a row of either table. */
const lastPage = (tops) => Math.max(0, Math.ceil(Math.max(...tops.map((t) => t.count)) / PAGE_ROWS) - 1);

/** "page 2 of 10", with "◀ previous" off on the first page and "next ▶" off on the last. */
function showPaging(last) {
  byId("prev").disabled = state.page <= 0;
  byId("next").disabled = state.page >= last;
  byId("next").dataset.last = String(last);
  byId("top-page").textContent = `page ${state.page + 1} of ${last + 1}`;
}

/** "rows 11–20 of 100", or nothing when there is none (the table's place says so). */
function rowsShown(top) {
  if (!top.data.length) return "";
  const first = top.data[0].rank + 1;
  return html`<p class="muted">rows ${first}–${first + top.data.length - 1} of ${top.count}</p>`;
}

async function showTopTable(jobId, kind, top, scores, current) {
  const lead = [{ head: "#", cell: (r) => r.rank + 1, th: { class: "col-rank" } }];
  const head = scoreHead("score", top.propagation || scores.propagation, top.approximations ?? scores.approximations);
  const score = scoreColumn(head, "score");
  const tail = [...["step", "epoch", "phase"].map(plainColumn), score];
  const after = rowsShown(top);
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
    const rows = ranked.data.filter((r) => OF_ITS_SIGN[kind](r.total)); // no example in both tables
    await showRanking(byId(`examples-${kind}`), jobId, { kind, cls: "examples", rows, tail, current });
  }
});
