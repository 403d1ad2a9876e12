// dvemb dashboard: native ES modules, no build step. It talks to the REST API only (/api/v1), with the token kept
// for the browser session (or in this browser). The hash is the route and its query the view, so every view has a
// link: #/runs, #/runs/{id}?job=...&qs=...&page=..., #/jobs/{id}/examples/{example}?qs=..., #/compare?jobs=...
import { ApiError } from "./api.js";
import { byId } from "./dom.js";
import { html, render } from "./html.js";
import { latestOnly } from "./latest.js";
import { state } from "./state.js";
import { hashPath } from "./url.js";
import { renderCompare } from "./views/compare.js";
import { renderExample } from "./views/example.js";
import { renderRun } from "./views/run.js";
import { renderRuns } from "./views/runs.js";
import { renderSignIn } from "./views/signin.js";

const view = byId("view");

/** Draws the page of the route parts; each page checks current() after each await and draws nothing once another
 * route was asked for (a page left while it loads must not be drawn over the page followed). */
function renderPage(current, parts) {
  if (parts[0] === "runs" && parts[1]) return renderRun(current, view, Number(parts[1]));
  if (parts[0] === "jobs" && parts[2] === "examples") {
    return renderExample(current, view, Number(parts[1]), decodeURIComponent(parts[3]));
  }
  if (parts[0] === "compare") return renderCompare(current, view);
  return renderRuns(current, view);
}

/** Shows the page of the current hash (the sign-in page without a token, which then returns to this very link);
 * errors are shown in its place, unless another page was asked for meanwhile (a late error of a page that was left
 * must not replace the page now shown). */
const route = latestOnly(async (current) => {
  clearTimeout(state.pollTimer);
  clearTimeout(state.runTimer);
  byId("signout").hidden = !state.token;
  if (!state.token) {
    if (!location.hash.startsWith("#/signin") && hashPath()) state.returnTo = location.hash;
    return renderSignIn(view, route);
  }
  try {
    return await renderPage(current, hashPath().split("/"));
  } catch (err) {
    const signedOut = err instanceof ApiError && err.status === 401;
    if (!signedOut && current()) render(view, html`<p class="error" role="alert">${err.message}</p>`);
  }
});

window.addEventListener("hashchange", route);
byId("signout").addEventListener("click", () => {
  state.token = null;
  state.returnTo = null;
  if (location.hash === "#/signin") route();
  else location.hash = "#/signin"; // the hashchange draws it
});
route();
