// Markup from an escaping tagged template: html`<b>${value}</b>` escapes every interpolated value unless it is
// markup already (the result of html`` or raw()). Arrays are joined, and null, undefined and false render as "".

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const ATTRIBUTE_NAME = /^[a-z][a-z0-9-]*$/;

/** Markup that is safe to insert as it is. */
class SafeHtml {
  constructor(text) {
    this.text = text;
  }

  toString() {
    return this.text;
  }
}

/** Text with the HTML special characters escaped (null and undefined become ""). */
export const escape = (value) => String(value ?? "").replace(/[&<>"']/g, (c) => ESCAPES[c]);

/** Marks a string as trusted markup: only for text that comes from this code, never from the API or the user. */
export const raw = (text) => new SafeHtml(String(text));

function piece(value) {
  if (value instanceof SafeHtml) return value.text;
  if (Array.isArray(value)) return value.map(piece).join("");
  if (value === false) return "";
  return escape(value);
}

/** The tagged template: every interpolation is escaped, except markup made by html`` or raw(). */
export function html(strings, ...values) {
  return new SafeHtml(strings.reduce((out, text, i) => out + piece(values[i - 1]) + text));
}

/** Attributes from a {name: value} map; values are escaped, and null, undefined and false leave one out. */
export function attrs(map = {}) {
  const kept = Object.entries(map).filter(([, value]) => value !== null && value !== undefined && value !== false);
  for (const [name] of kept) {
    if (!ATTRIBUTE_NAME.test(name)) throw new TypeError(`not an attribute name: ${name}`);
  }
  return raw(kept.map(([name, value]) => ` ${name}="${escape(value)}"`).join(""));
}

/** Replaces an element's content; accepts only markup made by html`` or raw(). */
export function render(element, markup) {
  if (!(markup instanceof SafeHtml)) throw new TypeError("render() takes html`` markup");
  element.innerHTML = markup.text;
}
