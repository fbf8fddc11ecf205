// jobd's dashboard (SPEC §10): the overview of running, queued and finished jobs, a job's
// page with its live stream, events and log, and the admins' dispatch controls.
//
// Plain JavaScript, no framework and nothing loaded from elsewhere. The token lives in
// sessionStorage and travels only in the Authorization header: the stream is read with
// fetch(), not EventSource, which could carry it only in the URL. Every text from jobd is
// set with textContent, never parsed as HTML. Polling makes one request at a time and
// stops while the tab is hidden.
"use strict";

const TOKEN_KEY = "jobd.token";
const POLL_MS = 2000;
const RETRY_MS = 3000;
const PAGE = { running: 50, queued: 50, finished: 20 };
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const ACTIVE = new Set(["queued", "running"]);
const JOB_ID = /^[0-9a-f-]{36}$/;
const WAIT_REASONS = {
  slots: "waiting for a free worker",
  user_limit: "the user's running limit is reached",
  project_busy: "another job runs on this project",
  paused: "dispatch is paused",
};

const $ = (id) => document.getElementById(id);

const state = {
  admin: null,     // whether the admin endpoint answers this token; null: not known yet
  filters: { status: "", type: "", user: "", project: "" },
  lists: {},       // section name -> {jobs, cursor}
  job: null,       // the job page's job
  stream: null,    // AbortController of the job page's stream
  logOffset: 0,
  logEof: false,
  logReader: false,
  page: 0,         // counts the pages shown, so late answers for a page left are dropped
  pollTimer: null,
  polling: false,
  pollFailed: false,
};

// ---- calls ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const inner = (body && body.error) || {};
    super(inner.message || `HTTP ${status}`);
    this.status = status;
    this.code = inner.code;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function headers() {
  return { Authorization: `Bearer ${token()}` };
}

async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, headers: headers(), signal, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401) signOut(`Signed out: ${error.message}`);
    throw error;
  }
  return data;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    for (const v of [].concat(value)) if (v !== "" && v !== null && v !== undefined) q.append(key, v);
  }
  return q.toString();
}

// ---- notices --------------------------------------------------------------------------

function notify(text, kind = "info") {
  const el = $("notice");
  el.textContent = text;
  el.className = `notice ${kind}`;
  el.hidden = !text;
}

function report(error) {
  if (error.name === "AbortError") return;
  notify(error.message || String(error), "error");
}

// ---- formatting -----------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

function seconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "—";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

// run time: start to end, or to now while it runs
function runTime(job) {
  if (!job.started_at) return null;
  const end = job.completed_at ? Date.parse(job.completed_at) : Date.now();
  return (end - Date.parse(job.started_at)) / 1000;
}

function percent(p) {
  return `${Math.round(p || 0)} %`;
}

function progressBar(job, label) {
  const bar = el("progress", { max: "100", value: String(job.progress || 0),
    "aria-label": label, "aria-valuetext": percent(job.progress) });
  return bar;
}

function setProgress(bar, job) {
  bar.value = job.progress || 0;
  bar.setAttribute("aria-valuetext", percent(job.progress));
}

function statusBadge(job) {
  const text = job.cancel_requested && !TERMINAL.has(job.status) ? `${job.status} (cancelling)` : job.status;
  return el("span", { class: `status s-${job.status}`, text });
}

function shortId(id) {
  return id.slice(0, 8);
}

// ---- overview -------------------------------------------------------------------------

// which sections the status filter leaves, and the status each lists
function sections() {
  const s = state.filters.status;
  const all = {
    running: { status: "running", order: "started" },
    queued: { status: "queued", order: "queue" },
    finished: { status: [...TERMINAL], order: "completed" },
  };
  if (!s) return all;
  if (s === "running" || s === "queued") return { [s]: all[s] };
  return { finished: { status: s, order: "completed" } };
}

function listParams(spec) {
  const f = state.filters;
  return { status: spec.status, order: spec.order, type: f.type,
    projectId: f.project, userId: state.admin ? f.user : "" };
}

async function loadList(name, spec, more) {
  const list = state.lists[name] || (state.lists[name] = { jobs: [], cursor: null });
  if (more) {
    const page = await api(`api/jobs?${query({ ...listParams(spec), limit: PAGE[name], cursor: list.cursor })}`);
    list.jobs = list.jobs.concat(page.jobs);
    list.cursor = page.next_cursor;
  } else {
    // a refresh reloads as many as are shown, so "load more" pages stay
    const limit = Math.min(1000, Math.max(PAGE[name], list.jobs.length));
    const page = await api(`api/jobs?${query({ ...listParams(spec), limit })}`);
    list.jobs = page.jobs;
    list.cursor = page.next_cursor;
  }
  renderList(name);
}

