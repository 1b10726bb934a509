// pymooncake master cluster page: polls /api/v1/cluster every 2 s and rewrites
// the numbers, tables and rate charts. Plain JavaScript, no library; every
// string from the cluster goes into the DOM as text, never as markup.
"use strict";

(function () {
  const POLL_MS = 2000;

  function bytes(n) {
    const units = [["TB", 2 ** 40], ["GB", 2 ** 30], ["MB", 2 ** 20], ["KB", 2 ** 10]];
    for (const [unit, size] of units) {
      if (n >= size) return (n / size).toFixed(2) + " " + unit;
    }
    return n + " B";
  }

  function pct(used, cap) {
    return cap ? (used / cap * 100).toFixed(1) + "%" : "0.0%";
  }

  function setStat(id, value, text, sub) {
    const el = document.getElementById(id);
    if (!el) return;
    el.dataset.value = String(value);
    el.textContent = text;
    const subEl = document.getElementById(id + "-sub");
    if (subEl && sub !== undefined) subEl.textContent = sub;
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function renderSegments(segments) {
    const body = document.getElementById("segments");
    const rows = [];
    for (const s of segments) {
      const tr = document.createElement("tr");
      cell(tr, s.name);
      cell(tr, s.id.slice(0, 8), "mono");
      cell(tr, s.client_id.slice(0, 8), "mono");
      const use = cell(tr, bytes(s.allocated_bytes) + " / " + bytes(s.capacity_bytes) +
        " (" + pct(s.allocated_bytes, s.capacity_bytes) + ")");
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = (s.capacity_bytes ? s.allocated_bytes / s.capacity_bytes * 100 : 0).toFixed(1) + "%";
      bar.appendChild(fill);
      use.appendChild(bar);
      cell(tr, String(s.objects));
      cell(tr, s.status);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  function renderClients(clients) {
    const body = document.getElementById("clients");
    const rows = [];
    for (const c of clients) {
      const tr = document.createElement("tr");
      cell(tr, c.id, "mono");
      cell(tr, c.host);
      cell(tr, c.last_ping_s + " s ago");
      cell(tr, c.status, c.status);
      cell(tr, String(c.segments));
      cell(tr, String(c.writing));
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  function chart(id, points) {
    const svg = document.getElementById(id);
    if (!svg) return;
    const ns = "http://www.w3.org/2000/svg";
    const parts = [];
    const base = document.createElementNS(ns, "line");
    base.setAttribute("x1", "0"); base.setAttribute("x2", "300");
    base.setAttribute("y1", "59"); base.setAttribute("y2", "59");
    base.setAttribute("class", "base");
    parts.push(base);
    const caption = document.getElementById(id + "-sub");
    if (points.length > 1) {
      const t0 = points[0][0], t1 = points[points.length - 1][0];
      const top = Math.max(1e-9, ...points.map((p) => p[1]));
      const xy = points.map((p) =>
        ((p[0] - t0) / Math.max(1e-9, t1 - t0) * 300).toFixed(1) + "," +
        (58 - p[1] / top * 54).toFixed(1));
      const area = document.createElementNS(ns, "polygon");
      area.setAttribute("points", "0,59 " + xy.join(" ") + " 300,59");
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", xy.join(" "));
      parts.push(area, line);
      if (caption) {
        const span = t1 - t0;
        caption.textContent = "last " + (span < 120 ? Math.round(span) + " s" :
          Math.round(span / 60) + " min") + ", peak " + top.toFixed(1) + "/s";
      }
    } else if (caption) {
      caption.textContent = "collecting samples...";
    }
    svg.replaceChildren(...parts);
  }

  function render(view) {
    const t = view.totals;
    setStat("capacity-bytes", t.allocated_bytes,
      bytes(t.allocated_bytes) + " / " + bytes(t.capacity_bytes), pct(t.allocated_bytes, t.capacity_bytes));
    setStat("key-count", t.keys, String(t.keys),
      t.soft_pinned_keys + " soft-pinned, " + t.writing_keys + " being written");
    setStat("segment-count", t.segments, String(t.segments), bytes(t.capacity_bytes));
    setStat("client-count", t.clients, String(t.clients), "");
    const role = document.getElementById("role");
    role.textContent = view.role;
    role.className = "pill role-" + view.role;
    document.getElementById("leader").textContent =
      view.role !== "leader" && view.leader ? "leader at " + view.leader : "";
    document.getElementById("uptime").textContent = view.uptime_s.toFixed(0);
    for (const key of ["put", "get", "evict"]) {
      document.getElementById("rate-" + key).textContent = view.rates[key].toFixed(1) + "/s";
      chart("chart-" + key, view.history.map((h) => [h.t, h[key]]));
    }
    renderSegments(view.segments);
    renderClients(view.clients);
  }

  async function poll() {
    const updated = document.getElementById("updated");
    try {
      const resp = await fetch("/api/v1/cluster", { credentials: "same-origin", cache: "no-store" });
      if (resp.status === 401) {
        updated.textContent = "session expired: reload to log in";
        updated.className = "muted right stale";
        return;
      }
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      render(await resp.json());
      updated.textContent = "updated " + new Date().toLocaleTimeString();
      updated.className = "muted right";
    } catch (err) {
      updated.textContent = "master unreachable (" + err.message + "), retrying";
      updated.className = "muted right stale";
    }
    setTimeout(poll, POLL_MS);
  }

  const initial = document.getElementById("initial");
  if (initial) render(JSON.parse(initial.textContent));
  setTimeout(poll, POLL_MS);
})();
