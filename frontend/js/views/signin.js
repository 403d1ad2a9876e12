// The sign-in page: asks for an API token and keeps it for the browser session once the API accepts it.
import { tokenIsValid } from "../api.js";
import { byId } from "../dom.js";
import { html, render } from "../html.js";
import { state } from "../state.js";

const page = () => html`<section>
  <h1>Sign in</h1>
  <form id="signin">
    <label for="token">API token</label> <input id="token" type="password" autocomplete="off" size="50" required />
    <button type="submit">Sign in</button>
    <p class="muted">Create one with <code>dvemb token</code>; <code>dvemb serve</code> prints one.</p>
    <p id="signin-error" class="error" role="alert"></p>
  </form>
</section>`;

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
    state.token = candidate;
    location.hash = "#/runs";
    onSignedIn();
  });
  byId("token").focus();
}