function renderList(name) {
  const section = $(name);
  const list = state.lists[name];
  const ul = section.querySelector(".job-list");
  ul.replaceChildren(...list.jobs.map((job) => jobRow(job, name)));
  section.querySelector(".empty").hidden = list.jobs.length > 0;
  section.querySelector(".more").hidden = !list.cursor;
}

function jobRow(job, name) {
  const title = [job.type, job.project_id].filter(Boolean).join(" · ");
  const link = el("a", { href: `#/jobs/${job.id}`, class: "job-link",
    "aria-label": `Job ${shortId(job.id)}: ${title}` },
    el("code", { text: shortId(job.id) }), ` ${title}`);
  const head = el("div", { class: "row-head" }, link, statusBadge(job));
  const li = el("li", { class: "job", "data-job-id": job.id }, head);
  if (state.admin) li.append(el("p", { class: "meta", text: `user ${job.user_id}` }));
  if (name === "running") {
    li.append(progressBar(job, `Progress of job ${shortId(job.id)}`));
    const phase = job.phase ? `${job.phase}: ` : "";
    const eta = job.eta_s !== null && job.eta_s !== undefined ? ` · about ${seconds(job.eta_s)} left` : "";
    li.append(el("p", { class: "message", text: `${percent(job.progress)} · ${phase}${job.message || ""}${eta}` }));
  } else if (name === "queued") {
    const why = WAIT_REASONS[job.wait_reason] || job.wait_reason || "";
    li.append(el("p", { class: "meta",
      text: `position ${job.queue_position ?? "—"}${why ? ` · ${why}` : ""} · since ${when(job.created_at)}` }));
  } else {
    li.append(el("p", { class: "meta", text: `ran ${seconds(runTime(job))} · ended ${when(job.completed_at)}` }));
    if (job.error) li.append(el("p", { class: "error", text: job.error }));
  }
  return li;
}

async function pollOverview() {
  for (const name of ["running", "queued", "finished"]) $(name).hidden = !sections()[name];
  for (const [name, spec] of Object.entries(sections())) await loadList(name, spec, false);
}

// ---- admin ----------------------------------------------------------------------------

// an admin is whoever the admin endpoint answers; everyone else never sees the controls.
// Any other failure (jobd restarting: 503) leaves it unknown, and the next poll asks again.
async function probeAdmin() {
  try {
    await loadAdmin();
    state.admin = true;
  } catch (error) {
    if (error.status !== 403) throw error;
    state.admin = false;
  }
  $("admin").hidden = !state.admin;
  $("f-user-field").hidden = !state.admin;
  if (token()) $("who").textContent = signedInAs(token());
}

// the counts and switches; while in maintenance also its reason and whether it drained
async function loadAdmin() {
  const stats = await api("api/admin/jobs/stats");
  renderAdmin(stats, stats.maintenance ? await api("api/admin/maintenance") : null);
}

function renderAdmin(stats, maintenance) {
  const parts = [stats.paused ? "Dispatch is paused." : "Dispatch runs.",
    stats.maintenance ? "Maintenance is on." : "Maintenance is off.",
    `${stats.running} running, ${stats.queued} queued, ${stats.workers} workers.`];
  if (maintenance && maintenance.reason) parts.push(`Reason: ${maintenance.reason}.`);
  if (maintenance) parts.push(maintenance.drained ? "Drained: no job runs or can start." : "Not drained yet.");
  $("admin-state").textContent = parts.join(" ");
  $("pause").hidden = stats.paused;
  $("resume").hidden = !stats.paused;
  $("maintenance-on").hidden = stats.maintenance;
  $("maintenance-off").hidden = !stats.maintenance;
}

async function adminAction(path, body) {
  try {
    await api(path, { method: "POST", body });
    await loadAdmin();
  } catch (error) {
    report(error);
  }
}

// ---- the job page ---------------------------------------------------------------------

