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

/** The run page's "How far to trust these scores" box, largest approximation first. */
export function trustBox(list) {
  let body = html`<p class="muted">${OLDER}.</p>`;
  if (list?.length) body = html`<ul>${list.map(item)}</ul>`;
  else if (list) body = html`<p id="trust-none"><b>${NONE[0].toUpperCase()}${NONE.slice(1)}</b>.</p>`;
  return html`<section id="trust" class="card trust" aria-labelledby="trust-title">
    <h2 id="trust-title">How far to trust these scores</h2>
    <p class="muted">Scores are first-order estimates of what removing one occurrence from its batch changes. What
      else they approximate, the largest loss against exact retraining first, and how to avoid it:</p>
    ${body}
  </section>`;
}
