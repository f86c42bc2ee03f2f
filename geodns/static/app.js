// geodns status page: polls the ops API (same origin) and renders the fleet.
// No build step, no libraries, no requests to any other host. Everything shown is
// built with textContent / DOM nodes (never innerHTML), so API strings stay text.
"use strict";

(() => {
  const POLL_MS = 2000;
  const TIMEOUT_MS = 8000;
  const TOKEN_KEY = "geodns.token";
  const AUDIT_SHOWN = 20;
  const TRANSITIONS_SHOWN = 20;
  const SVG_NS = "http://www.w3.org/2000/svg";

  // Effective state as the page shows it: text + colour (Okabe–Ito) + shape.
  const STATES = {
    up: { label: "UP", shape: "circle", help: "checks pass; answered" },
    down: { label: "DOWN", shape: "triangle", help: "checks fail; not answered" },
    unknown: { label: "UNKNOWN", shape: "diamond", help: "no verdict yet (answered)" },
    drained: { label: "DRAINED", shape: "square", help: "taken out by an operator" },
    stale: { label: "STALE", shape: "ring", help: "no recent check results" },
  };

  const $ = (sel) => document.querySelector(sel);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.setAttribute("class", v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function appendAll(el, children) {
    for (const c of children.flat(3)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : String(c));
    }
  }

  // ------------------------------------------------------------------ the API

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  class ApiProblem extends Error {
    constructor(status, doc) {
      const title = (doc && doc.title) || (status ? `HTTP ${status}` : "API unreachable");
      const detail = (doc && doc.detail) || "";
      super(detail ? `${title}: ${detail}` : title);
      this.status = status;
      this.title = title;
      this.detail = detail;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const secret = token();
    if (secret) headers.Authorization = "Bearer " + secret;
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    init.signal = ctl.signal;
    let resp;
    try {
      resp = await fetch(path, init); // relative: the API that served this page
    } catch (e) {
      const why = e && e.name === "AbortError" ? `no answer within ${TIMEOUT_MS / 1000} s` : String((e && e.message) || e);
      throw new ApiProblem(0, { title: "API unreachable", detail: why });
    } finally {
      clearTimeout(timer);
    }
    let doc = null;
    try {
      doc = await resp.json();
    } catch {
      doc = null;
    }
    if (!resp.ok) throw new ApiProblem(resp.status, doc || { title: resp.statusText });
    return doc;
  }

  async function allSites() {
    const out = [];
    let cursor = null;
    for (let page = 0; page < 20; page++) {
      const q = "v1/sites?limit=1000" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : "");
      const doc = await api("GET", q);
      out.push(...doc.items);
      cursor = doc.next;
      if (!cursor) break;
    }
    return out;
  }

  const enc = encodeURIComponent;

  // ------------------------------------------------------------------ formatting

  function siteState(site) {
    if (site.effective === "drained") return "drained";
    if (site.stale) return "stale";
    if (site.override && site.override.state === "up") return "up";
    if (site.effective === "down") return "down";
    if (site.observed === "unknown") return "unknown";
    return "up";
  }

  function ago(iso) {
    if (!iso) return "—";
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return iso;
    const s = Math.round((Date.now() - t) / 1000);
    const a = Math.abs(s);
    let text;
    if (a < 60) text = `${a} s`;
    else if (a < 3600) text = `${Math.round(a / 60)} min`;
    else if (a < 86400 * 2) text = `${Math.round(a / 3600)} h`;
    else text = `${Math.round(a / 86400)} d`;
    return s >= 0 ? `${text} ago` : `in ${text}`;
  }

  function when(iso) {
    if (!iso) return "—";
    return h("time", { datetime: iso, title: iso }, ago(iso));
  }

  function pct(share) {
    if (share === null || share === undefined) return "—";
    const p = share * 100;
    return (p >= 10 || p === 0 ? p.toFixed(0) : p.toFixed(1)) + "%";
  }

  function shapeOf(state, x, y, r) {
    const cls = "shape";
    switch (STATES[state].shape) {
      case "triangle":
        return svg("polygon", { class: cls, points: `${x - r * 1.15},${y - r * 0.8} ${x + r * 1.15},${y - r * 0.8} ${x},${y + r * 1.2}` });
      case "diamond":
        return svg("polygon", { class: cls, points: `${x},${y - r * 1.3} ${x + r * 1.3},${y} ${x},${y + r * 1.3} ${x - r * 1.3},${y}` });
      case "square":
        return svg("rect", { class: cls, x: x - r * 0.95, y: y - r * 0.95, width: r * 1.9, height: r * 1.9 });
      case "ring":
        return svg("circle", { class: cls + " ring", cx: x, cy: y, r: r * 0.85, "stroke-width": r * 0.5 });
      default:
        return svg("circle", { class: cls, cx: x, cy: y, r });
    }
  }

  function badge(state) {
    const icon = svg("svg", { viewBox: "-10 -10 20 20", class: "badge-icon", "aria-hidden": "true", focusable: "false" }, shapeOf(state, 0, 0, 6));
    return h("span", { class: `badge state-${state}` }, icon, STATES[state].label);
  }

  function emptyRow(tbody, cols, text) {
    tbody.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: cols }, text)));
  }

  function cell(label, ...content) {
    return h("td", { "data-label": label }, ...content);
  }

  // ------------------------------------------------------------------ map

  function drawGraticule() {
    const g = $("#graticule");
    for (let lon = -150; lon <= 150; lon += 30) g.append(svg("line", { x1: lon, y1: -90, x2: lon, y2: 90 }));
    for (let lat = -60; lat <= 60; lat += 30) {
      g.append(svg("line", { x1: -180, y1: -lat, x2: 180, y2: -lat, class: lat === 0 ? "equator" : null }));
    }
  }

  function drawLegend() {
    const ul = $("#legend");
    for (const [state, info] of Object.entries(STATES)) {
      ul.append(h("li", {}, badge(state), h("span", { class: "muted" }, info.help)));
    }
  }

  function overlaps(a, b) {
    return a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height;
  }

  function renderMap(sites, shares) {
    const map = $("#map");
    const markers = $("#markers");
    const labels = $("#labels");
    const width = map.getBoundingClientRect().width || 720;
    const k = 360 / Math.max(width, 240); // map units per CSS pixel: constant on-screen size
    const r = 6 * k;
    const fs = 12 * k;
    const placed = [];
    const nodes = [];
    markers.replaceChildren();
    labels.replaceChildren();
    const sorted = [...sites].sort((a, b) => a.location.lon - b.location.lon || a.name.localeCompare(b.name));
    for (const site of sorted) {
      const state = siteState(site);
      const x = Math.max(-178, Math.min(178, site.location.lon));
      const y = Math.max(-82, Math.min(58, -site.location.lat));
      const share = shares.get(site.name);
      const shareText = share === null || share === undefined ? "" : ` ${pct(share)}`;
      const g = svg("g", { class: `marker state-${state}`, "data-site": site.name, "data-state": state },
        svg("title", {}, `${site.name}: ${STATES[state].label}${shareText ? "," + shareText + " of answers" : ""}`),
        shapeOf(state, x, y, r));
      markers.append(g);
      placed.push({ x: x - r * 1.4, y: y - r * 1.4, width: r * 2.8, height: r * 2.8 });
      nodes.push({ site, state, x, y, text: `${site.name} ${STATES[state].label}${shareText}` });
    }
    for (const n of nodes) {
      const text = svg("text", { class: `label state-${n.state}`, "data-site": n.site.name, "font-size": fs }, n.text);
      labels.append(text);
      let best = null;
      for (const side of [1, -1]) {
        for (const step of [0, 1, -1, 2, -2, 3, -3]) {
          const tx = n.x + side * r * 1.7;
          const ty = n.y + fs * 0.35 + step * fs * 1.3;
          text.setAttribute("x", tx);
          text.setAttribute("y", ty);
          text.setAttribute("text-anchor", side > 0 ? "start" : "end");
          const bb = text.getBBox();
          const inside = bb.x >= -180 && bb.x + bb.width <= 180 && bb.y >= -84 && bb.y + bb.height <= 60;
          if (inside && !placed.some((p) => overlaps(p, bb))) {
            best = { tx, ty, bb, side, step };
            break;
          }
        }
        if (best) break;
      }
      if (!best) {
        const bb = text.getBBox();
        best = { tx: n.x + r * 1.7, ty: n.y + fs * 0.35, bb, side: 1, step: 0 };
      }
      text.setAttribute("x", best.tx);
      text.setAttribute("y", best.ty);
      text.setAttribute("text-anchor", best.side > 0 ? "start" : "end");
      placed.push(best.bb);
      if (best.step !== 0) {
        labels.prepend(svg("line", { class: "leader", x1: n.x, y1: n.y, x2: best.tx, y2: best.ty - fs * 0.35, "stroke-width": k }));
      }
    }
  }

  // ------------------------------------------------------------------ sites table

  const rows = new Map(); // site name -> { tr, cells }

  function siteRow(name) {
    let row = rows.get(name);
    if (row) return row;
    const tr = h("tr", { "data-site": name });
    const labels = ["Site", "Effective", "Observed", "Since", "Last check", "Override", "Pools", "Names served", "Answers"];
    const cells = labels.map((l, i) => (i === 0 ? h("th", { scope: "row", "data-label": l }) : cell(l)));
    const drain = h("button", { type: "button", class: "drain", "aria-label": `Drain ${name}`, onclick: () => setOverride(name, true) }, "Drain");
    const undrain = h("button", { type: "button", class: "undrain", "aria-label": `Undrain ${name}`, onclick: () => setOverride(name, false) }, "Undrain");
    const actions = cell("Actions", h("div", { class: "actions" }, drain, undrain));
    tr.append(...cells, actions);
    row = { tr, cells };
    rows.set(name, row);
    return row;
  }

  function lastCheck(site) {
    const checks = (site.targets || []).filter((t) => t.last_check);
    if (!site.check) return h("span", { class: "muted" }, "no health check");
    if (!checks.length) return h("span", { class: "muted" }, `${site.check.kind}: not checked yet`);
    return checks.map((t) => {
      const c = t.last_check;
      const who = t.address ? `${t.address}: ` : "";
      const result = c.ok ? h("span", { class: "ok" }, "ok") : h("span", { class: "fail" }, "failed");
      return h("div", {}, who, result, ` ${c.latency_ms.toFixed(1)} ms`, c.error ? ` (${c.error})` : "", " · ", when(c.at));
    });
  }

  function overrideText(o) {
    if (!o) return h("span", { class: "muted" }, "none");
    const what = o.state === "down" ? "drained" : "forced up";
    const expires = o.expires_at ? ["; expires ", when(o.expires_at)] : "; no expiry";
    return h("div", {}, h("strong", {}, what), ` by ${o.who}`, " · ", when(o.created_at), expires,
      h("div", { class: "reason" }, `“${o.reason}”`));
  }

  function renderSites(sites, shares, answers) {
    const tbody = $("#sites-table tbody");
    const names = sites.map((s) => s.name);
    for (const name of [...rows.keys()]) {
      if (!names.includes(name)) {
        rows.get(name).tr.remove();
        rows.delete(name);
      }
    }
    if (!sites.length) {
      emptyRow(tbody, 10, "No sites are configured.");
      return;
    }
    tbody.querySelectorAll("tr.empty").forEach((tr) => tr.remove());
    sites.forEach((site, i) => {
      const { tr, cells } = siteRow(site.name);
      const state = siteState(site);
      tr.dataset.state = state;
      const observed = [h("span", { class: `observed obs-${site.observed}` }, site.observed.toUpperCase())];
      if (site.stale) observed.push(h("span", { class: "muted" }, " (stale)"));
      if (site.addresses_down && site.addresses_down.length) observed.push(h("div", { class: "muted" }, "down: " + site.addresses_down.join(", ")));
      // load balancing: flap damping holds the site DOWN; a ramp moves clients gradually
      if (site.damping && site.damping.damped) observed.push(h("div", { class: "fail" }, "held DOWN (flapping) until ", when(site.damping.until)));
      if (site.ramp) observed.push(h("div", { class: "muted" }, `${site.ramp.kind === "up" ? "slow start" : "ramped drain"}: ${Math.round(site.ramp.share * 100)}% of its clients`));
      const names = site.names || [];
      const content = [
        [site.name],
        [badge(state)],
        observed,
        [when(site.since)],
        [lastCheck(site)],
        [overrideText(site.override)],
        [site.pools.length ? site.pools.join(", ") : h("span", { class: "muted" }, "none")],
        [names.length ? h("ul", { class: "names" }, names.map((n) => h("li", {}, n))) : h("span", { class: "muted" }, "none"), site.names_truncated ? h("span", { class: "muted" }, "(more)") : null],
        [`${pct(shares.get(site.name))} (${answers.get(site.name) || 0})`],
      ];
      content.forEach((c, j) => cells[j].replaceChildren(...c.flat().filter((x) => x !== null)));
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    });
  }

  function renderShare(sites, stats) {
    const tbody = $("#share tbody");
    const span = stats ? stats.span_s : 0;
    const windowText = !stats
      ? "Answer counts are unavailable."
      : span + 1 < stats.window_s
        ? `Geo-steered answers since the server started (${Math.round(span)} s ago), ${stats.total} in all.`
        : `Geo-steered answers over the last ${Math.round(stats.window_s / 60)} min, ${stats.total} in all.`;
    $("#share-window").textContent = windowText;
    if (!sites.length) {
      emptyRow(tbody, 3, "No sites.");
      return;
    }
    const byName = new Map((stats ? stats.sites : []).map((s) => [s.site, s]));
    tbody.replaceChildren(...sites.map((site) => {
      const s = byName.get(site.name) || { answers: 0, share: null };
      const bar = h("span", { class: "bar" }, h("span", { class: `fill state-${siteState(site)}` }));
      bar.firstChild.style.width = `${Math.round((s.share || 0) * 100)}%`;
      return h("tr", { "data-site": site.name },
        h("th", { scope: "row" }, site.name),
        h("td", { class: "share-cell" }, bar, h("span", { class: "share-pct" }, pct(s.share))),
        h("td", { class: "num" }, String(s.answers)));
    }));
  }

  // ------------------------------------------------------------------ lists

  function renderTransitions(sites) {
    const tbody = $("#transitions tbody");
    const all = [];
    const errors = [];
    for (const s of sites) {
      for (const t of s.transitions || []) all.push({ site: s.name, ...t });
      if (s.transitions_error) errors.push(`${s.name}: ${s.transitions_error}`);
    }
    all.sort((a, b) => (b.at || "").localeCompare(a.at || "") || b.id - a.id);
    $("#transitions-note").textContent = errors.join("; ");
    if (!all.length) {
      emptyRow(tbody, 5, "No transitions recorded.");
      return;
    }
    tbody.replaceChildren(...all.slice(0, TRANSITIONS_SHOWN).map((t) => h("tr", {},
      cell("When", when(t.at)),
      cell("Site", t.address ? `${t.site} (${t.address})` : t.site),
      cell("Change", h("span", { class: `obs-${t.old}` }, t.old.toUpperCase()), " → ", h("span", { class: `obs-${t.new}` }, t.new.toUpperCase())),
      cell("Reason", t.reason),
      cell("Node", t.node))));
  }

  function detailText(detail) {
    if (!detail || typeof detail !== "object") return "";
    return Object.entries(detail)
      .filter(([, v]) => v !== null && v !== undefined && v !== "")
      .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`)
      .join("; ");
  }

  function renderAudit(audit) {
    const tbody = $("#audit tbody");
    if (audit instanceof Error) {
      $("#audit-note").textContent = `Audit log unavailable: ${audit.message}`;
      return;
    }
    $("#audit-note").textContent = "";
    if (!audit.items.length) {
      emptyRow(tbody, 5, "No audit entries yet.");
      return;
    }
    tbody.replaceChildren(...audit.items.slice(0, AUDIT_SHOWN).map((a) => h("tr", { "data-id": a.id },
      cell("When", when(a.at)),
      cell("Who", a.who),
      cell("Action", a.action),
      cell("Target", a.target),
      cell("Detail", detailText(a.detail)))));
  }

  function renderZones(zones) {
    const tbody = $("#zones tbody");
    if (zones instanceof Error) {
      $("#zones-note").textContent = `Zones unavailable: ${zones.message}`;
      return;
    }
    $("#zones-note").textContent = zones.next ? "More zones than shown." : "";
    if (!zones.items.length) {
      emptyRow(tbody, 6, "No zones.");
      return;
    }
    tbody.replaceChildren(...zones.items.map((z) => h("tr", { "data-zone": z.origin, class: z.error ? "has-error" : null },
      cell("Zone", z.origin),
      cell("Serial", z.serial === null ? "—" : String(z.serial)),
      cell("Records", String(z.records)),
      cell("Loaded", when(z.loaded_at)),
      cell("Serving", z.serving ? "yes" : h("span", { class: "fail" }, "no")),
      cell("Last reload error", z.error ? [h("pre", { class: "error" }, z.error), z.error_at ? when(z.error_at) : null] : h("span", { class: "muted" }, "none")))));
  }

  function renderSummary(sites) {
    const counts = {};
    for (const s of sites) {
      const st = siteState(s);
      counts[st] = (counts[st] || 0) + 1;
    }
    const parts = Object.keys(STATES).filter((st) => counts[st]).map((st) => `${counts[st]} ${STATES[st].label}`);
    const text = `${sites.length} site${sites.length === 1 ? "" : "s"}: ${parts.join(", ") || "none"}`;
    $("#summary").textContent = text;
    const trouble = Object.keys(STATES).filter((st) => st !== "up" && counts[st]).map((st) => `${counts[st]} ${STATES[st].label}`);
    document.title = trouble.length ? `geodns: ${trouble.join(", ")}` : "geodns: all up";
  }

  // ------------------------------------------------------------------ polling

  let timer = null;
  let inflight = false;
  let again = false;
  let connected = null;
  let explainNameSet = false;

  function setConnected(ok, message) {
    if (ok !== connected) {
      $("#connection").textContent = ok ? "" : `Cannot refresh: ${message}. Retrying every ${POLL_MS / 1000} s.`;
      document.body.classList.toggle("offline", !ok);
      connected = ok;
    } else if (!ok) {
      $("#connection").textContent = `Cannot refresh: ${message}. Retrying every ${POLL_MS / 1000} s.`;
    }
  }

  async function refresh() {
    if (inflight) {
      again = true;
      return;
    }
    inflight = true;
    clearTimeout(timer);
    try {
      const [list, stats, audit, zones] = await Promise.all([
        allSites(),
        api("GET", "v1/stats").catch(() => null),
        api("GET", `v1/audit?limit=${AUDIT_SHOWN}`).catch((e) => e),
        api("GET", "v1/zones?limit=1000").catch((e) => e),
      ]);
      const sites = await Promise.all(list.map((s) => api("GET", "v1/sites/" + enc(s.name)).catch(() => s)));
      const shares = new Map();
      const answers = new Map();
      for (const s of stats ? stats.sites : []) {
        shares.set(s.site, s.share);
        answers.set(s.site, s.answers);
      }
      renderSummary(sites);
      renderMap(sites, shares);
      renderShare(sites, stats);
      renderSites(sites, shares, answers);
      renderTransitions(sites);
      renderAudit(audit);
      renderZones(zones);
      if (!explainNameSet) {
        const first = sites.find((s) => s.names && s.names.length);
        if (first && !$("#explain-name").value) $("#explain-name").value = first.names[0];
        explainNameSet = true;
      }
      $("#updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
      setConnected(true);
    } catch (e) {
      setConnected(false, e.message || String(e));
    } finally {
      inflight = false;
      timer = setTimeout(refresh, again ? 0 : POLL_MS);
      again = false;
    }
  }

  // ------------------------------------------------------------------ writes

  function showResult(ok, text) {
    const out = $("#action-result");
    out.className = "action-result " + (ok ? "ok" : "fail");
    out.setAttribute("role", ok ? "status" : "alert");
    out.textContent = text;
  }

  async function setOverride(site, drain) {
    const reason = $("#reason").value.trim();
    const what = drain ? "Drain" : "Undrain";
    let body;
    if (drain) {
      body = { state: "down", reason };
      const d = $("#duration").value;
      if (d) body.expires_in_s = Number(d);
    } else if (reason) {
      body = { reason };
    }
    try {
      const doc = await api(drain ? "PUT" : "DELETE", `v1/sites/${enc(site)}/override`, body);
      if (drain) showResult(true, `Drained ${site}: answers go to other sites now.`);
      else showResult(true, doc.cleared ? `Undrained ${site}: it follows its health checks again.` : `${site} had no override.`);
    } catch (e) {
      let text = `${what} ${site} failed: ${e.status ? e.status + " " : ""}${e.title}`;
      if (e.detail) text += ` — ${e.detail}`;
      if (!token()) text += " (no API token is set: enter one under Operator)";
      showResult(false, text);
    }
    refresh();
  }

  function showTokenStatus() {
    $("#token-status").textContent = token()
      ? "A token is set for this tab (kept in session storage; not shown)."
      : "No token set: reads work, drain and undrain will be refused.";
  }

  // ------------------------------------------------------------------ explain

  function renderExplain(doc) {
    const out = $("#explain-result");
    const chosen = doc.chosen || [];
    const loc = doc.located_as;
    const where = loc ? [loc.country, loc.continent].filter(Boolean).join(", ") || "no country" : "not located";
    const answer = chosen.length
      ? chosen.map((c) => `${c.site} (${c.addresses.join(", ") || "no addresses"})`).join("; ")
      : "no site";
    const candidates = (doc.candidates || []).map((c) => h("tr", { class: c.chosen ? "chosen" : null, "data-site": c.site },
      cell("Site", c.site, c.chosen ? h("strong", {}, " ✓ chosen") : ""),
      cell("Distance", c.distance_km === null ? "—" : `${Math.round(c.distance_km)} km`),
      cell("Health", c.health),
      cell("Override", c.override),
      cell("Stale", c.stale ? "yes" : "no")));
    out.replaceChildren(
      h("p", { class: "explain-outcome" }, h("strong", {}, "Outcome: "), doc.outcome),
      h("dl", { class: "explain-facts" },
        h("dt", {}, "Chosen"), h("dd", { id: "explain-chosen" }, answer),
        h("dt", {}, "Client"), h("dd", {}, `${doc.client_address} (by ${doc.located_by}) → ${where}`),
        h("dt", {}, "Zone"), h("dd", {}, doc.zone || "none"),
        h("dt", {}, "Rule"), h("dd", {}, doc.rule || "—")),
      candidates.length
        ? h("div", { class: "table-wrap" }, h("table", { class: "stack" },
          h("thead", {}, h("tr", {}, ["Site", "Distance", "Health", "Override", "Stale"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, candidates)))
        : null,
      h("h3", {}, "Trace"),
      h("ol", { class: "trace" }, (doc.trace || []).map((line) => h("li", {}, line))));
  }

  async function explainSubmit(ev) {
    ev.preventDefault();
    const out = $("#explain-result");
    const params = new URLSearchParams();
    params.set("ip", $("#explain-ip").value.trim());
    params.set("name", $("#explain-name").value.trim());
    params.set("type", $("#explain-type").value);
    const ecs = $("#explain-ecs").value.trim();
    if (ecs) params.set("ecs", ecs);
    out.replaceChildren(h("p", { class: "muted" }, "Asking…"));
    try {
      renderExplain(await api("GET", "v1/explain?" + params.toString()));
    } catch (e) {
      out.replaceChildren(h("p", { class: "fail", role: "alert" }, `Explain failed: ${e.status ? e.status + " " : ""}${e.title}${e.detail ? " — " + e.detail : ""}`));
    }
  }

  // ------------------------------------------------------------------ start

  function start() {
    drawGraticule();
    drawLegend();
    showTokenStatus();
    $("#token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const input = $("#token");
      const value = input.value.trim();
      input.value = ""; // never kept in the page
      if (value) {
        try {
          sessionStorage.setItem(TOKEN_KEY, value);
        } catch {
          showResult(false, "This browser refuses session storage: the token cannot be kept.");
        }
      }
      showTokenStatus();
      refresh();
    });
    $("#forget-token").addEventListener("click", () => {
      try {
        sessionStorage.removeItem(TOKEN_KEY);
      } catch {
        // nothing kept
      }
      $("#token").value = "";
      showTokenStatus();
    });
    $("#explain-form").addEventListener("submit", explainSubmit);
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(refresh, 150);
    });
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
