// Windows of training whose top examples are ranked on their own (docs/dashboard.md): the picker's options (each
// phase, tenth of training and epoch, stored with the job) and the window the controls ask for, a step range being
// computed on demand by a worker when it is not stored or cached yet.
import { ApiError, api, postJson } from "../api.js";
import { byId } from "../dom.js";
import { html, render } from "../html.js";
import { latestOnPage } from "../latest.js";
import { controls } from "./controls.js";
import { QueryStatus } from "../statuses.js";

const GROUPS = [
  ["phase", "Phase"],
  ["tenth", "Tenth of training"],
  ["epoch", "Epoch"],
];

const label = (w) => (w.kind === "epoch" ? w.name : `${w.name} (steps ${w.step_min}–${w.step_max})`);

/** Fills the window picker with the stored windows of the current query set; when the query set changes again
 * before the answer arrives (or the page is left), only the newest request's windows are offered. */
export const fillWindows = latestOnPage(async (current, jobId) => {
  const querySet = encodeURIComponent(controls().querySet);
  const windows = (await api(`/jobs/${jobId}/windows?query_set=${querySet}`)).data;
  if (!current()) return;
  const group = ([kind, head]) => {
    const option = (w) => html`<option value="${w.id}">${label(w)}</option>`;
    const options = windows.filter((w) => w.kind === kind).map(option);
    return options.length ? html`<optgroup label="${head}">${options}</optgroup>` : "";
  };
  render(
    byId("window"),
    html`<option value="">whole run (overall top)</option>${GROUPS.map(group)}
      <option value="steps">steps (from – to), on demand</option>`,
  );
});

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The window the controls ask for: null for the whole run, {id} for a stored one, or a step range's window, asked
 * for (and waited for while a worker ranks it). */
export async function chosenWindow(jobId, lastStep) {
  const c = controls();
  if (c.window === "") return null;
  if (c.window !== "steps") return { id: c.window };
  const body = {
    query_set: c.querySet,
    step_min: Number(c.stepMin || 0),
    step_max: Number(c.stepMax === "" ? lastStep : c.stepMax),
    wait_seconds: 10,
  };
  let window = await postJson(`/jobs/${jobId}/windows`, body);
  while (window.status === QueryStatus.QUEUED) {
    await sleep(500);
    window = await api(`/jobs/${jobId}/windows/${window.id}`);
  }
  if (window.status === QueryStatus.FAILED) throw new ApiError("window_failed", window.error, 409);
  return window;
}
