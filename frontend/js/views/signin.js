// The sign-in page: asks for an API token, keeps it once the API accepts it (for this browser session, or in this
// browser when "stay signed in" is ticked) and returns to the link that asked for sign-in.
import { tokenIsValid } from "../api.js";
import { byId } from "../dom.js";
import { html, render } from "../html.js";
import { state } from "../state.js";

const page = () => html`<section>
  <h1>Sign in</h1>
  <form id="signin">
    <label for="token">API token</label> <input id="token" type="password" autocomplete="off" size="50" required />
    <button type="submit">Sign in</button>
    <p><label><input id="remember" type="checkbox" /> Stay signed in on this browser</label>
      <span class="muted">(otherwise the token is forgotten when this tab closes)</span></p>
    <p class="muted">Create one with <code>dvemb token</code>; <code>dvemb serve</code> prints one.</p>
    <p id="signin-error" class="error" role="alert"></p>
  </form>
</section>`;

/** The page to show once signed in: the link that asked for sign-in, else the runs. */
function destination() {
  const asked = state.returnTo || location.hash;
  state.returnTo = null;
  return asked && !asked.startsWith("#/signin") && asked !== "#" ? asked : "#/runs";
}

/** Shows the sign-in form in view; onSignedIn() runs once a valid token is kept. */
export function renderSignIn(view, onSignedIn) {
  render(view, page());
  byId("signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    const candidate = byId("token").value.trim();
    if (!(await tokenIsValid(candidate))) {
      byId("signin-error").textContent = "This token is not valid.";
      return;
    }
    state.signIn(candidate, byId("remember").checked);
    const target = destination();
    if (location.hash === target) onSignedIn();
    else location.hash = target; // the hashchange draws it
  });
  byId("token").focus();
}
