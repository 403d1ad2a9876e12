// dvemb dashboard: plain JS, talks to the REST API only (/api/v1), with the token kept for the browser session.
"use strict";
const API = "/api/v1";
const view = document.getElementById("view");
const token = () => sessionStorage.getItem("dvemb-token");

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${token()}`, ...(options.headers || {}) };
  const response = await fetch(API + path, { ...options, headers });
  if (response.status === 401) { sessionStorage.removeItem("dvemb-token"); location.hash = "#/signin"; throw new Error("unauthorized"); }
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new Error((body && body.detail) || response.statusText);
  return body;
}
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const fmtScore = (v) => `<span class="${v >= 0 ? "score-pos" : "score-neg"}">${v.toExponential(3)}</span>`;
const fmtBytes = (n) => n > 1e9 ? `${(n / 1e9).toFixed(2)} GB` : n > 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(1)} kB`;

// -- routing ------------------------------------------------------------------------------------------
async function route() {
  document.getElementById("signout").hidden = !token();
  if (!token()) return renderSignIn();
  const parts = location.hash.replace(/^#\/?/, "").split("?")[0].split("/");
  try {
    if (parts[0] === "runs" && parts[1]) return await renderRun(Number(parts[1]));
    if (parts[0] === "jobs" && parts[2] === "examples") return await renderExample(Number(parts[1]), decodeURIComponent(parts[3]));
    return await renderRuns();
  } catch (err) { if (err.message !== "unauthorized") view.innerHTML = `<p class="error" role="alert">${esc(err.message)}</p>`; }
}
window.addEventListener("hashchange", route);
document.getElementById("signout").addEventListener("click", () => { sessionStorage.removeItem("dvemb-token"); location.hash = "#/signin"; route(); });

// -- sign in --------------------------------------------------------------------------------------------
function renderSignIn() {
  view.innerHTML = `<section><h1>Sign in</h1><form id="signin">
    <label for="token">API token</label> <input id="token" type="password" autocomplete="off" size="50" required>
    <button type="submit">Sign in</button> <p class="muted">Create one with <code>dvemb token</code>; <code>dvemb serve</code> prints one.</p>
    <p id="signin-error" class="error" role="alert"></p></form></section>`;
  document.getElementById("signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    const candidate = document.getElementById("token").value.trim();
    const response = await fetch(`${API}/runs?limit=1`, { headers: { Authorization: `Bearer ${candidate}` } });
    if (!response.ok) { document.getElementById("signin-error").textContent = "This token is not valid."; return; }
    sessionStorage.setItem("dvemb-token", candidate);
    location.hash = "#/runs"; route();
  });
  document.getElementById("token").focus();
}

