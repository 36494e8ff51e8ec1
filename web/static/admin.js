// The admin's panels (rules, channels with a test button, enrolment tokens with the command to copy, people, the
// audit log) and a person's own API tokens. Each panel loads when shown and again after each of its changes.
"use strict";

function cell(text, cls) { return el("td", cls ? { class: cls, text: text ?? "–" } : { text: text ?? "–" }); }

function actionsCell(...controls) { return el("td", { class: "actions-cell" }, el("span", { class: "row-actions" }, ...controls)); }

// A row's Delete (or Remove) button: asks first, then DELETEs `path` and reloads the panel.
function deleteButton(what, name, consequence, path, reload, text = "Delete") {
  const label = [text, what, name].filter(Boolean).join(" ");
  return actionButton(`${text}…`, text.toLowerCase(), () => confirmThen(`${label}?`, consequence, text,
    async () => { await send("DELETE", path); await reload(); }), { "aria-label": label });
}

function fillTable(id, rows, empty) {
  const body = $(id).tBodies[0];
  const key = focusKey(body, "data-row");
  const cols = $(id).tHead.rows[0].cells.length;
  body.replaceChildren(...(rows.length ? rows : [el("tr", { class: "none" }, el("td", { colspan: String(cols), text: empty }))]));
  restoreFocus(body, "data-row", key);
}

// Run a panel's change: its error shows in the panel (the server's message), then the panel reloads.
async function panelChange(errorId, change, reload) {
  $(errorId).textContent = "";
  const from = document.activeElement;
  const place = placeOf(from);
  try {
    await change();
  } catch (err) {
    $(errorId).textContent = err.message;
    return false;
  }
  await reload();
  refocus(from, place);
  return true;
}

function formValues(form) {
  const values = {};
  for (const [k, v] of new FormData(form).entries()) if (String(v).trim() !== "") values[k] = String(v).trim();
  return values;
}

function showOnce(boxId, valueId, text) {
  $(valueId).textContent = text;
  $(boxId).hidden = !text;
}

// --- rules -----------------------------------------------------------------------------------------------------

function durationText(seconds) {
  if (!seconds) return "0s";
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) if (seconds % size === 0) return `${seconds / size}${unit}`;
  return `${seconds}s`;
}

async function loadRules() {
  let rules;
  try { rules = listOf(await api("/api/rules")); } catch (err) { $("rules-error").textContent = err.message; return; }
  fillTable("rules-table", rules.map((r) => el("tr", { "data-row": r.name },
    cell(r.name, "name"), el("td", {}, el("code", { text: r.when })), cell(durationText(r.for_s ?? 0)), cell(r.machines),
    el("td", {}, el("span", { class: `sev ${r.severity}`, text: r.severity })),
    actionsCell(deleteButton("rule", r.name, "Its alerts stop being evaluated.",
      `/api/rules/${encodeURIComponent(r.name)}`, loadRules)))), "No rules.");
}

$("rule-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  if (await panelChange("rules-error", () => send("POST", "/api/rules", formValues(form)), loadRules)) {
    announce(`Rule ${form.elements.name.value} added`);
    form.reset();
  }
});

// --- channels ----------------------------------------------------------------------------------------------

async function loadChannels() {
  let channels;
  try { channels = listOf(await api("/api/channels")); } catch (err) { $("channels-error").textContent = err.message; return; }
  fillTable("channels-table", channels.map((c) => {
    const name = c.channel;
    const status = el("td", { class: "status" }, document.createTextNode(c.last_error || "–"));
    return el("tr", { "data-row": name },
      cell(name, "name"), cell(c.kind), cell(when(c.last_delivery)), status,
      actionsCell(
        actionButton("Test", "test", (button) => testChannel(name, button), { "aria-label": `Send a test to ${name}` }),
        deleteButton("channel", name, "It gets no more notifications.", `/api/channels/${encodeURIComponent(name)}`,
          loadChannels)));
  }), "No channels: alerts show here only.");
}

