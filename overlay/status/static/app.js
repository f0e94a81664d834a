// The fleet page: polls /status, /api/history and /healthz every second and redraws.
// Vanilla JS and inline SVG only: status pages run on machines without internet access.
"use strict";

const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
// Colour-blind-friendly palette (Okabe-Ito), assigned by sorted name so colours stay put across refreshes.
const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];

const $ = (id) => document.getElementById(id);

function colourOf(series, name) {
  const index = series.indexOf(name);
  return index < 0 ? "#999" : PALETTE[index % PALETTE.length];
}

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatNumber(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Math.abs(value) >= 1e9) return (value / 1e9).toFixed(2) + " G";
  if (Math.abs(value) >= 1e6) return (value / 1e6).toFixed(2) + " M";
  if (Math.abs(value) >= 1e4) return (value / 1e3).toFixed(1) + " k";
  return Number.isInteger(value) ? String(value) : value.toFixed(Math.abs(value) >= 100 ? 0 : 1);
}

function formatDuration(seconds) {
  if (typeof seconds !== "number") return "–";
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24, m = Math.floor(seconds / 60) % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  return `${m}m ${Math.floor(seconds % 60)}s`;
}

function fillTable(id, rows) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const cell of cells) {
      const td = el("td");
      if (cell instanceof Node) td.append(cell);
      else td.textContent = cell;
      tr.append(td);
    }
    return tr;
  }));
}

function sortedEntries(object) {
  return Object.entries(object || {}).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
}

// Share of each series over the most recent `seconds` of history (null when nothing flowed).
function recentShare(history, seconds) {
  const totals = {};
  let sum = 0;
  for (const sample of history.samples.filter((s) => s.age < seconds)) {
    for (const [name, pps] of Object.entries(sample.pps)) {
      totals[name] = (totals[name] || 0) + pps * sample.span;
      sum += pps * sample.span;
    }
  }
  const shares = {};
  for (const name of history.series) shares[name] = sum > 0 ? (totals[name] || 0) / sum : null;
  return shares;
}

function latestRate(history, name) {
  const last = history.samples[history.samples.length - 1];
  return last ? last.pps[name] : undefined;
}

