// The view's state in the URL: the hash is the route and its query the view (#/runs/3?job=5&qs=val&page=1), so a
// link reopens the same view. Changes replace the history entry (no hashchange: the page is not drawn again).

/** The route part of the hash: "runs/3" of "#/runs/3?job=5". */
export const hashPath = () => location.hash.replace(/^#\/?/, "").split("?")[0];

/** The view's parameters (the hash's query). */
export const viewParams = () => new URLSearchParams(location.hash.split("?")[1] || "");

/** Sets (or, for "", null and undefined, removes) view parameters in the URL without drawing the page again. */
export function setViewParams(pairs) {
  const params = viewParams();
  for (const [name, value] of Object.entries(pairs)) {
    if (value === "" || value == null) params.delete(name);
    else params.set(name, String(value));
  }
  const query = params.toString();
  history.replaceState(history.state, "", `#/${hashPath()}${query ? `?${query}` : ""}`);
}

/** The results' controls and the URL parameter each is kept in. */
const CONTROL_PARAMS = {
  qs: "qs",
  query: "query",
  "view-kind": "view",
  smooth: "smooth",
  window: "window",
  "step-min": "from",
  "step-max": "to",
};

/** Sets the given controls (element ids) from the URL, where it names a value the control offers. */
export function restoreControls(ids) {
  const params = viewParams();
  for (const id of ids) {
    const element = document.getElementById(id);
    const value = params.get(CONTROL_PARAMS[id]);
    if (!element || value == null) continue;
    const offered = element.tagName !== "SELECT" || [...element.options].some((o) => o.value === value);
    if (offered) element.value = value;
  }
}

/** Keeps the controls inside container in the URL as they change. */
export function keepControlsInUrl(container) {
  container.addEventListener("change", () => {
    const pairs = {};
    for (const [id, name] of Object.entries(CONTROL_PARAMS)) {
      const element = document.getElementById(id);
      if (element) pairs[name] = element.value;
    }
    setViewParams(pairs);
  });
}
