// The store page: polls /api/status and /api/analytics and draws them. Plain DOM and SVG, no
// library, no network beyond this device. Every text goes in through textContent (never HTML).
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const W = 600, H = 220, M = { l: 44, r: 12, t: 12, b: 30 };

// ---------------------------------------------------------------- formatting
function fmtInt(n) { return n === null || n === undefined ? "—" : Math.round(n).toLocaleString(); }
function fmtPct(x) { return x === null || x === undefined ? "—" : (x * 100).toFixed(1) + " %"; }
function fmtAge(s) {
  if (s === null || s === undefined) return "never";
  if (s < 1) return "just now";
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min ago";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h ago";
}
function fmtDuration(s) { return s === null || s === undefined ? "none" : fmtAge(s).replace(" ago", ""); }
function fmtBytes(b) {
  const u = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(1) : String(b)) + " " + u[i];
}
function hhmm(ms) {
  const d = new Date(ms);
  return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
}
function byId(id) { return document.getElementById(id); }
function setText(id, text) { const e = byId(id); if (e.textContent !== text) e.textContent = text; }

// ---------------------------------------------------------------- svg helpers
function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (parent) parent.appendChild(e);
  return e;
}
function txt(parent, x, y, s, attrs) {
  const t = el("text", Object.assign({ x, y }, attrs || {}), parent);
  t.textContent = s;
  return t;
}
function tip(node, s) { const t = el("title", {}, node); t.textContent = s; }
function reset(svg) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);  // the hatch pattern lives in index.html
}
function empty(svg, message) {
  reset(svg);
  txt(svg, W / 2, H / 2, message, { class: "empty", "text-anchor": "middle" });
}
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
function yAxis(svg, max, fmt) {
  const g = el("g", { class: "axis" }, svg);
  const lead = max / Math.pow(10, Math.floor(Math.log10(max)));
  const n = lead === 2 ? 4 : 5;  // round steps: 0.4 of 2, 0.5 of 2.5, 1 of 5 or 10
  for (let i = 0; i <= n; i++) {
    const v = (max * i) / n, y = H - M.b - ((H - M.t - M.b) * i) / n;
    el("line", { x1: M.l, x2: W - M.r, y1: y, y2: y, class: "grid" }, g);
    txt(g, M.l - 6, y + 4, fmt(v), { "text-anchor": "end" });
  }
}
function xLabels(svg, labels, x0, step) {
  const g = el("g", { class: "axis" }, svg);
  const every = Math.max(1, Math.ceil(labels.length / 8));
  labels.forEach((s, i) => {
    if (i % every === 0) txt(g, x0 + step * i + step / 2, H - M.b + 16, s, { "text-anchor": "middle" });
  });
}

// bars: values[i] === null is a suppressed (hatched) column
function barChart(svg, labels, values, opts) {
  reset(svg);
  if (!values.length) { empty(svg, "no data yet today"); return; }
  const max = niceMax(Math.max(0, ...values.filter((v) => v !== null)));
  yAxis(svg, max, (v) => fmtInt(v));
  const step = (W - M.l - M.r) / values.length, bw = Math.max(1, step * 0.78);
  const plotH = H - M.t - M.b;
  values.forEach((v, i) => {
    const x = M.l + step * i + (step - bw) / 2;
    let r;
    if (v === null) {
      r = el("rect", { x, y: M.t, width: bw, height: plotH, class: "suppressed", "data-suppressed": 1 }, svg);
      tip(r, labels[i] + ": suppressed (fewer than k people)");
    } else {
      const h = (plotH * v) / max;
      r = el("rect", { x, y: H - M.b - h, width: bw, height: Math.max(h, 0.5),
                       class: "bar " + (opts.barClass || ""), "data-value": v }, svg);
      tip(r, labels[i] + ": " + fmtInt(v) + " " + opts.unit);
      if (opts.valueLabels) txt(svg, x + bw / 2, H - M.b - h - 4, fmtInt(v), { class: "value-label", "text-anchor": "middle" });
    }
  });
  xLabels(svg, labels, M.l, step);
}