function renderJob(job) {
  // the answers to this page's calls and the stream's events race: an older state of the
  // job (a cancel's answer arriving after the end it led to) never replaces a newer one
  const shown = state.job;
  if (shown && shown.id === job.id && job.version < shown.version) return;
  state.job = job;
  $("job-title").textContent = `Job ${job.id}`;
  const badge = statusBadge(job);
  $("job-status").className = badge.className;
  $("job-status").textContent = badge.textContent;
  $("job-phase").textContent = job.phase ? `phase ${job.phase}` : "";
  setProgress($("job-progress"), job);
  $("job-progress").setAttribute("aria-label", `Progress of job ${shortId(job.id)}`);
  $("job-message").textContent = `${percent(job.progress)}${job.message ? ` · ${job.message}` : ""}`;
  $("job-error").textContent = job.error || "";
  $("job-error").hidden = !job.error;
  $("job-cancel").hidden = !ACTIVE.has(job.status) || job.cancel_requested;
  // command and noop are retried by admins only (SPEC §3); a [types] job's roles are the
  // daemon's to judge, and a refusal is shown as it comes
  $("job-retry").hidden = !(job.status === "failed" || job.status === "cancelled")
    || (!state.admin && (job.type === "command" || job.type === "noop"));
  const fields = [
    ["Type", job.type], ["User", job.user_id], ["Project", job.project_id ?? "—"],
    ["Priority", job.priority], ["Attempts", job.attempts],
    ["Queue position", job.queue_position ?? "—"],
    ["Waiting because", WAIT_REASONS[job.wait_reason] || job.wait_reason || "—"],
    ["Created", when(job.created_at)], ["Started", when(job.started_at)],
    ["Ended", when(job.completed_at)], ["Run time", seconds(runTime(job))],
    ["Time left", seconds(job.eta_s)], ["Description", job.description ?? "—"],
  ];
  if (job.result) fields.push(["Result", JSON.stringify(job.result)]);
  $("job-fields").replaceChildren(...fields.flatMap(([k, v]) =>
    [el("dt", { text: k }), el("dd", { text: String(v) })]));
}

async function loadEvents(id) {
  const events = await api(`api/jobs/${id}/events`);
  $("job-events").tBodies[0].replaceChildren(...events.map((e) => el("tr", {},
    el("td", { text: when(e.at) }), el("td", { text: e.status }),
    el("td", { text: e.phase ?? "" }), el("td", { text: percent(e.progress) }),
    el("td", { text: e.message ?? "" }), el("td", { text: e.actor ?? "" }))));
}

async function loadLog(id) {
  // one reader at a time, or two would append the same bytes; a read begun for a page
  // since left is dropped
  if (state.logReader) return;
  const page = state.page;
  state.logReader = true;
  try {
    // read every available chunk; eof only once the job is terminal and all was read
    for (;;) {
      const chunk = await api(`api/jobs/${id}/logs?${query({ offset: state.logOffset })}`);
      if (state.page !== page) return;
      if (chunk.data) $("job-log").append(document.createTextNode(chunk.data));
      const moved = chunk.next_offset !== state.logOffset;
      state.logOffset = chunk.next_offset;
      state.logEof = chunk.eof;
      if (chunk.eof || !moved) break;
    }
    $("log-state").textContent = state.logEof ? "(complete)" : "(following)";
  } finally {
    state.logReader = false;
  }
}

// the job's server-sent events, read with fetch so the token stays in a header;
// resumes with Last-Event-ID, and ends when the job has
async function follow(id, controller) {
  let last = null;
  while (!controller.signal.aborted) {
    try {
      const h = headers();
      if (last !== null) h["Last-Event-ID"] = last;
      const response = await fetch(`api/jobs/${id}/stream`, { headers: h, signal: controller.signal, cache: "no-store" });
      if (!response.ok) {
        const error = new ApiError(response.status, await response.json().catch(() => null));
        if (response.status === 401) signOut(`Signed out: ${error.message}`);
        throw error;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        // jobd-http ends its lines with \n alone
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event.id !== undefined) last = event.id;
          if (event.event === "job") onStreamJob(JSON.parse(event.data));
          else if (event.event === "error") notify(JSON.parse(event.data).error.message, "error");
        }
      }
      if (state.job && TERMINAL.has(state.job.status)) return;
    } catch (error) {
      if (controller.signal.aborted) return;
      report(error);
      if (error.status && error.status < 500) return;
    }
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}

function parseEvent(block) {
  const event = { data: "" };
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const at = line.indexOf(":");
    const field = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (field === "data") event.data += (event.data ? "\n" : "") + value;
    else event[field] = value;
  }
  return event;
}

function onStreamJob(job) {
  const before = state.job;
  renderJob(job);
  // the event history grows with status and phase changes: read it again then
  if (!before || before.status !== job.status || before.phase !== job.phase
      || before.cancel_requested !== job.cancel_requested) {
    loadEvents(job.id).catch(report);
  }
}

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

function startStream(id) {
  stopStream();
  state.stream = new AbortController();
  follow(id, state.stream);
}

async function openJob(id) {
  state.job = null;
  state.logOffset = 0;
  state.logEof = false;
  $("job-log").textContent = "";
  $("log-state").textContent = "";
  $("job-events").tBodies[0].replaceChildren();
  renderJob(await api(`api/jobs/${id}`));
  await loadEvents(id);
  await loadLog(id);
  if (!document.hidden) startStream(id);
}

async function pollJob() {
  // the stream keeps the job live; the poll follows the log while there is more
  if (state.job && !state.logEof) await loadLog(state.job.id);
}

