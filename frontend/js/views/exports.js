// What the results' download buttons fetch: each table and curve of the page, at full resolution, with the
// controls' filters (docs/compare-and-export.md).
import { controls, setGiven } from "./controls.js";
import { shownSeries } from "./dynamics.js";
import { selectionChoices } from "./selection.js";
import { chosenWindow } from "./windows.js";

/** The API path of the export called name ("curve", "phases", "top-helpful", "examples-harmful", ...). */
export async function resultsExportPath(jobId, lastStep, name, format) {
  if (name === "dynamics")
    return `/jobs/${jobId}/export/dynamics?${new URLSearchParams({ series: shownSeries(), format })}`;
  const c = controls();
  const params = new URLSearchParams({ query_set: c.querySet, format });
  const [table, kind] = name.split("-");
  if (table === "curve")
    setGiven(params, [
      ["query", c.query],
      ["view", c.view],
      ["smooth", c.smooth],
    ]);
  if (table === "top") {
    const window = await chosenWindow(jobId, lastStep);
    setGiven(params, [
      ["kind", kind],
      ["query", c.query],
      ["window_id", window ? String(window.id) : ""],
    ]);
  }
  if (table === "examples") params.set("kind", kind);
  if (table === "selection") setGiven(params, selectionChoices());
  return `/jobs/${jobId}/export/${table}?${params}`;
}
