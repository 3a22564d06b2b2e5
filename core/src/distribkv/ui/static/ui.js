// The cluster page: polls /ui/data every two seconds and draws what it answers.
// No library: the table is built with the DOM (text only, never HTML from the cluster) and
// the charts are drawn on canvases.
"use strict";

const POLL_MS = 2000;
// A poll that takes longer is abandoned: the page shows the last view as stale and asks again.
const POLL_TIMEOUT_MS = 5000;
const TOKEN_KEY = "distribkv-ui-token";
const COLORS = { rps: "#2e6fdb", errors_per_s: "#c4320a", p50_ms: "#2e6fdb", p99_ms: "#b54708" };

let lastGood = 0;

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return (s / 60).toFixed(0) + " min";
  if (s < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function number(n, digits) {
  if (n === null || n === undefined) return "";
  return Number(n).toFixed(digits);
}

function lag(row) {
  if (row.lag_entries === null || row.lag_entries === undefined) return "";
  return row.lag_entries + " (" + number(row.lag_seconds, 1) + " s)";
}

// --- the view -----------------------------------------------------------------------------

function renderSummary(view) {
  $("gatherer").textContent = view.node;
  $("fingerprint").textContent = view.fingerprint;
  $("routing").textContent = view.routing;
  $("coordination").textContent = view.coordination;
  $("window").textContent = Math.round(view.history_seconds / 60);
}

function renderShards(view) {
  const box = $("shards");
  box.replaceChildren();
  for (const shard of view.shards) {
    const card = el("div", null, "shard " + shard.health.replace(" ", "-"));
    card.dataset.shard = shard.name;
    card.append(el("div", shard.name + (shard.joining ? " (joining)" : ""), "name"));
    card.append(el("div", shard.health, "health"));
    const leader = shard.leader ? "led by " + shard.leader.split("/")[1] : "no leader answers";
    card.append(el("div", leader, "detail"));
    card.append(el("div", shard.up + " of " + shard.nodes + " nodes up", "detail"));
    if (shard.keys !== null) card.append(el("div", shard.keys + " keys", "detail"));
    box.append(card);
  }
}

function renderNodes(view) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren();
  for (const row of view.nodes) {
    const tr = el("tr", null, row.state);
    tr.dataset.node = row.name;
    tr.dataset.state = row.state;
    const cell = (field, text, cls) => {
      const td = el("td", text, cls);
      td.dataset.field = field;
      tr.append(td);
      return td;
    };
    cell("shard", row.shard + (row.joining ? " (joining)" : ""));
    cell("slot", row.slot);
    cell("address", row.address);
    cell("state", row.state, "state " + row.state);
    if (row.state !== "up") {
      const td = cell("error", row.error, "err");
      td.colSpan = 10;
      body.append(tr);
      continue;
    }
    cell("role", row.role);
    const keys = cell("keys", row.keys === null ? "n/a" : row.keys, "num");
    if (row.keys === null) keys.title = "this storage engine does not count its keys";
    cell("disk", bytes(row.disk_bytes), "num");
    cell("seq", row.seq, "num");
    cell("lag", lag(row), "num");
    const map = cell("map", row.fingerprint_agrees ? "agrees" : row.fingerprint + " differs");
    map.title = row.fingerprint;
    if (!row.fingerprint_agrees) map.className = "disagrees";
    cell("reshard", row.reshard_phase || (row.reshard_joining ? "joining" : ""), "phase");
    cell("uptime", duration(row.uptime_s), "num");
    cell("rps", number(row.rps, 1), "num");
    cell("p99", number(row.p99_ms, 2), "num");
    body.append(tr);
  }
}

// --- the charts ---------------------------------------------------------------------------

function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) {
    if (value <= m * step) return m * step;
  }
  return 10 * step;
}

