// The results' controls, read from the page: query set, query, view, smoothing, window of training and step range.
import { valueOf } from "../dom.js";

/** The current values of the results' controls (strings; "" when a filter is not set). */
export const controls = () => ({
  querySet: valueOf("qs"),
  query: valueOf("query"),
  view: valueOf("view-kind"),
  smooth: valueOf("smooth"),
  window: valueOf("window"),
  stepMin: valueOf("step-min"),
  stepMax: valueOf("step-max"),
});

/** Sets each [name, value] pair on params whose value is not "". */
export function setGiven(params, pairs) {
  for (const [name, value] of pairs) if (value !== "") params.set(name, value);
  return params;
}