async function testChannel(name, button) {
  $("channels-error").textContent = "";
  button.disabled = true;
  const row = button.closest("tr");
  const out = row.querySelector(".status");
  try {
    await send("POST", `/api/channels/${encodeURIComponent(name)}/test`);
    out.textContent = "test sent";
    out.className = "status ok";
    announce(`Test notification sent to ${name}`);
  } catch (err) {
    out.textContent = err.message;
    out.className = "status error";
    announce(`Test to ${name} failed: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

$("channel-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const values = formValues(form);
  let made = null;
  const body = { name: values.name, url: values.url };
  if (await panelChange("channels-error", async () => { made = await send("POST", "/api/channels", body); }, loadChannels)) {
    showOnce("channel-secret", "channel-secret-value", made && made.secret ? made.secret : "");
    announce(`Channel ${values.name} added`);
    form.reset();
  }
});

// --- enrolment tokens ----------------------------------------------------------------------------------------

async function loadEnrol() {
  let tokens;
  try { tokens = listOf(await api("/api/enrol")); } catch (err) { $("enrol-error").textContent = err.message; return; }
  const now = Date.now() / 1000;
  fillTable("enrol-table", tokens.map((t) => {
    const usable = !t.revoked && t.expires_at > now && (!t.uses || t.used < t.uses);
    const stateText = t.revoked ? "revoked" : t.expires_at <= now ? "expired" : usable ? "usable" : "used up";
    return el("tr", { "data-row": String(t.id) },
      cell(String(t.id), "name"), cell(t.uses ? String(t.uses) : "any"), cell(String(t.used ?? 0)),
      cell(when(t.expires_at)), cell(when(t.created_at)), cell(stateText),
      actionsCell(...(usable ? [actionButton("Revoke", "revoke", () => panelChange("enrol-error",
        () => send("DELETE", `/api/enrol/${encodeURIComponent(t.id)}`), loadEnrol), { "aria-label": `Revoke token ${t.id}` })] : [])));
  }), "No enrolment tokens.");
}

$("enrol-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const values = formValues(ev.target);
  const body = { expires: values.expires || "24h", uses: Number(values.uses ?? 1) };
  let made = null;
  if (await panelChange("enrol-error", async () => { made = await send("POST", "/api/enrol", body); }, loadEnrol)) {
    showOnce("enrol-once", "enrol-command", made.command || made.agent_command || made.token);
    announce("Enrolment token created: the command to run is shown");
  }
});

// --- people ----------------------------------------------------------------------------------------------------

async function loadPeople() {
  let people;
  try { people = listOf(await api("/api/people")); } catch (err) { $("people-error").textContent = err.message; return; }
  fillTable("people-table", people.map((p) => el("tr", { "data-row": p.email },
    cell(p.email, "name"), el("td", {}, el("span", { class: "role-badge", text: p.role })),
    cell(p.password ? "password set" : "invited: no password yet"),
    actionsCell(...(p.email === auth.email ? [] : [deleteButton("", p.email,
      `Their role in ${auth.org} and their API tokens for it end now.`, `/api/people/${encodeURIComponent(p.email)}`,
      loadPeople, "Remove")])))), "Nobody has a role in this org.");
}

$("person-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const values = formValues(form);
  let made = null;
  if (await panelChange("people-error", async () => { made = await send("POST", "/api/people", values); }, loadPeople)) {
    showOnce("person-once", "person-link", made && made.link ? made.link : "");
    announce(made && made.link ? `${made.email} invited as ${made.role}` : `${made.email} is now ${made.role}`);
    form.reset();
  }
});

// --- audit log -----------------------------------------------------------------------------------------------

// An entry's detail as "key=value, …" (nested values as JSON).
function detailText(detail) {
  if (!detail || typeof detail !== "object") return "";
  return Object.entries(detail).map(([k, v]) => `${k}=${v !== null && typeof v === "object" ? JSON.stringify(v) : v}`)
    .join(", ");
}

async function loadAudit() {
  let entries;
  try { entries = listOf(await api("/api/audit")); } catch (err) { $("audit-error").textContent = err.message; return; }
  entries.sort((a, b) => b.ts - a.ts);
  fillTable("audit-table", entries.map((e, i) => el("tr", { "data-row": `${e.ts}-${i}` },
    el("td", {}, el("time", { datetime: new Date(e.ts * 1000).toISOString(), text: when(e.ts) })),
    cell(e.actor), el("td", {}, el("code", { text: e.action })), cell(e.target),
    cell(detailText(e.detail), "audit-detail"))), "Nothing changed yet.");
}

// --- personal API tokens ---------------------------------------------------------------------------------------

async function loadTokens() {
  let tokens;
  try { tokens = listOf(await api("/api/tokens")); } catch (err) { $("tokens-error").textContent = err.message; return; }
  fillTable("tokens-table", tokens.map((t) => el("tr", { "data-row": String(t.id) },
    cell(t.name, "name"), cell(t.org), cell(when(t.created)), cell(t.last_used != null ? when(t.last_used) : "never"),
    actionsCell(deleteButton("token", t.name, "Anything using it is refused from now on.",
      `/api/tokens/${encodeURIComponent(t.id)}`, loadTokens)))), "No tokens.");
}

$("token-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const name = formValues(form).name;
  let made = null;
  if (await panelChange("tokens-error", async () => { made = await send("POST", "/api/tokens", { name }); }, loadTokens)) {
    showOnce("token-once", "token-value", made.token);
    announce(`Token ${name} created: it is shown once`);
    form.reset();
  }
});

// --- copying ---------------------------------------------------------------------------------------------------

for (const button of document.querySelectorAll("button.copy")) {
  button.addEventListener("click", async () => {
    const text = $(button.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
      announce("Copied");
      button.textContent = "Copied";
    } catch (err) {  // no clipboard (plain HTTP): select the text so Ctrl+C copies it
      const range = document.createRange();
      range.selectNodeContents($(button.dataset.copy));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      announce("Selected: press Ctrl+C to copy");
    }
  });
}

const PANELS = { rules: loadRules, channels: loadChannels, enrol: loadEnrol, people: loadPeople, audit: loadAudit,
                 tokens: loadTokens };