function drawChart(canvas, history, series, windowS, now, message) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const left = 52, right = 12, top = 22, bottom = 24;
  const plotW = width - left - right, plotH = height - top - bottom;
  ctx.font = "11px system-ui, sans-serif";

  let max = 0;
  for (const point of history) {
    for (const s of series) {
      const v = point[s.key];
      if (v !== null && v !== undefined && v > max) max = v;
    }
  }
  const top_ = niceCeiling(max * 1.1);
  const x = (t) => left + plotW * (1 - (now - t) / windowS);
  const y = (v) => top + plotH * (1 - v / top_);

  // Grid and axes.
  ctx.strokeStyle = "#e6e9ef";
  ctx.fillStyle = "#667085";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i += 1) {
    const v = (top_ * i) / 4;
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(left + plotW, yy); ctx.stroke();
    ctx.fillText(v >= 100 ? v.toFixed(0) : String(+v.toPrecision(3)), left - 6, yy);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let ago = 0; ago <= windowS; ago += 60) {
    const xx = Math.round(x(now - ago)) + 0.5;
    ctx.fillText(ago === 0 ? "now" : "-" + ago / 60 + " min", xx, top + plotH + 6);
  }

  // Legend.
  let lx = left;
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  for (const s of series) {
    ctx.fillStyle = s.color;
    ctx.fillRect(lx, 7, 14, 3);
    ctx.fillStyle = "#1d2330";
    ctx.fillText(s.label, lx + 18, 9);
    lx += ctx.measureText(s.label).width + 40;
  }

  if (message) {
    ctx.fillStyle = "#667085";
    ctx.font = "14px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillText(message, left + plotW / 2, top + plotH / 2);
    return;
  }

  // The lines: a gap where a point has no value (no requests, or a node restarted).
  ctx.save();
  ctx.beginPath();
  ctx.rect(left, top, plotW, plotH);
  ctx.clip();
  ctx.lineWidth = 2;
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.beginPath();
    let open = false;
    for (const point of history) {
      const v = point[s.key];
      if (v === null || v === undefined) { open = false; continue; }
      if (open) ctx.lineTo(x(point.t), y(v)); else ctx.moveTo(x(point.t), y(v));
      open = true;
    }
    ctx.stroke();
  }
  ctx.restore();
}

function renderCharts(view) {
  const history = view.history || [];
  let message = null;
  if (!view.metrics) message = "no metrics: the nodes serve no /metrics";
  else if (history.length === 0) message = "collecting: the first rates come with the next poll";
  const windowS = view.history_seconds;
  drawChart($("throughput"), history, [
    { key: "rps", label: "requests/s", color: COLORS.rps },
    { key: "errors_per_s", label: "5xx/s", color: COLORS.errors_per_s },
  ], windowS, view.at, message);
  drawChart($("latency"), history, [
    { key: "p50_ms", label: "p50", color: COLORS.p50_ms },
    { key: "p99_ms", label: "p99", color: COLORS.p99_ms },
  ], windowS, view.at, message);
  $("charts").dataset.metrics = view.metrics ? "yes" : "no";
  const totals = view.totals;
  $("metrics-note").textContent = totals
    ? "now: " + number(totals.rps, 1) + " requests/s, " + number(totals.errors_per_s, 1)
      + " 5xx/s, p50 " + number(totals.p50_ms, 2) + " ms, p99 " + number(totals.p99_ms, 2) + " ms"
    : (message || "");
}

function render(view) {
  renderSummary(view);
  renderShards(view);
  renderNodes(view);
  renderCharts(view);
  document.body.dataset.at = view.at;
}

// --- polling ------------------------------------------------------------------------------

function showProblem(text) {
  const box = $("problem");
  box.textContent = text;
  box.hidden = !text;
}

function markFreshness() {
  const box = $("freshness");
  if (!lastGood) return;
  const age = (Date.now() - lastGood) / 1000;
  box.textContent = age < 5 ? "live" : "stale: last answer " + age.toFixed(0) + " s ago";
  box.className = age < 5 ? "live" : "stale";
}

async function poll() {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), POLL_TIMEOUT_MS);
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  try {
    const response = await fetch("/ui/data", { headers, signal: controller.signal, cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      let detail = "";
      try { detail = (await response.json()).detail || ""; } catch (e) { /* not JSON */ }
      $("login").hidden = false;
      showProblem(response.status + ": " + detail);
      return;
    }
    if (!response.ok) throw new Error("/ui/data answered " + response.status);
    const view = await response.json();
    $("login").hidden = true;
    showProblem("");
    lastGood = Date.now();
    render(view);
  } catch (e) {
    const what = e.name === "AbortError" ? "no answer within " + POLL_TIMEOUT_MS / 1000 + " s" : e.message;
    showProblem("cannot reach " + location.host + ": " + what + " (retrying)");
  } finally {
    clearTimeout(timer);
    markFreshness();
    setTimeout(poll, POLL_MS);
  }
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  $("token").value = "";
  $("login").hidden = true;
});

setInterval(markFreshness, 1000);
poll();
