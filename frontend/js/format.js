// Number formats.
import { html } from "./html.js";

/** A score in scientific notation, green when it helped and red when it hurt. */
export const fmtScore = (v) => html`<span class="${v >= 0 ? "score-pos" : "score-neg"}">${v.toExponential(3)}</span>`;

export function fmtBytes(n) {
  if (n > 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n > 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  return `${(n / 1e3).toFixed(1)} kB`;
}
