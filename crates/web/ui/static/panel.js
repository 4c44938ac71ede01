// Panel's admin UI: every action goes through the documented REST API (/api/openapi.json),
// with the session's CSRF token in X-CSRF-Token. No external resources.
"use strict";

const csrf = () => (document.querySelector('meta[name="csrf"]') || {}).content || "";

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await res.json(); } catch (_) { /* empty body */ }
  return { status: res.status, ok: res.ok, data };
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function then(spec) {
  if (!spec) return;
  if (spec === "reload") location.reload();
  else if (spec.startsWith("goto:")) location.href = spec.slice(5);
}

function errorText(r) {
  if (r.data && r.data.fields) return r.data.fields.map(f => `${f.field}: ${f.message}`).join("\n");
  if (r.data && r.data.error) return r.data.error;
  return `The request failed (HTTP ${r.status}).`;
}

function splitSpec(spec) {
  const i = spec.indexOf(" ");
  return [spec.slice(0, i), spec.slice(i + 1)];
}

function formBody(form) {
  const body = {};
  let path = null;
  for (const f of form.querySelectorAll("input[name], select[name], textarea[name]")) {
    if (f.disabled || f.type === "file") continue;
    const v = f.value;
    if (f.hasAttribute("data-path-only")) { path = v.trim(); continue; }
    if (f.type === "number") { if (v !== "") body[f.name] = Number(v); continue; }
    if (f.tagName === "SELECT" && [...f.options].some(o => o.value === "true")) {
      if (v !== "") body[f.name] = v === "true";
      continue;
    }
    if (v === "" && f.hasAttribute("data-null-if-empty")) { body[f.name] = null; continue; }
    if (v === "" && f.hasAttribute("data-omit-if-empty")) continue;
    body[f.name] = v;
  }
  return { body, path };
}

function clearErrors(form) {
  form.querySelectorAll("[data-error-for]").forEach(e => { e.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach(e => e.removeAttribute("aria-invalid"));
  form.querySelectorAll(".form-errors, .error-summary").forEach(e => { e.textContent = ""; });
}

// Next to the button the person just pressed: how many problems, that nothing was saved, and
// which fields (by their labels), since the first of them may be far up the page.
function summarise(form, fields) {
  const summary = form.querySelector(".error-summary");
  if (!summary || !fields.length) return;
  const labels = fields.map(f => {
    const label = form.querySelector(`label[for="f-${CSS.escape(f.field)}"]`);
    return label ? label.textContent : f.field;
  });
  const n = fields.length;
  summary.textContent = `${n} problem${n === 1 ? "" : "s"}, nothing saved: ${[...new Set(labels)].join(", ")}`;
}

function showErrors(form, r) {
  const general = form.querySelector(".form-errors");
  if (r.data && r.data.fields) {
    const rest = [];
    for (const f of r.data.fields) {
      const slot = form.querySelector(`[data-error-for="${CSS.escape(f.field)}"]`);
      const input = form.querySelector(`[name="${CSS.escape(f.field)}"]`);
      if (slot) slot.textContent = f.message; else rest.push(`${f.field}: ${f.message}`);
      if (input) input.setAttribute("aria-invalid", "true");
    }
    if (general) general.textContent = rest.join("\n");
    summarise(form, r.data.fields);
  } else if (general) {
    general.textContent = errorText(r);
  }
}

document.addEventListener("submit", async (ev) => {
  const form = ev.target;
  if (!form.matches("form[data-api]")) return;
  ev.preventDefault();
  clearErrors(form);
  let [method, path] = splitSpec(form.dataset.api);
  let body;
  if (form.dataset.json) {
    try { body = JSON.parse(form.querySelector(`[name="${form.dataset.json}"]`).value); }
    catch (e) { form.querySelector(".form-errors").textContent = `Not valid JSON: ${e.message}`; return; }
    if (path.endsWith("/{name}") || method === "PUT") path = path.replace("{name}", encodeURIComponent(body.name || ""));
  } else {
    const collected = formBody(form);
    body = collected.body;
    // A key file (write-only, like a password field) becomes the secret.
    const file = form.querySelector("input[type=file][data-secret-file]");
    if (file && file.files.length) body.secret = await file.files[0].text();
    if (collected.path !== null) {
      if (!collected.path) { form.querySelector(".form-errors").textContent = "Give a name."; return; }
      path = path.replace("{name}", encodeURIComponent(collected.path));
    }
  }
  const r = await api(method, path, body);
  const result = form.querySelector("[data-result]");
  if (r.ok) {
    const notices = (r.data && r.data.notices) || [];
    if (result) result.textContent = ["Saved."].concat(notices).join(" ");
    if (!notices.length) then(form.dataset.then);
  } else {
    showErrors(form, r);
  }
});

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  if (b.dataset.confirm && !confirm(b.dataset.confirm)) return;
  const [method, path] = splitSpec(b.dataset.action);
  // data-reason names the input whose text goes as {"reason": ...} (a cancel says why).
  const body = b.dataset.reason ? { reason: document.getElementById(b.dataset.reason).value }
    : b.dataset.body ? JSON.parse(b.dataset.body) : undefined;
  const r = await api(method, path, body);
  const out = b.parentElement.querySelector("[data-result]");
  if (r.ok) {
    // Notices (a credential detached by a restore) stay on screen instead of a reload.
    const notices = (r.data && r.data.notices) || [];
    if (out) out.textContent = r.data && r.data.requeued !== undefined ? `${r.data.requeued} re-queued.` : ["Done."].concat(notices).join(" ");
    if (!notices.length) then(b.dataset.then);
  } else if (out) {
    out.textContent = errorText(r);
  } else {
    alert(errorText(r));
  }
});

