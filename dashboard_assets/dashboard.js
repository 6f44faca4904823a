// The c3-render dashboard: polls the JSON routes every few seconds with the API key typed in (kept in
// this browser's localStorage) and builds the page with DOM calls (never innerHTML: job errors are text).
// An ordinary key sees its own jobs and pipelines; the numbers and workers (/overview) are for admin keys, so with any
// other key (403) those panels are hidden and the page says why.
"use strict";

const POLL_MS = 2000;
const state = { key: localStorage.getItem("c3-render-key") || "", selected: null, older: [], cursor: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "onclick") node.addEventListener("click", value);
    else if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child === null || child === undefined ? "" : child);
  return node;
}

async function call(method, path) {
  const headers = state.key ? { "X-C3-RENDER-KEY": state.key } : {};
  const response = await fetch(path, { method, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `${method} ${path}: HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function when(iso) {
  if (!iso) return "";
  const moment = new Date(iso);
  return moment.toLocaleString(undefined, { hour12: false });
}

function badge(status) {
  return el("span", { class: `status status-${status}`, "data-status": status }, status);
}

function progressText(job) {
  if (job.status === "queued") return job.queue_position ? `#${job.queue_position} in queue` : "queued";
  if (job.status !== "running") return "";
  const parts = [];
  if (job.phase) parts.push(job.phase);
  if (job.progress !== undefined) parts.push(`${job.progress}%`);
  if (job.cancel_requested) parts.push("cancelling…");
  return parts.join(" · ");
}

async function cancelJob(id, event) {
  event.stopPropagation();
  try {
    await call("POST", `/cancel/${id}`);
  } catch (error) {
    showProblem(error.message);
  }
  refresh();
}

function jobRow(job) {
  const open = job.status === "waiting" || job.status === "queued" || job.status === "running";
  const cancel = open && !job.cancel_requested
    ? el("button", { class: "cancel", type: "button", onclick: (e) => cancelJob(job.id, e) }, "Cancel")
    : "";
  return el("tr", { class: `job${job.id === state.selected ? " selected" : ""}`, "data-job-id": job.id,
                    onclick: () => select(job.id) },
    el("td", {}, el("code", { title: job.id }, job.id.slice(0, 8))),
    el("td", {}, job.type),
    el("td", {}, badge(job.status)),
    el("td", {}, when(job.created_at)),
    el("td", { class: "progress" }, progressText(job)),
    el("td", { class: "error" }, job.error || ""),
    el("td", {}, cancel));
}

async function cancelPipeline(id, event) {
  event.stopPropagation();
  try {
    await call("POST", `/pipelines/${id}/cancel`);
  } catch (error) {
    showProblem(error.message);
  }
  refresh();
}

// A pipeline and its steps: each step's name and status, a click opens the step's job in the detail view.
function pipelineRow(pipeline) {
  const open = pipeline.status === "queued" || pipeline.status === "running";
  const cancel = open
    ? el("button", { class: "cancel", type: "button", onclick: (e) => cancelPipeline(pipeline.id, e) }, "Cancel")
    : "";
  const steps = Object.entries(pipeline.steps).map(([name, step]) => step
    ? el("a", { href: "#", class: "step", "data-step": name, "data-job-id": step.id,
                onclick: (e) => { e.preventDefault(); select(step.id); } }, `${name} `, badge(step.status))
    : el("span", { class: "step muted", "data-step": name }, `${name} (expired)`));
  return el("tr", { class: "pipeline", "data-pipeline-id": pipeline.id },
    el("td", {}, el("code", { title: pipeline.id }, pipeline.id.slice(0, 8))),
    el("td", {}, badge(pipeline.status)),
    el("td", {}, when(pipeline.created_at)),
    el("td", { class: "steps" }, ...steps),
    el("td", { class: "error" }, pipeline.error || ""),
    el("td", {}, cancel));
}

function filterQuery(extra) {
  const params = new URLSearchParams();
  if ($("filter-status").value) params.set("status", $("filter-status").value);
  if ($("filter-type").value) params.set("type", $("filter-type").value);
  for (const [k, v] of Object.entries(extra || {})) params.set(k, v);
  return params.toString();
}

function showProblem(message) {
  $("problem").textContent = message;
  $("problem").hidden = !message;
}

function renderValue(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") return el("pre", {}, JSON.stringify(value, null, 2));
  return String(value);
}

async function refreshDetail() {
  if (!state.selected) return;
  const job = await call("GET", `/jobs/${state.selected}`);
  $("detail").hidden = false;
  $("detail-id").textContent = job.id;
  const fields = $("detail-fields");
  fields.replaceChildren();
  for (const [name, value] of Object.entries(job)) {
    if (name === "history" || name === "id") continue;
    let shown = renderValue(value);
    if (name === "status") shown = badge(value);
    if (name === "result" && value && value.result_url) {
      shown = el("a", { href: value.result_url, target: "_blank", rel: "noopener" }, "result file");
    }
    fields.append(el("dt", {}, name), el("dd", { "data-field": name }, shown));
  }
  $("detail-history").tBodies[0].replaceChildren(
    ...(job.history || []).map((item) => el("tr", {}, el("td", {}, badge(item.status)), el("td", {}, when(item.at)))));
}

// "primary, 1 replica (lag 0 s)": the Redis role and how far behind its replicas are
function redisRole(redis) {
  if (!redis) return "–";
  const replicas = redis.replicas || [];
  const lag = replicas.length ? ` (lag ${Math.max(...replicas.map((r) => r.lag_s))} s)` : "";
  return `${redis.role}, ${replicas.length} replica${replicas.length === 1 ? "" : "s"}${lag}`;
}

function select(id) {
  state.selected = id;
  refresh();
}

// The overview, or null with the reason shown when this key is not an admin key (403).
async function overviewOrScope() {
  try {
    const overview = await call("GET", "/overview");
    $("scope").hidden = true;
    return overview;
  } catch (error) {
    if (error.status !== 403) throw error;
    $("scope").textContent = "This key sees its own jobs only. The queue numbers, workers and nodes are " +
      "shown to admin keys (C3_RENDER_ADMIN_KEYS).";
    $("scope").hidden = false;
    return null;
  }
}

function showOverview(overview) {
  $("numbers").hidden = !overview;
  $("workers-section").hidden = !overview;
  if (!overview) return;
  $("queue-depth").textContent = overview.queue_depth;
  $("running").textContent = overview.running;
  $("throughput").textContent = overview.finished_last_hour;
  $("nodes-running").textContent = overview.nodes_running;
  $("node-seconds-today").textContent = Math.round(overview.node_seconds_today);
  $("node-seconds-total").textContent = Math.round(overview.node_seconds_total);
  $("node-seconds-per-job").textContent = overview.node_seconds_per_job_today ?? "–";
  $("cost-per-job").textContent = overview.cost_per_job_today ?? "–";
  const time = overview.node_time || {};
  $("node-time").textContent = ["busy", "idle", "booting"].map((kind) => Math.round(time[kind] || 0)).join(" / ");
  $("redis-role").textContent = redisRole(overview.redis);
  $("pool-nodes").tBodies[0].replaceChildren(...(overview.nodes || []).map((n) => el("tr", { "data-node": n.id },
    el("td", { title: n.workload || "" }, n.node || n.id),
    el("td", {}, n.type),
    el("td", {}, n.solo ? `${n.state} (one job at a time)` : n.state),
    el("td", {}, n.jobs.map((j) => `${j.service} ${j.job.slice(0, 8)}`).join(", ") || "none"),
    el("td", {}, n.idle_since ? when(new Date(n.idle_since * 1000).toISOString()) : ""))));
  $("workers").tBodies[0].replaceChildren(...overview.workers.map((w) => el("tr", { "data-worker": w.id },
    el("td", {}, w.id),
    el("td", {}, w.alive ? `${w.heartbeat_age_s}s ago` : "no heartbeat"),
    el("td", {}, w.nodes.length ? w.nodes.map((n) => `${n.type}: ${n.state || ""} ${n.node || n.id}`).join("; ") : "none"),
    el("td", {}, (w.jobs || []).map((id) => id.slice(0, 8)).join(", ")))));
}

async function refresh() {
  try {
    const [overview, page, failures, pipelines] = await Promise.all([
      overviewOrScope(),
      call("GET", `/jobs?${filterQuery({ limit: 50 })}`),
      call("GET", "/jobs?status=failed&limit=10"),
      call("GET", "/pipelines?limit=20"),
    ]);
    showOverview(overview);
    $("pipelines").tBodies[0].replaceChildren(...pipelines.pipelines.map(pipelineRow));
    $("jobs").tBodies[0].replaceChildren(...page.jobs.map(jobRow), ...state.older.map(jobRow));
    if (!state.older.length) state.cursor = page.next_cursor;
    $("more").hidden = !state.cursor;
    $("failures").replaceChildren(...failures.jobs.map((job) => el("li", {},
      el("a", { href: "#", onclick: (e) => { e.preventDefault(); select(job.id); } }, job.id.slice(0, 8)),
      ` ${job.type} · ${when(job.finished_at)} · `, el("span", { class: "error" }, job.error || ""))));
    await refreshDetail();
    showProblem("");
    $("live").textContent = `updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}`;
  } catch (error) {
    showProblem(error.message);
    $("live").textContent = "not updating";
  }
}

async function loadOlder() {
  if (!state.cursor) return;
  const page = await call("GET", `/jobs?${filterQuery({ limit: 50, cursor: state.cursor })}`);
  state.older.push(...page.jobs);
  state.cursor = page.next_cursor;
  refresh();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  localStorage.setItem("c3-render-key", state.key);
  state.older = [];
  state.cursor = null;
  state.selected = null;
  $("detail").hidden = true;
  refresh();
});
for (const id of ["filter-status", "filter-type"]) {
  $(id).addEventListener("change", () => { state.older = []; state.cursor = null; refresh(); });
}
$("more").addEventListener("click", loadOlder);
$("detail-close").addEventListener("click", () => { state.selected = null; $("detail").hidden = true; refresh(); });
$("api-key").value = state.key;
refresh();
setInterval(refresh, POLL_MS);
