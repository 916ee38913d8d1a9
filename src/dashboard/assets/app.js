// The tokengate dashboard: live from api/v1/events (server-sent events, one snapshot a second),
// admin actions by POST. Every URL is relative, so the page works under any URL prefix.
"use strict";

const $ = (id) => document.getElementById(id);
let previous = null;

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
  if (s < 1) return (s * 1e3).toFixed(1) + " ms";
  return s.toFixed(2) + " s";
}

function rate(now, before, key, dt) {
  if (!before || dt <= 0) return "–";
  const d = now[key] - before[key];
  return d >= 0 ? (d / dt).toFixed(d / dt < 10 ? 1 : 0) : "–";
}

async function act(path, label) {
  $("message").textContent = label + "…";
  try {
    const response = await fetch(path, { method: "POST", credentials: "same-origin" });
    const body = await response.json().catch(() => ({}));
    $("message").textContent = response.ok ? label + ": done " + JSON.stringify(body) : label + ": " + (body.error || response.status);
  } catch (err) {
    $("message").textContent = label + ": " + err;
  }
}

function button(label, path) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = path;
  b.addEventListener("click", () => act(path, label));
  return b;
}

function render(snap) {
  document.body.classList.toggle("read-only", !snap.admin);
  $("mode").textContent = snap.admin ? "admin" : "read-only";
  const t = snap.tokens;
  for (const key of ["submitted", "completed", "failed", "running", "queued", "blocked"]) {
    $(key).textContent = t[key];
  }
  const dt = previous ? snap.time - previous.time : 0;
  const done = (s) => ({ n: s.tokens.completed + s.tokens.failed });
  $("rate").textContent = previous ? rate(done(snap), done(previous), "n", dt) : "–";

  const lanes = $("lanes").tBodies[0];
  lanes.replaceChildren(
    ...snap.lanes.map((l) => {
      const tr = document.createElement("tr");
      tr.append(cell(l.lane), cell(l.workers), cell(l.running), cell(l.queued === null ? "–" : l.queued));
      return tr;
    }),
  );
  const adm = $("admission");
  adm.replaceChildren(document.createTextNode("admission: " + (snap.admission.paused ? "paused" : "open") +
    ", pending " + snap.admission.pending + (snap.admission.max_pending ? " of " + snap.admission.max_pending : "")));
  if (snap.admin) {
    adm.append(snap.admission.paused
      ? button("resume admission", "api/v1/admission/resume")
      : button("pause admission", "api/v1/admission/pause"));
  }

  const before = new Map((previous ? previous.operations : []).map((o) => [o.name, o]));
  const ops = $("ops").tBodies[0];
  ops.replaceChildren(
    ...snap.operations.map((o) => {
      const tr = document.createElement("tr");
      tr.dataset.op = o.name;
      const state = o.blocked ? "blocked" : o.paused ? "paused" : "running";
      tr.append(
        cell(o.name),
        cell(state, state === "running" ? "" : "paused"),
        cell(o.health, "health-" + o.health),
        cell(o.pending),
        cell(o.completed),
        cell(o.failed),
        cell(rate(o, before.get(o.name), "completed", dt)),
        cell(seconds(o.queue_wait.p95_s)),
        cell(seconds(o.execution.p95_s)),
      );
      if (snap.admin) {
        const td = cell("", "admin-only");
        const base = "api/v1/ops/" + encodeURIComponent(o.name) + "/";
        td.append(
          o.paused ? button("resume", base + "resume") : button("pause", base + "pause"),
          button("drain", base + "drain"),
          button("kill", base + "kill"),
        );
        tr.append(td);
      }
      return tr;
    }),
  );
  previous = snap;
}

function live(ok) {
  const s = $("status");
  s.textContent = ok ? "live" : "disconnected, retrying…";
  s.className = "status " + (ok ? "live" : "down");
}

function start() {
  const events = new EventSource("api/v1/events");
  events.addEventListener("snapshot", (e) => {
    live(true);
    render(JSON.parse(e.data));
  });
  events.addEventListener("gone", () => {
    $("status").textContent = "the coordinator stopped";
    $("status").className = "status down";
  });
  events.onerror = () => live(false);
}

document.addEventListener("DOMContentLoaded", start);