// ---- relay settings: default port, check, test message ----

// Each security option carries its default port (from the settings schema), so no copy here.
function showDefaultPort() {
  const sec = document.getElementById("f-security");
  const port = document.getElementById("f-port");
  if (!sec || !port) return;
  const p = sec.selectedOptions[0] && sec.selectedOptions[0].dataset.defaultPort;
  if (!p) return;
  port.placeholder = p;
  const help = document.getElementById("h-port");
  if (help) help.textContent = `Empty = the default for the security mode: ${p}`;
}

// Only the fields the chosen modes use are shown (each field carries the settings table's
// used_by); hidden ones are disabled too, so the form never sends a field the modes refuse.
function showModeFields() {
  const mode = (id) => {
    const e = document.getElementById(id);
    return e ? (e.value || e.dataset.default || "") : "";
  };
  const transport = mode("f-transport") || "smtp";
  // Graph always signs in with OAuth2 over HTTPS (the settings table's modes, as the service has them).
  const graph = transport === "graph";
  const auth = graph ? "oauth2" : mode("f-auth"), security = graph ? "tls" : mode("f-security");
  const policy = mode("f-recipient_policy") || "deliver";
  for (const f of document.querySelectorAll("#settings-form .field[data-auth]")) {
    const t = (f.dataset.transport || "").split(" ").filter(Boolean);
    const a = f.dataset.auth.split(" ").filter(Boolean), s = f.dataset.security.split(" ").filter(Boolean);
    const p = (f.dataset.policy || "").split(" ").filter(Boolean);
    const used = (!t.length || t.includes(transport)) && (!a.length || a.includes(auth)) &&
      (!s.length || s.includes(security)) && (!p.length || p.includes(policy));
    f.hidden = !used;
    if (f.hasAttribute("data-local-only")) continue;
    f.querySelectorAll("input, select").forEach(i => { i.disabled = !used || i.dataset.viewer === "1"; });
  }
}

function replyText(reply) {
  if (!reply) return "";
  return `${reply.code}${reply.enhanced ? " " + reply.enhanced : ""} ${reply.text}`;
}

