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

// Buttons are made once and updated in place (a button rebuilt every second loses clicks).
function button() {
  const b = document.createElement("button");
  b.type = "button";
  b.addEventListener("click", () => act(b.dataset.action, b.textContent));
  return b;
}

function setButton(b, label, path) {
  if (b.textContent !== label) b.textContent = label;
  if (b.dataset.action !== path) b.dataset.action = path;
}

const rows = new Map();
let admissionButton = null;

function opRow(o, admin) {
  let row = rows.get(o.name);
  if (!row) {
    const tr = document.createElement("tr");
    tr.dataset.op = o.name;
    const cells = Array.from({ length: 9 }, () => document.createElement("td"));
    tr.append(...cells);
    row = { tr, cells, buttons: null };
    if (admin) {
      const td = document.createElement("td");
      td.className = "admin-only";
      row.buttons = [button(), button(), button()];
      td.append(...row.buttons);
      tr.append(td);
    }
    rows.set(o.name, row);
  }
  return row;
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
  const a = snap.admission;
  $("admission-text").textContent =
    "admission: " + (a.paused ? "paused" : "open") + ", pending " + a.pending + (a.max_pending ? " of " + a.max_pending : "");
  if (snap.admin) {
    if (!admissionButton) {
      admissionButton = button();
      $("admission").append(admissionButton);
    }
    setButton(admissionButton, a.paused ? "resume admission" : "pause admission",
      a.paused ? "api/v1/admission/resume" : "api/v1/admission/pause");
  }

  const before = new Map((previous ? previous.operations : []).map((o) => [o.name, o]));
  const body = $("ops").tBodies[0];
  const seen = new Set();
  snap.operations.forEach((o, i) => {
    seen.add(o.name);
    const row = opRow(o, snap.admin);
    const state = o.blocked ? "blocked" : o.paused ? "paused" : "running";
    const values = [o.name, state, o.health, o.pending, o.completed, o.failed,
      rate(o, before.get(o.name), "completed", dt), seconds(o.queue_wait.p95_s), seconds(o.execution.p95_s)];
    const classes = ["", state === "running" ? "" : "paused", "health-" + o.health, "", "", "", "", "", ""];
    row.cells.forEach((td, k) => {
      const text = String(values[k]);
      if (td.textContent !== text) td.textContent = text;
      if (td.className !== classes[k]) td.className = classes[k];
    });
    if (row.buttons) {
      const base = "api/v1/ops/" + encodeURIComponent(o.name) + "/";
      setButton(row.buttons[0], o.paused ? "resume" : "pause", base + (o.paused ? "resume" : "pause"));
      setButton(row.buttons[1], "drain", base + "drain");
      setButton(row.buttons[2], "kill", base + "kill");
    }
    if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] || null);
  });
  for (const [name, row] of rows) {
    if (!seen.has(name)) {
      row.tr.remove();
      rows.delete(name);
    }
  }
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
    events.close();
    $("status").textContent = "the coordinator stopped";
    $("status").className = "status down";
  });
  events.onerror = () => live(false);
}

document.addEventListener("DOMContentLoaded", start);
