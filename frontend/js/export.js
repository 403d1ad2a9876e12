// Downloads of what a table or curve shows (CSV or Parquet), from the API's export endpoints with the page's
// filters: the request carries the token, so the file is fetched and then saved from a blob.
import { request } from "./api.js";
import { html } from "./html.js";

/** A "Download CSV · Parquet" pair of buttons; what they fetch is named by data-export (see bindExports). */
export const exportButtons = (name, label = "Download") =>
  html`<span class="export" data-export="${name}">${label}
    <button type="button" data-format="csv">CSV</button><button type="button" data-format="parquet">Parquet</button>
  </span>`;

/** The file's name from Content-Disposition: the exact UTF-8 name (filename*=UTF-8''...) when given, else the
 * ASCII fallback (filename="..."). */
function filenameOf(response, fallback) {
  const header = response.headers.get("Content-Disposition") || "";
  const exact = /filename\*=UTF-8''([^;\s]+)/i.exec(header);
  if (exact) {
    try {
      return decodeURIComponent(exact[1]);
    } catch {
      // a malformed encoding: the ASCII name below
    }
  }
  const match = /filename="([^"]+)"/.exec(header);
  return match ? match[1] : fallback;
}

/** Fetches API + path and saves the body as a file (an expired token leads to sign-in, as for any other call). */
export async function download(path) {
  const response = await request(path);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = filenameOf(response, "export");
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** Wires the export buttons inside container: pathOf(name, format) is the API path (with the page's filters) of
 * the export named by the buttons' data-export; a failure is shown next to the buttons. */
export function bindExports(container, pathOf) {
  container.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-format]");
    const box = button?.closest("[data-export]");
    if (!box) return;
    box.querySelector(".error")?.remove();
    try {
      await download(await pathOf(box.dataset.export, button.dataset.format));
    } catch (err) {
      const problem = document.createElement("span");
      problem.className = "error";
      problem.setAttribute("role", "alert");
      problem.textContent = ` ${err.message}`;
      box.append(problem);
    }
  });
}
