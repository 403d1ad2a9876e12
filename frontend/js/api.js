// The REST API (/api/v1) with the session's bearer token. Failures are thrown as ApiError, which carries the
// API's error body {error, detail}; a 401 forgets the token and goes to the sign-in page, which returns to the
// page that asked.
import { state } from "./state.js";

export const API = "/api/v1";

export class ApiError extends Error {
  constructor(error, detail, status) {
    super(detail);
    this.error = error;
    this.detail = detail;
    this.status = status;
  }
}

export const authHeaders = (token = state.token) => ({ Authorization: `Bearer ${token}` });

/** The ApiError of a failed response, from its {error, detail} body when it has one. */
export async function errorOf(response) {
  const body = await response.json().catch(() => null);
  return new ApiError(body?.error ?? "http_error", body?.detail || response.statusText, response.status);
}

/** Fetches API + path with the token and returns the response; a failure is thrown (a 401 also forgets the token
 * and goes to sign-in). Every authenticated call goes through here, JSON or file alike. */
export async function request(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  const response = await fetch(API + path, { ...options, headers });
  if (response.status === 401) {
    state.token = null;
    if (!location.hash.startsWith("#/signin")) state.returnTo = location.hash; // sign-in comes back here
    location.hash = "#/signin";
    throw new ApiError("unauthorized", "unauthorized", 401);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** Fetches API + path with the token and returns the JSON body (null for 204). */
export async function api(path, options = {}) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json().catch(() => null);
}

/** POSTs a JSON body. */
export const postJson = (path, body) =>
  api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

/** Whether the API accepts this token (asked without touching the session's token). */
export async function tokenIsValid(token) {
  const response = await fetch(`${API}/runs?limit=1`, { headers: authHeaders(token) });
  return response.ok;
}