async function jobAction(action) {
  const job = state.job;
  if (!job) return;
  try {
    const fresh = action === "cancel"
      ? await api(`api/jobs/${job.id}`, { method: "DELETE" })
      : await api(`api/jobs/${job.id}/retry`, { method: "POST" });
    notify(action === "cancel" ? `Cancel of job ${shortId(job.id)} sent.` : `Job ${shortId(job.id)} queued again.`);
    renderJob(fresh);
    await loadEvents(job.id);
    if (action === "retry") {
      state.logEof = false;
      startStream(job.id);
    }
  } catch (error) {
    report(error);
  }
}

// ---- routing and the poll loop ---------------------------------------------------------

function route() {
  const m = location.hash.match(/^#\/jobs\/([^/]+)$/);
  return m && JOB_ID.test(m[1]) ? { page: "job", id: m[1] } : { page: "overview" };
}

async function show() {
  stopStream();
  // the page shown now is loaded here; the next poll is timed when that is done
  clearTimeout(state.pollTimer);
  state.page += 1;
  const signedIn = Boolean(token());
  $("sign-in").hidden = signedIn;
  $("sign-out").hidden = !signedIn;
  $("overview").hidden = true;
  $("job").hidden = true;
  if (!signedIn) {
    $("admin").hidden = true;
    $("token").focus();
    return;
  }
  const where = route();
  try {
    if (where.page === "job") {
      $("job").hidden = false;
      await openJob(where.id);
    } else {
      $("overview").hidden = false;
      state.job = null;
      await pollOverview();
    }
  } catch (error) {
    report(error);
  }
  schedule();
}

// one poll at a time: the next is timed only when this one has ended
function schedule() {
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
  if (!token() || document.hidden) return;
  state.pollTimer = setTimeout(poll, POLL_MS);
}

async function poll() {
  if (state.polling) return;
  state.polling = true;
  try {
    if (state.admin === null) await probeAdmin();
    else if (state.admin) await loadAdmin();
    if (route().page === "job") await pollJob();
    else await pollOverview();
    // a poll that works again clears what the failed one said
    if (state.pollFailed) notify("");
    state.pollFailed = false;
  } catch (error) {
    state.pollFailed = true;
    report(error);
  } finally {
    state.polling = false;
    schedule();
  }
}

async function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  state.admin = null;
  try {
    await api("api/jobs?limit=1");
    await probeAdmin();
    notify("");
  } catch (error) {
    // refused (401): api() has signed out and said why
    if (!token()) return;
    // jobd or the gateway is unavailable: the token stays, and the polls try again
    report(error);
    state.pollFailed = true;
  }
  $("who").textContent = signedInAs(value);
  $("who").hidden = false;
  await show();
}

// who the token names, for display only: the gateway checks the token, the page does not
function signedInAs(value) {
  try {
    const payload = JSON.parse(atob(value.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    const name = payload.username || payload.sub;
    return name ? `Signed in as ${name}${state.admin ? " (admin)" : ""}` : "Signed in";
  } catch {
    return "Signed in";
  }
}

function signOut(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.admin = null;
  state.lists = {};
  stopStream();
  clearTimeout(state.pollTimer);
  $("who").hidden = true;
  $("admin").hidden = true;
  notify(why || "", why ? "error" : "info");
  show();
}

function wire() {
  $("sign-in-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("token").value.trim();
    $("token").value = "";
    if (value) signIn(value);
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    for (const key of Object.keys(state.filters)) state.filters[key] = $(`f-${key}`).value.trim();
    state.lists = {};
    pollOverview().catch(report);
  });
  for (const name of ["running", "queued", "finished"]) {
    $(name).querySelector(".more").addEventListener("click", () =>
      loadList(name, sections()[name], true).catch(report));
  }
  $("job-cancel").addEventListener("click", () => jobAction("cancel"));
  $("job-retry").addEventListener("click", () => jobAction("retry"));
  $("pause").addEventListener("click", () => adminAction("api/admin/pause"));
  $("resume").addEventListener("click", () => adminAction("api/admin/resume"));
  $("maintenance-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const reason = $("maintenance-reason").value.trim();
    adminAction("api/admin/maintenance", { enabled: true, reason: reason || null });
  });
  $("maintenance-off").addEventListener("click", () =>
    adminAction("api/admin/maintenance", { enabled: false }));
  window.addEventListener("hashchange", show);
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(state.pollTimer);
      stopStream();
    } else if (token()) {
      const where = route();
      if (where.page === "job" && state.job && !TERMINAL.has(state.job.status)) startStream(where.id);
      poll();
    }
  });
}

async function start() {
  wire();
  if (token()) {
    $("who").textContent = signedInAs(token());
    $("who").hidden = false;
    try {
      await probeAdmin();
    } catch (error) {
      report(error);
      state.pollFailed = true;
    }
  }
  await show();
}

start();
