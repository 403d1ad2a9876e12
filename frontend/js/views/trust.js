// How far to trust a job's scores: the approximations they carry beyond first order (docs/results.md,
// "Approximations"), as a box on the run's page and as a short marker next to every score column's header, with the
// list in its tooltip. A list of null means unknown: the job is not done, or its summary predates the list.
import { html } from "../html.js";

const NONE = "no approximations beyond first order";
const OLDER =
  "this analysis was computed before dvemb listed the approximations of its scores: run it again to see them";

/** The tooltip of a list: one "label: detail" per line. */
const tooltip = (list) => (list.length ? list.map((a) => `${a.label}: ${a.detail}`).join("\n") : NONE);

/** A short marker for a score column's header ("3 approximations"), the list in its tooltip; "" when unknown. */
export function approximationMarker(list) {
  if (list == null) return "";
  const text = list.length === 1 ? "1 approximation" : `${list.length || "no"} approximations`;
  const title = tooltip(list);
  return html` <span class="approx-marker" tabindex="0" title="${title}" data-count="${list.length}">${text}</span>`;
}

const item = (a) => html`<li data-kind="${a.kind}"><b>${a.label}</b><br /><span class="muted">${a.detail}</span></li>`;

const percent = (x) => (x == null ? "–" : `${Math.round(100 * x)}%`);
const decimal = (x) => (x == null ? "–" : x.toFixed(2));

/** One query set's agreement with an exact replay (dvemb trust's record), in words. */
function agreementItem([querySet, record]) {
  const all = record.all;
  const verdict = record.first_order_verdict;
  const phases = Object.entries(record.phases || {})
    .map(([name, p]) => `${name} ${decimal(p.spearman)}`)
    .join(", ");
  const warn = verdict && verdict !== "predictable";
  return html`<li data-query-set="${querySet}" class="${warn ? "replay-warning" : ""}">
    <b>Exact replay on ${querySet}: Spearman ${decimal(all.spearman)}</b> over ${all.occurrences} occurrences,
    top-${all.top_k} overlap ${percent(all.top_helpful_overlap)} helpful, ${percent(all.top_harmful_overlap)} harmful${
      phases ? html`; by phase ${phases}` : ""
    }.<br /><span class="muted">First order: ${verdict ?? "not probed"}${
      warn ? " — removing one occurrence does not move this run in proportion: read single scores with care" : ""
    }.</span>
  </li>`;
}

/** The run page's "How far to trust these scores" box: how far the scores agree with an exact replay of the run
 * where one was uploaded (dvemb trust; docs/replay.md), then the approximations, largest first. */
export function trustBox(list, agreements) {
  let body = html`<p class="muted">${OLDER}.</p>`;
  if (list?.length) body = html`<ul>${list.map(item)}</ul>`;
  else if (list) body = html`<p id="trust-none"><b>${NONE[0].toUpperCase()}${NONE.slice(1)}</b>.</p>`;
  const measured = Object.entries(agreements || {});
  const replay = measured.length
    ? html`<ul id="replay-agreement">${measured.map(agreementItem)}</ul>`
    : html`<p id="replay-none" class="muted">No exact replay of this run uploaded: <code>dvemb replay</code>, then
        <code>dvemb trust</code> and <code>dvemb upload-agreement</code>, measure how far these scores agree with
        the exact first-order influence (docs/replay.md).</p>`;
  return html`<section id="trust" class="card trust" aria-labelledby="trust-title">
    <h2 id="trust-title">How far to trust these scores</h2>
    ${replay}
    <p class="muted">Scores are first-order estimates of what removing one occurrence from its batch changes. What
      else they approximate, the largest loss against exact retraining first, and how to avoid it:</p>
    ${body}
  </section>`;
}