async function checkConnection() {
  const out = document.getElementById("check-result");
  out.replaceChildren(el("p", { role: "status" }, "Checking the relay…"));
  out.scrollIntoView({ block: "nearest" });
  // The form as it stands, saved or not: the service checks it without storing it.
  // (Admins only: an operator's check is of the saved settings.)
  const form = document.getElementById("save") && document.getElementById("settings-form");
  // A standby route's form checks that route as the form shows it.
  const route = form && form.dataset.route ? `?route=${encodeURIComponent(form.dataset.route)}` : "";
  const r = await api("POST", "/api/v1/smtp/check" + route, form ? formBody(form).body : {});
  if (!r.ok) { out.replaceChildren(el("p", { class: "error" }, errorText(r))); return; }
  const c = r.data;
  const rows = c.stages.map(s => el("tr", { class: s.ok ? "ok" : "bad" },
    el("td", {}, s.stage), el("td", {}, s.ok ? "✓" : "✗"), el("td", {}, s.detail), el("td", {}, replyText(s.reply))));
  const table = el("table", { id: "check-stages" },
    el("thead", {}, el("tr", {}, el("th", {}, "Stage"), el("th", {}, "OK"), el("th", {}, "Detail"), el("th", {}, "Reply"))),
    el("tbody", {}, ...rows));
  const which = c.draft ? " (checked as the form shows it; not saved)" : "";
  const verdict = c.transport === "graph"
    ? (c.ok ? `Microsoft Graph (${c.relay}) gives the app a token; the Test Message proves it may send as the mailbox.` : `Microsoft Graph (${c.relay}) would not take a message.`)
    : (c.ok ? `The relay ${c.relay} would accept a message.` : `The relay ${c.relay} would not accept a message.`);
  const parts = [el("h2", {}, verdict + which),
    el("div", { class: "scroll" }, table)];
  if (c.tls) parts.push(el("p", { id: "check-tls" }, `TLS: ${c.tls.protocol}, ${c.tls.cipher_suite}; certificate ${c.tls.subject}, issued by ${c.tls.issuer}, expires ${c.tls.not_after}, SHA-256 ${c.tls.sha256}; ${c.tls.verification}`));
  if (c.auth_mechanisms && c.auth_mechanisms.length) parts.push(el("p", {}, `AUTH mechanisms offered: ${c.auth_mechanisms.join(" ")}`));
  if (c.released) parts.push(el("p", { class: "ok", id: "check-released", role: "status" },
    `${c.released} message(s) held by a configuration error are sent again now.`));
  if (c.failure) parts.push(el("p", { class: "error", id: "check-failure", role: "alert" },
    `Failed at ${c.failure.stage} (${c.failure.class}): ${c.failure.detail}` + (c.failure.hint ? ` Hint: ${c.failure.hint_form || c.failure.hint}` : "")));
  // The saved settings' check covers every route: one line each, and the route in use.
  for (const s of c.standby || []) parts.push(el("p", { class: s.ok ? "ok" : "error", "data-route": s.route },
    `Route ${s.route} (${s.relay}): ` + (s.ok ? "passes." : `fails at ${s.failure.stage}: ${s.failure.detail}`)));
  if ((c.standby || []).length) parts.push(el("p", { id: "check-in-use", role: "status" },
    c.in_use ? `In use: route ${c.in_use}.` : "In use: none; every route fails, so messages wait and are retried."));
  out.replaceChildren(...parts);
  labelCells(out);
  out.scrollIntoView({ block: "nearest" });
}

