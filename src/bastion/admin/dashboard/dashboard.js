// Bastion dashboard: polls the admin API of the listener that served this page and redraws.
//
// Plain JavaScript, no framework, no build step, no other host: every request goes to a path
// relative to this page (GET status, routes, upstreams, stats, errors). Everything that comes
// from the gateway is put in the page as text, never as markup.
//
// Token (when admin.token is set): taken from the URL fragment (#token=...), which browsers
// never send to the server, or typed into the form the page shows on a 401; kept in this tab's
// sessionStorage and sent as "Authorization: Bearer ...".
//
// Query parameters: ?refresh=SECONDS (default 2), ?window=1m|5m (the traffic window).

"use strict";

const TOKEN_KEY = "bastion.admin.token";
const WINDOW_KEY = "bastion.dashboard.window";
const WINDOWS = ["1m", "5m"];

const query = new URLSearchParams(location.search);
const refreshMs = Math.min(Math.max(Number(query.get("refresh")) || 2, 0.25), 60) * 1000;
let trafficWindow = [query.get("window"), sessionStorage.getItem(WINDOW_KEY)].find((w) => WINDOWS.includes(w)) || "1m";
let token = tokenFromFragment() || sessionStorage.getItem(TOKEN_KEY);
let timer = null;

class Unauthorized extends Error {}

// --- talking to the admin API ----------------------------------------------------------------

function tokenFromFragment() {
  const value = new URLSearchParams(location.hash.slice(1)).get("token");
  if (!value) return null;
  sessionStorage.setItem(TOKEN_KEY, value);
  history.replaceState(null, "", location.pathname + location.search); // out of the address bar
  return value;
}

async function api(path) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) throw new Error(`${path} answered ${response.status}`);
  return response.json();
}

async function poll() {
  timer = null;
  try {
    const [status, routes, upstreams, stats, errors] = await Promise.all([
      api("status"),
      api("routes"),
      api("upstreams"),
      api(`stats?window=${trafficWindow}`),
      api("errors"),
    ]);
    showStatus(status);
    showRoutes(routes.routes, stats);
    showUpstreams(upstreams.upstreams);
    showErrors(errors);
    setConnection("live", `live · updated ${clock(Date.now() / 1000)}`);
    $("panels").classList.remove("stale");
  } catch (error) {
    if (error instanceof Unauthorized) {
      askForToken();
      return; // polling resumes when a token is given
    }
    setConnection("down", `admin API unreachable (${error.message}), retrying`);
    $("panels").classList.add("stale");
  }
  timer = setTimeout(poll, refreshMs);
}

function refreshNow() {
  if (timer !== null) {
    clearTimeout(timer);
    poll();
  } // else a poll is running (it will use the new settings) or the page waits for a token
}

// --- the token --------------------------------------------------------------------------------

function askForToken() {
  document.body.classList.add("locked");
  $("token-problem").textContent = token
    ? "The gateway refused this token."
    : "This gateway's admin API needs a token.";
  $("token-form").hidden = false;
  $("forget-token").hidden = true;
  $("token-input").focus();
  setConnection("locked", "waiting for the admin token");
}

function useToken(value) {
  token = value || null;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  document.body.classList.remove("locked");
  $("token-form").hidden = true;
  $("forget-token").hidden = !token;
  if (timer !== null) clearTimeout(timer);
  poll();
}

// --- drawing ----------------------------------------------------------------------------------

function $(id) {
  return document.getElementById(id);
}

// An element with attributes and children; strings become text nodes (never markup).
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}

function setConnection(state, text) {
  const node = $("connection");
  node.dataset.state = state;
  node.textContent = text;
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const parts = [[Math.floor(s / 86400), "d"], [Math.floor(s / 3600) % 24, "h"], [Math.floor(s / 60) % 60, "m"], [s % 60, "s"]];
  const first = parts.findIndex(([n]) => n > 0);
  if (first < 0) return "0s";
  return parts.slice(first, first + 2).filter(([n]) => n > 0).map(([n, unit]) => `${n}${unit}`).join(" ");
}

function number(value) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "0";
  if (Math.abs(value) < 10) return value.toFixed(2);
  if (Math.abs(value) < 100) return value.toFixed(1);
  return Math.round(value).toLocaleString();
}

