// The dashboard's one state object: the API token, the job poller, and the page of the results tables being shown
// (kept in the URL). The token lives for the browser session (sessionStorage), or, when the user chose to stay
// signed in, in this browser until they sign out (localStorage).
import { setViewParams } from "./url.js";

const TOKEN_KEY = "dvemb-token";
const RETURN_KEY = "dvemb-return-to";

let page = 0;

export const state = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY);
  },
  set token(value) {
    if (!value) {
      sessionStorage.removeItem(TOKEN_KEY);
      localStorage.removeItem(TOKEN_KEY);
    } else sessionStorage.setItem(TOKEN_KEY, value);
  },
  /** Keeps the token: in this browser (remember) or for this tab's session. */
  signIn(token, remember) {
    state.token = null;
    (remember ? localStorage : sessionStorage).setItem(TOKEN_KEY, token);
  },
  /** Where sign-in returns to: the link that asked for it (set when a request found the token refused). */
  get returnTo() {
    return sessionStorage.getItem(RETURN_KEY);
  },
  set returnTo(hash) {
    if (hash) sessionStorage.setItem(RETURN_KEY, hash);
    else sessionStorage.removeItem(RETURN_KEY);
  },
  /** The timer of the running job's next poll. */
  pollTimer: null,
  /** The timer of the run page's next look at its files' verdicts. */
  runTimer: null,
  /** The page of the "Top training examples" tables (10 rows each), kept in the URL as page=. */
  get page() {
    return page;
  },
  set page(value) {
    page = value;
    setViewParams({ page: value || "" });
  },
};