async function testMessage() {
  const out = document.getElementById("test-result");
  const status = el("p", { id: "test-status", role: "status" }, "Queuing the Test Message…");
  out.replaceChildren(el("h2", {}, "Test Message"), status);
  out.scrollIntoView({ block: "nearest" });
  const r = await api("POST", "/api/v1/smtp/test", {});
  if (!r.ok) { status.textContent = errorText(r); status.className = "error"; return; }
  const id = r.data.id;
  const link = el("a", { href: `/messages/${id}` }, `message ${id}`);
  out.append(el("p", {}, "Follow it in the log: ", link));
  if (!r.data.service_running) {
    status.textContent = `Queued (${id}), but no Panel Service is running: the message stays queued until one starts (panel serve or panel worker).`;
    status.className = "warn";
    return;
  }
  const deadline = Date.now() + 90000;
  while (Date.now() < deadline) {
    const m = await api("GET", `/api/v1/messages/${id}`);
    if (!m.ok) { status.textContent = errorText(m); return; }
    const last = m.data.attempts[m.data.attempts.length - 1];
    if (m.data.state === "delivered") {
      status.textContent = `delivered: relay ${last.relay} said ${last.code || ""} ${last.reply || last.detail}`;
      status.className = "ok";
      return;
    }
    if (m.data.state === "partly_failed") {
      const refused = m.data.recipients.filter(r => r.state === "failed").map(r => `${r.address}: ${r.reply || ""}`);
      status.textContent = `partly failed: refused ${refused.join("; ")}`;
      status.className = "error";
      return;
    }
    if (last && (m.data.state === "failed" || m.data.state === "retrying")) {
      const code = [last.code, last.enhanced_code].filter(Boolean).join(" ");
      // Panel's own failures (its settings, a file or variable it reads) are not the relay's words.
      const said = ["config", "internal"].includes(last.stage) ? `Panel itself, not the relay: ${last.detail}`
        : `${code} ${last.reply || last.detail}`;
      status.textContent = `${m.data.state}: at ${last.stage}, ${said}` + (last.hint ? ` Hint: ${last.hint_form || last.hint}` : "");
      status.className = m.data.state === "failed" ? "error" : "warn";
      return;
    }
    status.textContent = `${m.data.state}…`;
    await new Promise(res => setTimeout(res, 300));
  }
  status.textContent = "Still not sent after 90 s; see the message log.";
}

// ---- templates: load into the editor, preview ----

async function loadTemplate(name) {
  const r = await api("GET", `/api/v1/templates/${encodeURIComponent(name)}`);
  if (!r.ok) return;
  document.getElementById("t-name").value = name;
  document.getElementById("t-subject").value = r.data.subject;
  document.getElementById("t-text").value = r.data.text;
  document.getElementById("t-html").value = r.data.html || "";
}

async function preview(ev) {
  ev.preventDefault();
  const out = document.getElementById("preview");
  const name = document.getElementById("t-name").value.trim();
  if (!name) { out.replaceChildren(el("p", { class: "error" }, "Load or name a saved template first.")); return; }
  let data;
  try { data = JSON.parse(document.getElementById("sample").value); }
  catch (e) { out.replaceChildren(el("p", { class: "error" }, `Sample data is not valid JSON: ${e.message}`)); return; }
  const r = await api("POST", `/api/v1/templates/${encodeURIComponent(name)}/render`, data);
  if (!r.ok) { out.replaceChildren(el("p", { class: "error", role: "alert" }, errorText(r))); return; }
  const parts = [el("h3", {}, `Subject: ${r.data.subject}`), el("pre", {}, r.data.text)];
  if (r.data.html) parts.push(el("h3", {}, "HTML (source)"), el("pre", {}, r.data.html));
  out.replaceChildren(...parts);
}

// On a narrow screen every table shows its rows as cards (panel.css), each cell under its
// column's name, so the reply, hint or last error is on screen without scrolling sideways.
function labelCells(root) {
  for (const table of root.querySelectorAll("table")) {
    const heads = [...table.querySelectorAll("thead th")].map(th => th.textContent.trim());
    for (const row of table.querySelectorAll("tbody tr")) {
      // A row spanning the columns ("No messages match.") is its own label.
      [...row.children].forEach((td, i) => {
        if (td.colSpan === 1 && heads[i] && td.dataset.label === undefined) td.dataset.label = heads[i];
      });
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  labelCells(document);
  const sec = document.getElementById("f-security");
  if (sec) { sec.addEventListener("change", showDefaultPort); showDefaultPort(); }
  for (const id of ["f-transport", "f-auth", "f-security", "f-recipient_policy"]) {
    const e = document.getElementById(id);
    if (e) e.addEventListener("change", showModeFields);
  }
  if (document.getElementById("settings-form")) showModeFields();
  const check = document.getElementById("check");
  if (check) check.addEventListener("click", checkConnection);
  const test = document.getElementById("test-message");
  if (test) test.addEventListener("click", testMessage);
  document.querySelectorAll("[data-load-template]").forEach(b => b.addEventListener("click", () => loadTemplate(b.dataset.loadTemplate)));
  const pf = document.getElementById("preview-form");
  if (pf) pf.addEventListener("submit", preview);
});