function showStatus(status) {
  const config = status.config || {};
  const answered = status.workers.filter((w) => w.answered).length;
  const last = status.last_reload;
  const rows = [
    ["version", status.version],
    ["config", config.source || "–"],
    ["config version", config.version != null ? `v${config.version}` : "(file)"],
    ["config sha256", h("span", { class: "mono", title: config.sha256 || "" }, (config.sha256 || "–").slice(0, 12))],
    ["config applied", config.applied_at ? clock(config.applied_at) : "–"],
    ["uptime", duration(status.uptime_seconds)],
    ["workers", `${answered} of ${status.workers_expected} answering`],
    ["reloads", `${status.reloads.applied} applied, ${status.reloads.rejected} rejected`],
    [
      "last reload",
      last
        ? h("span", { class: last.result === "rejected" ? "bad" : null, title: (last.problems || []).join("\n") },
            `${last.result} at ${clock(last.at)}`, last.problems && last.problems.length ? ` (${last.problems[0]})` : "")
        : "none",
    ],
  ];
  $("status-list").replaceChildren(...rows.flatMap(([name, value]) => [h("dt", {}, name), h("dd", { "data-field": name }, value)]));
}

function describeMatch(route) {
  const hosts = route.hosts.length ? route.hosts.join(", ") : "any host";
  const methods = route.methods.length ? route.methods.join(",") + " " : "";
  return `${methods}${route.path_kind} ${route.path ?? ""} · ${hosts}`;
}

function trafficCells(t) {
  const status = t ? t.status : {};
  return [
    h("td", { class: "num requests" }, t ? String(t.requests) : "0"),
    h("td", { class: "num rps" }, number(t ? t.requests_per_second : 0)),
    h("td", { class: "num p50" }, number(t ? t.latency_ms.p50 : null)),
    h("td", { class: "num p99" }, number(t ? t.latency_ms.p99 : null)),
    h("td", { class: "num e4xx" }, String(status["4xx"] || 0)),
    h("td", { class: `num e5xx${status["5xx"] ? " bad" : ""}` }, String(status["5xx"] || 0)),
  ];
}

function sparkline(series) {
  const svgNS = "http://www.w3.org/2000/svg"; // a namespace name, not a request
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 100 20");
  svg.setAttribute("preserveAspectRatio", "none");
  const rates = (series || []).map((p) => (p.seconds > 0 ? p.requests / p.seconds : 0));
  const base = document.createElementNS(svgNS, "line");
  for (const [name, value] of [["x1", 0], ["y1", 19.5], ["x2", 100], ["y2", 19.5]]) base.setAttribute(name, value);
  svg.append(base);
  if (rates.length > 1) {
    const top = Math.max(...rates) || 1;
    const step = 100 / (rates.length - 1);
    const line = document.createElementNS(svgNS, "polyline");
    line.setAttribute("points", rates.map((r, i) => `${(i * step).toFixed(1)},${(19 - (r / top) * 18).toFixed(1)}`).join(" "));
    svg.append(line);
    const title = document.createElementNS(svgNS, "title");
    title.textContent = `peak ${number(top)} req/s`;
    svg.append(title);
  }
  return h("td", {}, svg);
}

function showRoutes(routes, stats) {
  const traffic = new Map(stats.routes.map((t) => [t.route, t]));
  const rows = routes.map((route) =>
    h("tr", { "data-route": route.name },
      h("td", {}, route.name),
      h("td", { class: "mono" }, describeMatch(route)),
      h("td", {}, route.upstream),
      trafficCells(traffic.get(route.name)),
      sparkline(traffic.get(route.name)?.series)));
  const listed = new Set(routes.map((r) => r.name));
  for (const t of stats.routes.filter((t) => !listed.has(t.route))) {
    const label = t.route === "(none)" ? "(no route)" : `${t.route} (gone)`;
    rows.push(h("tr", { "data-route": t.route, class: "gone" }, h("td", {}, label), h("td", {}), h("td", {}), trafficCells(t), sparkline(t.series)));
  }
  rows.push(h("tr", { class: "total", "data-route": "" }, h("td", {}, "all"), h("td", {}), h("td", {}), trafficCells(stats.total), h("td", {})));
  $("routes-body").replaceChildren(...rows);
  const covered = stats.covered_seconds < stats.window_seconds ? ` (gateway up ${duration(stats.covered_seconds)})` : "";
  $("window-label").textContent = `last ${duration(stats.window_seconds)}${covered}`;
}

