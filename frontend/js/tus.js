// A resumable upload client for tus 1.0 (creation + core), resumed by HEAD. The upload's URL is kept per
// (run, file) in localStorage, so a reload or a dropped connection resumes where it stopped.
import { API, authHeaders, errorOf } from "./api.js";

const CHUNK = 8 * 1024 * 1024;
const MAX_FAILURES = 5;

const tusHeaders = () => ({ ...authHeaders(), "Tus-Resumable": "1.0.0" });
const keyOf = (runId, file) => `dvemb-upload:${runId}:${file.name}:${file.size}:${file.lastModified}`;
const base64 = (text) => btoa(String.fromCharCode(...new TextEncoder().encode(text)));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Where the server stands on an upload: ok is false when it does not know the upload any more. */
async function headOffset(url) {
  const head = await fetch(url, { method: "HEAD", headers: tusHeaders() });
  return { ok: head.ok, offset: Number(head.headers.get("Upload-Offset")) };
}

/** Creates the upload of a file into a run and returns its URL. */
async function create(runId, file) {
  const meta = `filename ${base64(file.name)}`;
  const headers = { ...tusHeaders(), "Upload-Length": String(file.size), "Upload-Metadata": meta };
  const created = await fetch(`${API}/runs/${runId}/uploads`, { method: "POST", headers });
  if (!created.ok) throw await errorOf(created);
  return created.headers.get("Location");
}

/** The upload to go on with: the one kept for this file when the server still has it, else a new one. */
async function start(runId, file, key) {
  const kept = localStorage.getItem(key);
  const head = kept ? await headOffset(kept) : { ok: false };
  if (head.ok) return { url: kept, offset: head.offset };
  const url = await create(runId, file);
  localStorage.setItem(key, url);
  return { url, offset: 0 };
}

function patch(url, file, offset) {
  const headers = {
    ...tusHeaders(),
    "Upload-Offset": String(offset),
    "Content-Type": "application/offset+octet-stream",
  };
  return fetch(url, { method: "PATCH", headers, body: file.slice(offset, offset + CHUNK) });
}

/** The PATCH's response, or null after a network drop (waited out; the caller then asks where the server is). */
async function patchOrNull(url, file, offset, retry) {
  try {
    return await patch(url, file, offset);
  } catch (err) {
    if (++retry.failures > MAX_FAILURES) throw err;
    await sleep(1000 * retry.failures);
    return null;
  }
}

/** Sends the file from the upload's offset on, chunk by chunk, resuming after network drops. */
async function send(upload, file, key, onProgress) {
  let { offset } = upload;
  const retry = { failures: 0 };
  while (offset < file.size || file.size === 0) {
    const response = await patchOrNull(upload.url, file, offset, retry);
    if (!response) {
      offset = (await headOffset(upload.url)).offset;
      continue;
    }
    if (!response.ok) {
      localStorage.removeItem(key);
      throw await errorOf(response);
    }
    offset = Number(response.headers.get("Upload-Offset"));
    onProgress(offset);
    if (file.size === 0) break;
  }
}

/** Uploads a file into a run; onProgress(offset) follows each chunk the server accepted. */
export async function tusUpload(runId, file, onProgress) {
  const key = keyOf(runId, file);
  const upload = await start(runId, file, key);
  await send(upload, file, key, onProgress);
  localStorage.removeItem(key);
}