// Stacked bars: one per second, each split by the series' share of that second's packets.
function drawShareChart(history) {
  const svg = $("share-chart");
  const width = 640, height = 220, left = 36, bottom = 20, top = 6, window = 60;
  const plotW = width - left - 4, plotH = height - top - bottom;
  const nodes = [];
  for (const pct of [0, 25, 50, 75, 100]) {
    const y = top + plotH * (1 - pct / 100);
    nodes.push(el("svg:line", { x1: left, x2: width - 4, y1: y, y2: y, class: "grid" }));
    nodes.push(el("svg:text", { x: left - 4, y: y + 4, "text-anchor": "end", class: "axis" }, pct + "%"));
  }
  for (const age of [60, 45, 30, 15, 0]) {
    const x = left + plotW * (1 - age / window);
    const anchor = age === window ? "start" : age === 0 ? "end" : "middle";
    nodes.push(el("svg:text", { x, y: height - 4, "text-anchor": anchor, class: "axis" }, age ? `-${age}s` : "now"));
  }
  const barW = plotW / window;
  let bars = 0;
  for (const sample of history.samples) {
    if (sample.age >= window) continue;
    const total = Object.values(sample.pps).reduce((a, b) => a + b, 0);
    if (!(total > 0)) continue;
    const x = left + plotW * (1 - (sample.age + sample.span) / window);
    const w = Math.max(1, barW * sample.span - 1);
    let y = top + plotH;
    for (const name of history.series) {
      const share = (sample.pps[name] || 0) / total;
      if (share <= 0) continue;
      const h = plotH * share;
      y -= h;
      const bar = el("svg:rect", { x: Math.max(left, x), y, width: w, height: h, fill: colourOf(history.series, name), class: "bar" });
      bar.append(el("svg:title", {}, `${name}: ${(share * 100).toFixed(1)}% (${formatNumber(sample.pps[name] || 0)} pps)`));
      nodes.push(bar);
    }
    bars += 1;
  }
  if (!bars) nodes.push(el("svg:text", { x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle", class: "empty" }, "no traffic in the last minute"));
  svg.replaceChildren(...nodes);
  svg.dataset.bars = String(bars);
  $("legend").replaceChildren(...history.series.map((name) => {
    const item = el("span", { class: "legend-item" });
    item.append(el("span", { class: "swatch", style: `background:${colourOf(history.series, name)}` }), name);
    return item;
  }));
}

function drawDropChart(history) {
  const svg = $("drop-chart");
  const width = 300, height = 40, window = 60;
  const points = history.samples.filter((s) => s.age < window && s.drops_pps !== null);
  const peak = Math.max(1, ...points.map((s) => s.drops_pps));
  const path = points.map((s, i) => {
    const x = width * (1 - s.age / window);
    const y = height - 2 - (height - 4) * (s.drops_pps / peak);
    return `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
  }).join(" ");
  const quiet = points.every((s) => s.drops_pps === 0);
  svg.replaceChildren(el("svg:path", { d: path || "M0,38 L300,38", class: quiet ? "drops-line quiet" : "drops-line" }));
  const last = points[points.length - 1];
  $("drop-rate").textContent = last ? `${formatNumber(last.drops_pps)}/s now` : "";
}

function renderStatus(status, history) {
  $("node-name").textContent = status.name || "?";
  $("node-role").textContent = status.role || "?";
  const config = status.config || {};
  $("node-facts").textContent = [
    `version ${status.version || "?"}`,
    `up ${formatDuration(status.uptime_s)}`,
    `config gen ${config.generation ?? "?"}`,
    config.hash ? `hash ${String(config.hash).slice(0, 12)}` : null,
  ].filter(Boolean).join(" · ");

  const isDistributor = status.role === "distributor";
  const members = isDistributor ? status.tms || {} : status.peers || {};
  $("members-title").textContent = isDistributor ? "TMs" : "Peers";
  $("share-title").textContent = `Traffic share by ${isDistributor ? "TM" : "peer"}, last 60 s`;
  const healthOf = ((status.health || {}).tms) || {};
  const shares = recentShare(history, 10);
  const series = history.series;
  // A TM's peers are distributors: no admin state, health or RTT to show for them.
  $("members").classList.toggle("peers", !isDistributor);
  fillTable("members", sortedEntries(members).map(([name, member]) => {
    const swatch = el("span", { class: "swatch", style: `background:${colourOf(series, name)}` });
    const share = shares[name];
    const traffic = [share === null || share === undefined ? "–" : (share * 100).toFixed(1) + "%", formatNumber(latestRate(history, name)), formatNumber(member.packets)];
    if (!isDistributor) return [swatch, el("span", {}, name), ...traffic];
    const health = healthOf[name] || {};
    const up = member.up ?? health.up;
    const state = el("span", { class: `state state-${member.admin || "none"}` }, member.admin || "–");
    const healthBadge = el("span", { class: `health ${up === false ? "down" : up ? "up" : ""}` }, up === undefined ? "–" : up ? "up" : "down");
    const rtt = typeof health.rtt_seconds === "number" ? (health.rtt_seconds * 1000).toFixed(1) + " ms" : "–";
    return [swatch, el("span", {}, name), state, healthBadge, ...traffic, rtt];
  }));
  $("all-down").hidden = !((status.health || {}).all_down);

  const drops = sortedEntries(status.drops).filter(([, count]) => count);
  fillTable("drops", drops.length ? drops.map(([reason, count]) => [reason, formatNumber(count)]) : [["no drops", ""]]);
  const connections = status.connections;
  $("conntrack-section").hidden = !connections;
  if (connections) {
    const table = status.table || {};
    const rows = [["entries", formatNumber(connections.total)]];
    if (table.limit !== undefined) rows.push(["limit", formatNumber(table.limit)], ["fullness", ((table.fullness || 0) * 100).toFixed(2) + "%"]);
    for (const [state, count] of sortedEntries(connections.by_state)) rows.push([state, formatNumber(count)]);
    for (const service of status.services || []) {
      for (const server of service.servers || []) rows.push([`${service.name} → ${server.address}:${server.port}`, formatNumber(server.connections)]);
    }
    fillTable("conntrack", rows);
  }
  $("cells-section").hidden = !status.cells;
  if (status.cells) fillTable("cells", sortedEntries(status.cells).map(([cell, count]) => [cell, formatNumber(count)]));
  $("reasons-section").hidden = !status.reasons;
  if (status.reasons) fillTable("reasons", sortedEntries(status.reasons).map(([reason, count]) => [reason, formatNumber(count)]));
  const reloadError = config.last_reload_error;
  $("reload-error").hidden = !reloadError;
  $("reload-error").textContent = reloadError ? `last reload refused, generation ${config.generation} stays: ${reloadError}` : "";
  fillTable("counters", sortedEntries(status.counters).map(([key, value]) => [key, formatNumber(value)]));
  drawShareChart(history);
  drawDropChart(history);
}

async function fetchJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  // /healthz answers 503 with a JSON body when not ready: that is data, not a failure.
  if (!response.ok && response.status !== 503) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function refresh() {
  try {
    const [status, history, health] = await Promise.all([fetchJson("/status"), fetchJson("/api/history"), fetchJson("/healthz")]);
    renderStatus(status, history);
    const readiness = $("readiness");
    readiness.textContent = health.ok ? "ready" : "not ready";
    readiness.className = `badge ${health.ok ? "up" : "down"}`;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.classList.remove("stale");
  } catch (error) {
    $("updated").textContent = `update failed: ${error.message}`;
    document.body.classList.add("stale");
  }
  setTimeout(refresh, POLL_MS);
}

refresh();