// up, down (health checks fail), ejected (passive checks), draining (by the admin API), partial
// (workers disagree: up in some, not in others).
function targetState(t) {
  if (t.drained) return "draining";
  if (t.workers > 1 && t.workers_up > 0 && t.workers_up < t.workers) return "partial";
  if (!t.healthy) return "down";
  if (t.ejected) return "ejected";
  return t.up ? "up" : "down";
}

function targetNote(t, state) {
  const notes = [];
  if (t.health_reason && state !== "up") notes.push(t.health_reason);
  if (t.workers > 1 && state !== "up") notes.push(`up in ${t.workers_up} of ${t.workers} workers`);
  if (t.drained && t.in_flight) notes.push(`${t.in_flight} requests finishing`);
  return notes.join("; ");
}

function showUpstreams(upstreams) {
  const blocks = upstreams.map((u) => {
    const up = u.targets.filter((t) => targetState(t) === "up").length;
    const rows = u.targets.map((t) => {
      const state = targetState(t);
      return h("tr", { "data-target": t.address, "data-upstream": u.name, "data-state": state },
        h("td", { class: "mono" }, t.address, t.backup ? h("span", { class: "muted" }, " backup") : null),
        h("td", {}, h("span", { class: "state", "data-state": state }, state)),
        h("td", { class: "num" }, String(t.weight)),
        h("td", { class: "num in-flight" }, String(t.in_flight)),
        h("td", { class: "num ewma" }, number(t.latency_ewma_ms)),
        h("td", { class: "num" }, String(t.requests)),
        h("td", { class: "num" }, String(t.failures)),
        h("td", { class: "num" }, String(t.ejections)),
        h("td", { class: "num" }, `${t.pool.open ?? 0} / ${t.pool.idle ?? 0}`),
        h("td", { class: "muted note" }, targetNote(t, state)));
    });
    const head = ["target", "state", "weight", "in flight", "EWMA ms", "requests", "failures", "ejections", "conns / idle", ""];
    return h("div", { "data-upstream": u.name },
      h("h3", {}, u.name, h("small", {}, ` ${u.balance} · ${up} of ${u.targets.length} up${u.queue_waiting ? ` · ${u.queue_waiting} waiting` : ""}`)),
      h("table", {},
        h("thead", {}, h("tr", {}, head.map((name, i) => h("th", { class: i >= 2 && i <= 8 ? "num" : null }, name)))),
        h("tbody", {}, rows)));
  });
  $("upstreams-body").replaceChildren(...(blocks.length ? blocks : [h("p", { class: "muted" }, "No upstreams.")]));
}

function showErrors(data) {
  const rows = data.errors.map((e) =>
    h("tr", { "data-request-id": e.request_id },
      h("td", {}, clock(e.at)),
      h("td", { class: "num bad" }, String(e.status)),
      h("td", {}, e.error || `from ${e.source}`, e.message ? h("div", { class: "muted" }, e.message) : null),
      h("td", {}, e.route),
      h("td", { class: "mono" }, `${e.method} ${e.host || ""}${e.path}`),
      h("td", { class: "mono" }, e.target || "–"),
      h("td", { class: "num" }, number(e.duration_ms)),
      h("td", { class: "mono" }, e.request_id)));
  if (!rows.length) rows.push(h("tr", {}, h("td", { class: "empty", colspan: 8 }, "No errors since the gateway started.")));
  $("errors-body").replaceChildren(...rows);
  $("errors-seen").textContent = data.seen ? `${data.seen} since start, newest ${data.kept} per process kept` : "";
}

// --- start --------------------------------------------------------------------------------------

function showWindowChoice() {
  for (const button of document.querySelectorAll("[data-window]")) {
    button.setAttribute("aria-pressed", String(button.dataset.window === trafficWindow));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("[data-window]")) {
    button.addEventListener("click", () => {
      trafficWindow = button.dataset.window;
      sessionStorage.setItem(WINDOW_KEY, trafficWindow);
      showWindowChoice();
      refreshNow();
    });
  }
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useToken($("token-input").value.trim());
    $("token-input").value = "";
  });
  $("forget-token").addEventListener("click", () => useToken(null));
  $("forget-token").hidden = !token;
  showWindowChoice();
  poll();
});
