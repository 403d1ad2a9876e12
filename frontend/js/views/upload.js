// Uploading a log's files into a run, with the progress bar, the speed and each file's verdict.
import { byId } from "../dom.js";
import { fmtBytes } from "../format.js";
import { html, render } from "../html.js";
import { tusUpload } from "../tus.js";

// Manifests and shard indexes (shards.jsonl, shards.rankR.jsonl) go first: each data file is then judged as it
// arrives instead of waiting for them (files waiting count toward the project's quota of pending files).
const isManifest = (file) => (file.name.startsWith("manifest") || file.name.startsWith("shards.") ? 1 : 0);

const fileItem = (file, i) => {
  const size = html`<span class="muted">${fmtBytes(file.size)}</span>`;
  return html`<li id="file-${i}">${file.name} ${size} <span class="verdict"></span></li>`;
};

/** Bytes to send before the speed is measured well enough to estimate the time left: the small files that go
 * first (manifests, shard indexes) cost a request each, and a speed measured on them made the first ETA absurd
 * ("ETA 1705 s" for 26 MB sent in seconds). */
const MEASURED_BYTES = 4 * 1024 * 1024;

/** The upload's progress in words: the share and bytes sent; the speed and ETA once enough bytes were sent (a
 * quarter of the upload when it is small) over at least a second. */
export function uploadText(total, sent, seconds) {
  const pct = `${((100 * sent) / total).toFixed(0)}%`;
  if (sent < Math.min(MEASURED_BYTES, total / 4) || seconds < 1) {
    return `${pct} · ${fmtBytes(sent)} of ${fmtBytes(total)}`;
  }
  const speed = sent / seconds;
  return `${pct} · ${fmtBytes(speed)}/s · ETA ${Math.round((total - sent) / speed)} s`;
}

function showProgress(progress, sent) {
  const seconds = (performance.now() - progress.started) / 1000;
  progress.bar.style.width = `${((100 * sent) / progress.total).toFixed(1)}%`;
  progress.status.textContent = uploadText(progress.total, sent, seconds);
}

/** Uploads one file; false when it failed (its verdict then says why). */
async function uploadOne(runId, file, verdict, onProgress) {
  try {
    await tusUpload(runId, file, onProgress);
    verdict.textContent = "uploaded";
    return true;
  } catch (err) {
    render(verdict, html`<span class="error" role="alert">${err.message}</span>`);
    return false;
  }
}

function showFinished(progress, failed) {
  progress.bar.style.width = "100%";
  progress.bar.parentElement.setAttribute("aria-valuenow", "100");
  if (!failed) progress.status.textContent = "100% · upload finished; validating";
  else {
    progress.status.className = "error";
    progress.status.setAttribute("role", "alert");
    progress.status.textContent = `${failed} file(s) were refused: see why below, fix them and upload them again.`;
  }
}

/** Data files sent at once, as `dvemb upload` does: each file's last request waits for the validator's verdict, so
 * one file at a time left the connection idle while the validator worked (an 80-shard log: 14.3 s one by one, 6.4 s
 * four at a time with the CLI). */
export const PARALLEL_UPLOADS = 4;

/** Runs work(item) for every item, at most `limit` at a time, in the items' order; resolves when all have ended.
 * When work throws, no further item is started and the error is raised once the others have ended. */
export async function inParallel(items, limit, work) {
  let next = 0;
  const lane = async () => {
    while (next < items.length) {
      const item = items[next];
      next += 1;
      try {
        await work(item);
      } catch (err) {
        next = items.length;
        throw err;
      }
    }
  };
  const lanes = await Promise.allSettled(Array.from({ length: Math.min(limit, items.length) }, lane));
  const failed = lanes.find((settled) => settled.status === "rejected");
  if (failed) throw failed.reason;
}

/** Uploads the files into the run: manifests and shard indexes first, one after the other (each data file is then
 * judged as it arrives), then the data files PARALLEL_UPLOADS at a time. A refused file does not stop the others.
 * When every file went up, onDone() runs half a second later (the page is drawn again); when one was refused, the
 * page stays as it is, so that the reasons stay in view. */
export async function uploadFiles(runId, files, onDone) {
  const progress = {
    total: files.reduce((sum, f) => sum + f.size, 0),
    bar: document.querySelector("#upload-progress > div"),
    status: byId("upload-status"),
    started: performance.now(),
  };
  files.sort((a, b) => isManifest(b) - isManifest(a));
  render(byId("upload-files"), html`${files.map(fileItem)}`);
  const sentOf = files.map(() => 0); // bytes of each file sent so far
  let sent = 0;
  let failed = 0;
  const upload = async (i) => {
    const verdict = document.querySelector(`#file-${i} .verdict`);
    const onProgress = (offset) => {
      sent += offset - sentOf[i];
      sentOf[i] = offset;
      showProgress(progress, sent);
    };
    if (!(await uploadOne(runId, files[i], verdict, onProgress))) failed += 1;
    onProgress(files[i].size);
  };
  const indexes = files.map((_, i) => i);
  const first = indexes.filter((i) => isManifest(files[i]));
  await inParallel(first, 1, upload);
  await inParallel(
    indexes.filter((i) => !isManifest(files[i])),
    PARALLEL_UPLOADS,
    upload,
  );
  showFinished(progress, failed);
  if (!failed) setTimeout(onDone, 500);
}