function lineChart(svg, labels, values) {
  reset(svg);
  if (!values.length) { empty(svg, "no data yet today"); return; }
  const max = niceMax(Math.max(0.05, ...values.filter((v) => v !== null)));
  yAxis(svg, max, (v) => Math.round(v * 100) + "%");
  const step = (W - M.l - M.r) / values.length, plotH = H - M.t - M.b;
  const px = (i) => M.l + step * i + step / 2, py = (v) => H - M.b - (plotH * v) / max;
  let d = "";
  values.forEach((v, i) => {
    if (v === null) {
      const r = el("rect", { x: M.l + step * i, y: M.t, width: step, height: plotH, class: "suppressed",
                             "data-suppressed": 1 }, svg);
      tip(r, labels[i] + ": suppressed");
      d += " ";
      return;
    }
    d += (d === "" || d.endsWith(" ") ? "M" : "L") + px(i).toFixed(1) + "," + py(v).toFixed(1);
  });
  const segs = d.trim().split(/\s+/).filter(Boolean);
  for (const s of segs) el("path", { d: s, class: "line" }, svg);
  values.forEach((v, i) => {
    if (v === null) return;
    const c = el("circle", { cx: px(i), cy: py(v), r: 3.5, class: "dot", "data-value": v }, svg);
    tip(c, labels[i] + ": " + fmtPct(v));
  });
  xLabels(svg, labels, M.l, step);
}

function heatmap(svg, labels, zones, cells) {
  // cells[z][i] = mean occupancy or null (suppressed)
  reset(svg);
  if (!zones.length || !labels.length) { empty(svg, zones.length ? "no data yet today" : "no zones configured"); return; }
  const left = 96, plotW = W - left - M.r, plotH = H - M.t - M.b;
  const rowH = plotH / zones.length, colW = plotW / labels.length;
  let max = 0;
  for (const row of cells) for (const v of row) if (v !== null && v > max) max = v;
  const ramp = (v) => {  // white -> accent blue
    const t = max > 0 ? Math.min(1, v / max) : 0;
    const c = (a, b) => Math.round(a + (b - a) * t);
    return "rgb(" + c(235, 31) + "," + c(242, 84) + "," + c(250, 150) + ")";
  };
  zones.forEach((z, zi) => {
    const y = M.t + rowH * zi;
    txt(svg, left - 8, y + rowH / 2 + 4, z, { class: "label", "text-anchor": "end" });
    labels.forEach((lab, i) => {
      const v = cells[zi][i], x = left + colW * i;
      const attrs = { x: x + 0.5, y: y + 0.5, width: Math.max(colW - 1, 0.5), height: Math.max(rowH - 1, 0.5) };
      let r;
      if (v === null) {
        r = el("rect", Object.assign(attrs, { class: "cell suppressed", "data-suppressed": 1 }), svg);
        tip(r, z + ", " + lab + ": suppressed");
      } else {
        r = el("rect", Object.assign(attrs, { class: "cell", fill: ramp(v), "data-value": v }), svg);
        tip(r, z + ", " + lab + ": " + v.toFixed(1) + " people on average");
      }
    });
  });
  xLabels(svg, labels, left, colW);
  txt(svg, W - M.r, H - 2, "darker = more people (max " + max.toFixed(1) + ")", { class: "label", "text-anchor": "end" });
}

// ---------------------------------------------------------------- analytics
function renderAnalytics(a) {
  const off = !a.enabled;
  byId("analytics-off").hidden = !off;
  byId("charts").hidden = off;
  if (off) {
    for (const id of ["kpi-footfall", "kpi-receipts", "kpi-conversion", "kpi-staff"]) setText(id, "—");
    return;
  }
  if (a.error) { showBanner("Store analytics could not be read (" + a.error + ")."); return; }
  const t = a.totals || {};
  setText("kpi-footfall", t.footfall === null ? "suppressed" : fmtInt(t.footfall));
  setText("kpi-receipts", t.receipts === null ? "suppressed" : fmtInt(t.receipts));
  setText("kpi-conversion", t.conversion === null ? "suppressed" : fmtPct(t.conversion));
  setText("kpi-staff", t.staff === null ? "suppressed" : fmtInt(t.staff));
  setText("day", a.day || "");
  setText("k", String(a.k ?? 5));
  setText("suppressed-count", a.suppressed ? "; " + fmtInt(a.suppressed) + " hidden today" : "");
  const mins = a.interval_s ? Math.round(a.interval_s / 60) : null;
  for (const e of document.querySelectorAll(".interval-name")) e.textContent = mins ? mins + " minutes" : "interval";
  const iv = a.intervals || [];
  const labels = iv.map((x) => hhmm(x.start));
  barChart(byId("chart-footfall"), labels, iv.map((x) => x.footfall), { unit: "visitors" });
  lineChart(byId("chart-conversion"), labels, iv.map((x) => x.conversion));
  const zones = a.zones || [];
  heatmap(byId("chart-occupancy"), labels, zones,
          zones.map((z) => iv.map((x) => (x.occupancy && x.occupancy[z] ? x.occupancy[z].mean : null))));
  const hist = a.dwell_histogram || [];
  barChart(byId("chart-dwell"), hist.map((b) => b.bucket), hist.map((b) => b.visits),
           { unit: "visits", barClass: "bar-dwell", valueLabels: true });
}

