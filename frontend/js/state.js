// The dashboard's one state object: the API token (kept for the browser session), the job poller, and the page
// of the results tables being shown.

const TOKEN_KEY = "dvemb-token";

export const state = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
  /** The timer of the running job's next poll. */
  pollTimer: null,
  /** The page of the "Top training examples" tables (10 rows each). */
  page: 0,
};