// -- runs -----------------------------------------------------------------------------------------------
async function renderRuns(search = "") {
  const runs = await api(`/runs?limit=200&search=${encodeURIComponent(search)}`);
  view.innerHTML = `<h1>Runs</h1><section><div class="controls">
      <label>Search <input id="search" value="${esc(search)}"></label>
      <form id="create"><label>New run <input id="new-name" required pattern="[A-Za-z0-9][A-Za-z0-9_. -]*"></label> <button>Create</button></form>
      <span id="create-error" class="error" role="alert"></span></div>
    <table id="runs"><thead><tr><th>name</th><th>status</th><th>size</th><th>steps</th><th>examples</th><th>created</th></tr></thead><tbody>
    ${runs.data.map((r) => `<tr><td><a href="#/runs/${r.id}">${esc(r.name)}</a></td><td>${esc(r.status)}</td><td>${fmtBytes(r.size_bytes)}</td>
      <td>${r.num_steps ?? ""}</td><td>${r.num_examples ?? ""}</td><td>${new Date(r.created_at).toLocaleString()}</td></tr>`).join("")}
    </tbody></table><p class="muted">${runs.count} run(s)</p></section>`;
  document.getElementById("search").addEventListener("change", (e) => renderRuns(e.target.value));
  document.getElementById("create").addEventListener("submit", async (event) => {
    event.preventDefault();
    try { const run = await api("/runs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name: document.getElementById("new-name").value }) }); location.hash = `#/runs/${run.id}`; }
    catch (err) { document.getElementById("create-error").textContent = err.message; }
  });
}

// -- tus upload (1.0: creation + core), resumable by HEAD ------------------------------------------------
// The upload's URL is kept per (run, file) so a reload or a dropped connection resumes where it stopped.
async function tusUpload(runId, file, onProgress) {
  const tus = { Authorization: `Bearer ${token()}`, "Tus-Resumable": "1.0.0" };
  const key = `dvemb-upload:${runId}:${file.name}:${file.size}:${file.lastModified}`;
  let location = localStorage.getItem(key), offset = 0;
  if (location) {
    const head = await fetch(location, { method: "HEAD", headers: tus });
    if (head.ok) offset = Number(head.headers.get("Upload-Offset")); else location = null;
  }
  if (!location) {
    const meta = `filename ${btoa(unescape(encodeURIComponent(file.name)))}`;
    const created = await fetch(`${API}/runs/${runId}/uploads`, { method: "POST", headers: { ...tus, "Upload-Length": String(file.size), "Upload-Metadata": meta } });
    if (!created.ok) throw new Error((await created.json()).detail);
    location = created.headers.get("Location");
    localStorage.setItem(key, location);
  }
  const chunk = 8 * 1024 * 1024;
  let failures = 0;
  while (offset < file.size || file.size === 0) {
    let response;
    try {
      response = await fetch(location, { method: "PATCH", headers: { ...tus, "Upload-Offset": String(offset), "Content-Type": "application/offset+octet-stream" }, body: file.slice(offset, offset + chunk) });
    } catch (err) {  // network drop: ask the server where it stands and go on from there
      if (++failures > 5) throw err;
      await new Promise((r) => setTimeout(r, 1000 * failures));
      const head = await fetch(location, { method: "HEAD", headers: tus });
      offset = Number(head.headers.get("Upload-Offset"));
      continue;
    }
    if (!response.ok) { localStorage.removeItem(key); throw new Error((await response.json()).detail); }
    offset = Number(response.headers.get("Upload-Offset"));
    onProgress(offset);
    if (file.size === 0) break;
  }
  localStorage.removeItem(key);
}

async function uploadFiles(runId, files) {
  const total = files.reduce((s, f) => s + f.size, 0);
  const list = document.getElementById("upload-files");
  const bar = document.querySelector("#upload-progress > div");
  const status = document.getElementById("upload-status");
  const started = performance.now();
  let done = 0;
  // manifests first: each data file is then judged as it arrives
  files.sort((a, b) => (b.name.startsWith("manifest") ? 1 : 0) - (a.name.startsWith("manifest") ? 1 : 0));
  list.innerHTML = files.map((f, i) => `<li id="file-${i}">${esc(f.name)} <span class="muted">${fmtBytes(f.size)}</span> <span class="verdict"></span></li>`).join("");
  for (const [i, file] of files.entries()) {
    const verdict = document.querySelector(`#file-${i} .verdict`);
    try {
      await tusUpload(runId, file, (offset) => {
        const sent = done + offset, seconds = (performance.now() - started) / 1000, speed = sent / Math.max(seconds, 1e-3);
        bar.style.width = `${(100 * sent / total).toFixed(1)}%`;
        status.textContent = `${(100 * sent / total).toFixed(0)}% · ${fmtBytes(speed)}/s · ETA ${Math.round((total - sent) / Math.max(speed, 1))} s`;
      });
      verdict.textContent = "uploaded";
    } catch (err) { verdict.innerHTML = `<span class="error">${esc(err.message)}</span>`; }
    done += file.size;
  }
  bar.style.width = "100%";
  status.textContent = "100% · upload finished; validating";
  bar.parentElement.setAttribute("aria-valuenow", "100");
  setTimeout(() => renderRun(runId), 500);
}

// -- run page -------------------------------------------------------------------------------------------
let pollTimer = null;
async function renderRun(runId) {
  clearTimeout(pollTimer);
  const run = await api(`/runs/${runId}`);
  const jobs = await api(`/runs/${runId}/jobs`);
  const job = jobs[0];
  view.innerHTML = `<h1>${esc(run.name)} <span class="muted">(${esc(run.status)})</span></h1>
    <section><h2>Upload a gradient log</h2>
      <div id="dropzone" class="dropzone" tabindex="0">Drop the log's files here, or <label>pick files <input id="file-input" type="file" multiple></label>
        or <label>a directory <input id="dir-input" type="file" webkitdirectory></label></div>
      <div id="upload-progress" class="bar" role="progressbar" aria-label="upload progress" aria-valuemin="0" aria-valuemax="100"><div></div></div>
      <p id="upload-status" class="muted"></p><ul id="upload-files"></ul>
      <table><thead><tr><th>file</th><th>status</th><th>problem</th></tr></thead><tbody>${run.files.map((f) => `<tr><td>${esc(f.name)}</td><td>${esc(f.status)}</td><td class="error">${esc(f.error)}</td></tr>`).join("")}</tbody></table>
      ${run.missing_files.length ? `<p class="muted">missing: ${run.missing_files.slice(0, 8).map(esc).join(", ")}${run.missing_files.length > 8 ? "…" : ""}</p>` : ""}
      ${run.status === "ready" ? `<button id="analyze">Start analysis</button>` : ""}
    </section>
    <section id="job"></section><div id="results"></div>`;
  const take = (files) => uploadFiles(runId, [...files]);
  document.getElementById("file-input").addEventListener("change", (e) => take(e.target.files));
  document.getElementById("dir-input").addEventListener("change", (e) => take(e.target.files));
  const zone = document.getElementById("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); take(e.dataTransfer.files); });
  const analyze = document.getElementById("analyze");
  if (analyze) analyze.addEventListener("click", async () => { await api(`/runs/${runId}/jobs`, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" }); renderRun(runId); });
  if (job) showJob(runId, job);
}

async function showJob(runId, job) {
  const box = document.getElementById("job");
  if (!box) return;
  const pct = Math.round(100 * job.progress);
  box.innerHTML = `<h2>Analysis ${job.id}: <span id="job-status">${esc(job.status)}</span></h2>
    <div class="bar" role="progressbar" aria-label="analysis progress" aria-valuenow="${pct}" aria-valuemin="0" aria-valuemax="100"><div style="width:${pct}%"></div></div>
    <p class="muted">${pct}%${job.current_step != null ? ` · step ${job.current_step}` : ""}${job.eta_seconds ? ` · ETA ${Math.round(job.eta_seconds)} s` : ""}</p>
    ${job.error ? `<p class="error" role="alert">${esc(job.error)}</p>` : ""}`;
  if (job.status === "queued" || job.status === "running") {
    pollTimer = setTimeout(async () => showJob(runId, await api(`/jobs/${job.id}`)), 1000);
  } else if (job.status === "succeeded") {
    await showResults(job);
  }
}

async function showResults(job) {
  const summary = await api(`/jobs/${job.id}/summary`);
  const sets = Object.keys(summary.query_sets);
  const propagation = summary.propagation_label || "exact SGD";
  const results = document.getElementById("results");
  results.innerHTML = `<section><h2>Influence across training</h2><div class="controls">
      <label>Query set <select id="qs">${sets.map((s) => `<option>${esc(s)}</option>`).join("")}</select></label>
      <label>Query <select id="query"></select></label>
      <label>View <select id="view-kind"><option value="per_lr">per learning rate (paper)</option><option value="raw">raw</option></select></label>
      <label>Smoothing <select id="smooth"><option value="1">none</option><option value="5">5</option><option value="21" selected>21</option><option value="51">51</option></select></label>
    </div><p id="propagation">Scores follow the optimizer as <b>${esc(propagation)}</b>.</p>${summary.note ? `<p class="muted">${esc(summary.note)}</p>` : ""}<div id="phase-plot" style="height:420px"></div><p id="phase-summary" class="muted"></p></section>
    <section><h2>Top training examples</h2><div class="controls">
      <label>Phase <select id="phase"><option value="">all</option><option>early</option><option>basin</option><option>late</option></select></label>
      <label>Steps <input id="step-min" type="number" min="0" size="6" placeholder="from"> – <input id="step-max" type="number" min="0" size="6" placeholder="to"></label>
      <button id="prev">◀ previous</button><button id="next">next ▶</button></div>
      <div class="cols"><div><h2>Helpful</h2><div id="top-helpful"></div></div><div><h2>Harmful</h2><div id="top-harmful"></div></div></div></section>
    <section><h2>Examples by total influence (all their occurrences)</h2>
      <div class="cols"><div><h2>Most helpful</h2><div id="examples-helpful"></div></div><div><h2>Most harmful</h2><div id="examples-harmful"></div></div></div></section>
    <section><h2>Scores by phase</h2><div id="distribution" style="height:320px"></div></section>`;
  let page = 0;
  const qs = () => document.getElementById("qs").value;
  const fillQueries = () => {
    const info = summary.query_sets[qs()];
    document.getElementById("query").innerHTML = `<option value="">whole set</option>` + info.query_ids.map((id, i) => `<option value="${i}">${esc(id)}</option>`).join("");
  };
  const draw = async () => {
    const q = document.getElementById("query").value;
    const params = new URLSearchParams({ query_set: qs(), view: document.getElementById("view-kind").value, smooth: document.getElementById("smooth").value, points: "1000" });
    if (q !== "") params.set("query", q);
    const figure = await api(`/jobs/${job.id}/figures/phase?${params}`);
    await Plotly.react("phase-plot", figure.data, figure.layout, { responsive: true, displaylogo: false });
    const phases = await api(`/jobs/${job.id}/phases?query_set=${encodeURIComponent(qs())}`);
    document.getElementById("phase-summary").textContent = Object.entries(phases.ranges).map(([n, r]) => `${n}: steps ${r[0]}–${r[1]}, ${(100 * phases.share_abs_per_lr[n]).toFixed(0)}% of |influence / lr|`).join(" · ");
    const dist = await api(`/jobs/${job.id}/figures/distribution?query_set=${encodeURIComponent(qs())}`);
    await Plotly.react("distribution", dist.data, dist.layout, { responsive: true, displaylogo: false });
  };
  const tables = async () => {
    for (const kind of ["helpful", "harmful"]) {
      const params = new URLSearchParams({ query_set: qs(), kind, limit: "10", offset: String(10 * page) });
      const q = document.getElementById("query").value; if (q !== "") params.set("query", q);
      const phase = document.getElementById("phase").value; if (phase) params.set("phase", phase);
      const lo = document.getElementById("step-min").value, hi = document.getElementById("step-max").value;
      if (lo) params.set("step_min", lo); if (hi) params.set("step_max", hi);
      const top = await api(`/jobs/${job.id}/top?${params}`);
      const meta = top.data.length ? await api(`/jobs/${job.id}/metadata?ids=${encodeURIComponent(top.data.map((r) => r.example_id).join(","))}`) : {};
      document.getElementById(`top-${kind}`).innerHTML = `<table class="top" data-kind="${kind}"><thead><tr><th>#</th><th>example</th><th>what it is</th><th>label</th><th>step</th><th>epoch</th><th>phase</th><th>score (${esc(top.propagation || propagation)})</th></tr></thead><tbody>
        ${top.data.map((r) => `<tr><td>${r.rank + 1}</td><td><a href="#/jobs/${job.id}/examples/${encodeURIComponent(r.example_id)}?qs=${encodeURIComponent(qs())}">${esc(r.example_id)}</a></td><td>${describe(meta[r.example_id], r)}</td><td>${esc(r.label)}</td><td>${r.step}</td><td>${r.epoch}</td><td>${r.phase}</td><td class="score" data-score="${r.score}">${fmtScore(r.score)}</td></tr>`).join("")}
        </tbody></table><p class="muted">${top.count} row(s)</p>`;
      document.querySelectorAll(`#top-${kind} canvas.thumb`).forEach((c) => drawImage(c, meta[c.dataset.id].image));
    }
  };
  const examples = async () => {
    for (const kind of ["helpful", "harmful"]) {
      const ranked = await api(`/jobs/${job.id}/examples?query_set=${encodeURIComponent(qs())}&kind=${kind}&limit=10`);
      const meta = ranked.data.length ? await api(`/jobs/${job.id}/metadata?ids=${encodeURIComponent(ranked.data.map((r) => r.example_id).join(","))}`) : {};
      document.getElementById(`examples-${kind}`).innerHTML = `<table class="examples" data-kind="${kind}"><thead><tr><th>example</th><th>what it is</th><th>label</th><th>occurrences</th><th>total (${esc(propagation)})</th></tr></thead><tbody>
        ${ranked.data.map((r) => `<tr><td><a href="#/jobs/${job.id}/examples/${encodeURIComponent(r.example_id)}?qs=${encodeURIComponent(qs())}">${esc(r.example_id)}</a></td><td>${describe(meta[r.example_id], r)}</td><td>${esc(r.label)}</td><td>${r.occurrences}</td><td class="score" data-score="${r.total}">${fmtScore(r.total)}</td></tr>`).join("")}
        </tbody></table>`;
      document.querySelectorAll(`#examples-${kind} canvas.thumb`).forEach((c) => drawImage(c, meta[c.dataset.id].image));
    }
  };
  fillQueries();
  for (const id of ["qs"]) document.getElementById(id).addEventListener("change", () => { fillQueries(); page = 0; draw(); tables(); examples(); });
  for (const id of ["query", "view-kind", "smooth"]) document.getElementById(id).addEventListener("change", () => { draw(); tables(); });
  for (const id of ["phase", "step-min", "step-max"]) document.getElementById(id).addEventListener("change", () => { page = 0; tables(); });
  document.getElementById("prev").addEventListener("click", () => { page = Math.max(0, page - 1); tables(); });
  document.getElementById("next").addEventListener("click", () => { page += 1; tables(); });
  await Promise.all([draw(), tables(), examples()]);
  document.getElementById("results").dataset.ready = "true";
}

// An example's image as a small canvas, or the start of its text, with its source.
function describe(meta, row) {
  if (!meta) return `<span class="muted">${esc(row.source)}</span>`;
  if (meta.image) return `<canvas class="thumb" data-id="${esc(row.example_id)}" width="${meta.image.shape[1]}" height="${meta.image.shape[0]}" style="width:${meta.image.shape[1] * 3}px" role="img" aria-label="image of example ${esc(row.example_id)}"></canvas>`;
  const text = meta.text || "";
  return `<code title="${esc(text)}">${esc(text.slice(0, 48))}${text.length > 48 ? "…" : ""}</code> <span class="muted">${esc(meta.source)}</span>`;
}

function drawImage(canvas, image) {
  const [h, w] = image.shape, channels = image.shape.length === 3 ? image.shape[2] : 1;
  const bytes = Uint8Array.from(atob(image.base64), (c) => c.charCodeAt(0));
  const ctx = canvas.getContext("2d"), pixels = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    const v = bytes.subarray(i * channels, i * channels + channels);
    pixels.data.set(channels >= 3 ? [v[0], v[1], v[2], 255] : [v[0], v[0], v[0], 255], 4 * i);
  }
  ctx.putImageData(pixels, 0, 0);
}

// -- example page ---------------------------------------------------------------------------------------
async function renderExample(jobId, exampleId) {
  const qs = new URLSearchParams(location.hash.split("?")[1] || "").get("qs") || Object.keys((await api(`/jobs/${jobId}/summary`)).query_sets)[0];
  const ex = await api(`/jobs/${jobId}/examples/${encodeURIComponent(exampleId)}?query_set=${encodeURIComponent(qs)}`);
  const propagation = (await api(`/jobs/${jobId}`)).propagation || "exact SGD";
  const meta = ex.metadata || {};
  view.innerHTML = `<h1>Example ${esc(exampleId)}</h1><section><h2>What it is</h2>
      ${meta.image ? `<canvas id="thumb" class="thumb" width="${meta.image.shape[1]}" height="${meta.image.shape[0]}" style="width:${meta.image.shape[1] * 8}px"></canvas>` : ""}
      <p>${meta.text ? esc(meta.text) : ""}</p><p>label: <b>${esc(meta.label ?? ex.label)}</b> · source: ${esc(meta.source ?? ex.source)}</p>
      <p>total influence on <b>${esc(qs)}</b> over ${ex.occurrences} occurrence(s): ${fmtScore(ex.total)} <span class="muted">(${esc(propagation)})</span></p></section>
    <section><h2>Influence at each occurrence</h2>
      <label>On <select id="on-query"><option value="">the whole query set</option>${(ex.history[0]?.per_query || []).map((_, i) => `<option value="${i}">query ${i}</option>`).join("")}</select></label>
      <div id="history-plot" style="height:280px"></div>
      <table id="history"><thead><tr><th>step</th><th>epoch</th><th>phase</th><th>influence (${esc(propagation)})</th></tr></thead><tbody></tbody></table></section>`;
  if (meta.image) drawImage(document.getElementById("thumb"), meta.image);
  const show = async () => {
    const q = document.getElementById("on-query").value;
    const value = (h) => (q === "" ? h.score : h.per_query[Number(q)]);
    document.querySelector("#history tbody").innerHTML = ex.history.map((h) => `<tr><td>${h.step}</td><td>${h.epoch}</td><td>${h.phase}</td><td>${fmtScore(value(h))}</td></tr>`).join("");
    await Plotly.react("history-plot", [{ type: "bar", x: ex.history.map((h) => h.step), y: ex.history.map(value), name: q === "" ? "on the set" : `on query ${q}` }],
      { xaxis: { title: { text: "training step" } }, yaxis: { title: { text: "influence (+ helped)" } }, margin: { t: 20 } }, { displaylogo: false });
  };
  document.getElementById("on-query").addEventListener("change", show);
  await show();
}

route();