// ---------------------------------------------------------------- status
function stateSpan(state) {
  const s = document.createElement("span");
  s.className = "state state-" + String(state).replace(/[^a-z]/g, "");
  s.textContent = state;
  return s;
}
function dl(id, rows) {
  const d = byId(id);
  d.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    if (v instanceof Node) dd.appendChild(v); else dd.textContent = v;
    d.append(dt, dd);
  }
}
function renderStatus(s) {
  setText("store-name", "Store " + s.store);
  setText("device-name", "device " + s.device + " · " + s.tenant);
  setText("version", s.version);
  document.title = "store-edge · " + s.store;
  const o = byId("overall");
  const problems = [...s.health.reasons];
  const degraded = s.drivers.filter((d) => d.state !== "running").map((d) => d.name);
  if (degraded.length) problems.push("device " + degraded.join(", ") + " not running");
  if (s.uplink.state !== "online" && s.uplink.state !== "disabled") problems.push("head-office link " + s.uplink.state);
  o.className = "badge " + (s.health.status !== "ok" ? "badge-bad" : problems.length ? "badge-warn" : "badge-ok");
  o.textContent = s.health.status !== "ok" ? "Needs attention" : problems.length ? "Running, with warnings" : "All good";
  o.title = problems.join("; ");
  setText("updated", "updated " + new Date(s.now_ms).toLocaleTimeString());

  const tb = byId("drivers").tBodies[0];
  tb.replaceChildren();
  for (const d of s.drivers) {
    const tr = tb.insertRow();
    tr.dataset.driver = d.name;
    tr.insertCell().textContent = d.name;
    const st = tr.insertCell();
    st.appendChild(stateSpan(d.state));
    if (d.reason) { const r = document.createElement("div"); r.className = "reason"; r.textContent = d.reason; st.appendChild(r); }
    for (const n of [d.readings, d.errors, d.restarts]) { const c = tr.insertCell(); c.className = "num"; c.textContent = fmtInt(n); }
    tr.insertCell().textContent = fmtAge(d.last_reading_age_s);
  }

  const b = s.buffer;
  if (!b) dl("buffer", [["Backlog", "unknown (buffer busy)"]]);
  else {
    const per = Object.entries(b.backlog).filter(([, v]) => v.events).map(([k, v]) => k + " " + fmtInt(v.events)).join(", ");
    dl("buffer", [
      ["Waiting to send", fmtInt(b.events) + " events (" + fmtBytes(b.bytes) + ")"],
      ["By source", per || "none"],
      ["Oldest unsent", fmtDuration(b.oldest_unsent_age_s)],
      ["Batches unacknowledged", fmtInt(b.batches_pending) + (b.batches_quarantined ? ", " + b.batches_quarantined + " quarantined" : "")],
      ["Dropped", fmtInt(b.dropped)],
      ["Storage", stateSpan(b.degraded ? "degraded" : "ok")],
    ]);
  }
  const u = s.uplink;
  const rows = [["State", stateSpan(u.state)], ["Last acknowledgement", fmtAge(u.last_ack_age_s)]];
  if (u.state !== "disabled") rows.push(["Batches acknowledged", fmtInt(u.acked)], ["In flight", fmtInt(u.inflight)]);
  if (u.last_error) rows.push(["Last error", u.last_error]);
  rows.push(["Clock", s.clock_synchronized ? "synchronized" : "NOT synchronized"]);
  dl("uplink", rows);

  const c = s.config;
  const crow = [["Local file", c.file || "unknown"]];
  if (c.modified_ms) crow.push(["Changed", new Date(c.modified_ms).toLocaleString()]);
  // layers from the fleet, when a component applies any; until then the local file is the whole config
  if (c.layers.length) crow.push(["Fleet layers", c.layers.map((l) => [l.name, l.version].filter(Boolean).join(" ")).join(", ")]);
  dl("config", crow);
}

// ---------------------------------------------------------------- polling
function showBanner(text) { const b = byId("banner"); b.textContent = text; b.hidden = !text; }

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  if (r.status === 401) throw new Error("token");
  if (!r.ok) throw new Error("HTTP " + r.status);
  return r.json();
}

async function poll() {
  try {
    const [s, a] = await Promise.all([getJson("/api/status"), getJson("/api/analytics")]);
    renderStatus(s);
    renderAnalytics(a);
    showBanner("");
  } catch (e) {
    showBanner(e.message === "token"
      ? "Access token needed: open this page with ?token=… (edge status on the device shows the link)."
      : "No answer from the device; retrying…");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", poll);
