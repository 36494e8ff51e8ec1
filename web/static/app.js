// fleet dashboard: plain JS, no dependencies, no network beyond this origin (dom.js, session.js, actions.js and
// admin.js come first). Every value that comes from an agent is put on the page with textContent, never as HTML.
"use strict";

const PAGE = 100;
const state = { config: null, page: 0, timer: null, view: "fleet", shown: false,
                selected: null, range: 900, machines: [], serverSkew: 0, selectedStatus: null, failing: false,
                customSeries: null, alerts: [], silences: [], alertTab: "firing", labelCounts: {} };
const RESOLVED_WINDOW_S = 86400;

function ago(ts) {
  if (ts == null) return "never";
  const s = Math.max(0, Date.now() / 1000 - state.serverSkew - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function pct(value) { return typeof value === "number" ? value : null; }

// A number with a fixed count of decimals (load 1.4849999999999999 -> "1.48"); anything else is absent.
function fixed(value, digits) { return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : null; }

function bar(value) {
  const cell = el("td", { class: "num" });
  if (value == null) { cell.textContent = "–"; return cell; }
  cell.append(document.createTextNode(`${value.toFixed(0)}%`));
  const b = el("span", { class: "bar" + (value >= 90 ? " crit" : value >= 75 ? " warn" : "") });
  const fill = el("span");
  fill.style.width = `${Math.min(100, Math.max(0, value))}%`;
  b.append(fill);
  cell.append(b);
  return cell;
}

// disk_percent as fleet.config.derived defines it (the fullest disk), for the table: the list's machines come
// without `derived`, since the server splices their metrics in undecoded. The detail view uses `derived`.
function diskPercent(m) {
  const percents = ((m.metrics && m.metrics.disks) || []).map((d) => d && d.percent)
    .filter((v) => typeof v === "number" && Number.isFinite(v));
  return percents.length ? Math.max(...percents) : null;
}

// "93% (fullest: /data)": the derived disk_percent and the filesystem it is.
function diskFact(derived) {
  const percent = fixed(derived && derived.disk_percent, 0);
  if (percent == null) return null;
  return derived.disk_mount ? `${percent}% (fullest: ${derived.disk_mount})` : `${percent}%`;
}

function badge(status) { return el("span", { class: `badge ${status}`, text: status }); }

function showLogin(message = "") {
  clearInterval(state.timer);
  state.shown = false;
  $("login").hidden = false; $("fleet").hidden = true; $("detail").hidden = true; $("logout").hidden = true;
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  forgetShownSecrets();
  $("views").hidden = true; $("who").hidden = true; $("org-picker").hidden = true;
  notice("");
  $("login-error").textContent = message;
  $("org-name").textContent = "";
  $("refresh-state").textContent = "";
  $("sso").hidden = !(state.config && state.config.FEATURES && state.config.FEATURES.oidc);
}

async function signOut(message = "") {
  await forgetIdentity();
  showLogin(message);
}

// Who is signed in, their role in the org shown, the org picker, and the views and actions that role allows.
function applyIdentity() {
  const role = currentRole();
  document.body.dataset.role = role || "";
  $("who").hidden = false;
  $("who-name").textContent = auth.mode === "session" ? auth.email : "reader key";
  $("who-role").textContent = role || "no role";
  const orgs = Object.keys(auth.orgs).sort();
  const picker = $("org-picker");
  picker.hidden = orgs.length < 2;
  if (orgs.length >= 2) {
    picker.replaceChildren(...orgs.map((o) => el("option", { value: o, text: `${o} (${auth.orgs[o]})` })));
    picker.value = auth.org;
  }
  $("org-name").hidden = orgs.length >= 2;
  if (auth.mode === "session") $("org-name").textContent = auth.org;
  let others = 0;
  for (const button of $("views").querySelectorAll("[data-needs]")) {
    button.hidden = !can(button.dataset.needs);
    if (!button.hidden) others += 1;
  }
  $("views").hidden = others === 0;  // a viewer with a key has the fleet only: no menu of one
  if (state.view !== "fleet" && !can(state.view)) state.view = "fleet";
}

// Secrets shown once (a channel's signing secret, a token, a sign-in link) leave the page with their panel.
function forgetShownSecrets() {
  for (const box of document.querySelectorAll(".once")) {
    box.hidden = true;
    box.querySelectorAll("code").forEach((code) => { code.textContent = ""; });
  }
}

function showView(view) {
  if (view !== state.view) forgetShownSecrets();
  state.view = view;
  for (const button of $("views").querySelectorAll("[data-view]")) {
    if (button.dataset.view === view) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  $("fleet").hidden = view !== "fleet";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  if (view !== "fleet") {
    $("detail").hidden = true;
    state.selected = null;
    PANELS[view]();
  }
}

// A person's roles may change while the page is open (fleet user grant/revoke/remove): ask who we are on every
// refresh and follow. False when there is nothing left to show (the session ended, or no role in any org).
async function stillSignedIn() {
  const before = `${auth.org}:${JSON.stringify(auth.orgs)}`;
  const body = await api("/api/session");
  if (!auth.mode) return false;  // a 401: onSignedOut showed the sign-in page
  auth.orgs = body.orgs || {};
  auth.csrf = body.csrf_token || auth.csrf;
  if (!(auth.org in auth.orgs)) chooseOrg(Object.keys(auth.orgs).sort()[0]);
  if (!Object.keys(auth.orgs).length) {
    await signOut("You no longer have a role in any org: ask an admin.");
    return false;
  }
  if (`${auth.org}:${JSON.stringify(auth.orgs)}` !== before) {
    applyIdentity();
    if (state.shown) showView(state.view);  // the view the new role allows, for the org now shown
    announce(`Your role in ${auth.org} is now ${currentRole()}`);
  }
  return true;
}

// Signed in (either way): show the page for this identity and start refreshing.
async function begin() {
  $("login").hidden = true;
  $("logout").hidden = false;
  applyIdentity();
  if (auth.mode === "session" && !auth.org) {
    showLogin("You have no role in any org yet: ask an admin to grant you one.");
    return;
  }
  await refresh();
  if (auth.mode) schedule();  // not when the first answer was a 401 (a wrong key)
}

function query() {
  const params = new URLSearchParams({ limit: PAGE, offset: state.page * PAGE });
  const [sort, order] = $("sort").value.split(":");
  params.set("sort", sort);
  if (order) params.set("order", order);
  if ($("search").value.trim()) params.set("q", $("search").value.trim());
  if ($("os-filter").value) params.set("os", $("os-filter").value);
  if ($("status-filter").value) params.set("status", $("status-filter").value);
  for (const term of labelTerms()) params.append("label", term);
  if ($("group-by").value) params.set("group", $("group-by").value);
  return params.toString();
}

// The label filter's terms (KEY=VALUE or KEY!=VALUE), as typed: the server checks them and says what is wrong.
function labelTerms() {
  return $("label-filter").value.split(",").map((t) => t.trim()).filter(Boolean);
}

// The label filter and grouping live in the page's URL (?label=env%3Dprod&group=role): a view can be shared or
// reloaded. Only these two: the token never goes there.
function saveView() {
  const params = new URLSearchParams();
  for (const term of labelTerms()) params.append("label", term);
  if ($("group-by").value) params.set("group", $("group-by").value);
  const search = params.toString();
  history.replaceState(null, "", location.pathname + (search ? `?${search}` : ""));
}

function loadView() {
  const params = new URLSearchParams(location.search);
  $("label-filter").value = params.getAll("label").join(",");
  const group = params.get("group") || "";
  if (group && ![...$("group-by").options].some((o) => o.value === group)) {
    $("group-by").append(el("option", { value: group, text: `Group by ${group}` }));
  }
  $("group-by").value = group;
}

// Clicking a chip filters by that label: it replaces a term of the same key, or removes itself when set.
function toggleLabel(key, value) {
  const term = `${key}=${value}`;
  const terms = labelTerms();
  const kept = terms.filter((t) => t.split(/!?=/)[0] !== key);
  $("label-filter").value = (terms.includes(term) ? kept : kept.concat(term)).join(",");
  state.page = 0;
  saveView();
  refresh();
}

function labelChips(labels) {
  const terms = labelTerms();
  return Object.keys(labels || {}).sort().map((key) => {
    const text = `${key}=${labels[key]}`;
    const chip = el("button", { type: "button", class: terms.includes(text) ? "chip on" : "chip", text,
      "data-label": text, title: terms.includes(text) ? `Stop filtering by ${text}` : `Show machines with ${text}` });
    chip.addEventListener("click", (ev) => { ev.stopPropagation(); toggleLabel(key, labels[key]); });
    chip.addEventListener("keydown", (ev) => ev.stopPropagation());  // Enter on a chip is the chip's, not the row's
    return chip;
  });
}

async function loadLabels() {
  try { state.labelCounts = await api("/api/labels"); } catch (err) { return; }
  const options = [];
  for (const [key, values] of Object.entries(state.labelCounts)) {
    for (const [value, n] of Object.entries(values)) options.push(el("option", { value: `${key}=${value}`, label: `${n} machines` }));
  }
  $("label-options").replaceChildren(...options);
  const select = $("group-by");
  const current = select.value;
  const keys = Object.keys(state.labelCounts).sort();
  if (current && !keys.includes(current)) keys.push(current);
  const known = [...select.options].slice(1).map((o) => o.value);
  if (known.length !== keys.length || known.some((k, i) => k !== keys[i])) {
    select.replaceChildren(el("option", { value: "", text: "No grouping" }),
      ...keys.map((k) => el("option", { value: k, text: `Group by ${k}` })));
    select.value = current;
  }
}

function alertsEnabled() {
  return Boolean(state.config && state.config.FEATURES && state.config.FEATURES.alerts);
}

async function loadAlerts() {
  if (!alertsEnabled()) return;
  const since = Date.now() / 1000 - state.serverSkew - RESOLVED_WINDOW_S;
  const [alerts, silences] = await Promise.all([api(`/api/alerts?since=${since}`), api("/api/silences")]);
  state.alerts = alerts.data;
  state.silences = silences.data;
}

async function refresh() {
  let body;
  try {
    if (auth.mode === "session" && !(await stillSignedIn())) return;
    [body] = await Promise.all([api(`/api/fleet?${query()}`), loadAlerts(), loadLabels()]);
  } catch (err) {
    if (!auth.mode) return;  // signed out (a 401): the sign-in page says why
    if (err.badRequest) {  // the label filter: say what is wrong with it, keep the last table
      $("label-error").textContent = err.message;
      $("label-error").hidden = false;
      return;
    }
    $("refresh-state").textContent = `refresh failed: ${err.message}`;
    $("refresh-state").classList.add("failing");
    announce(`Refresh failed: ${err.message}`);
    state.failing = true;
    return;
  }
  $("label-error").hidden = true;
  if (state.failing) announce("Refresh works again");
  state.failing = false;
  state.serverSkew = Date.now() / 1000 - body.server_time;
  if (!auth.mode) return;  // signed out while the answer was on its way
  if (!state.shown) { state.shown = true; $("login").hidden = true; showView(state.view); }
  $("org-name").textContent = body.org;
  for (const s of ["online", "stale", "offline", "expired"]) $(`count-${s}`).textContent = body.counts[s];
  renderAlerts();
  fillOsFilter(body.os_values);
  renderTable(body.data, body.groups);
  const first = body.count ? state.page * PAGE + 1 : 0;
  $("page-info").textContent = `${first}–${state.page * PAGE + body.data.length} of ${body.count}`;
  $("prev").disabled = state.page === 0;
  $("next").disabled = (state.page + 1) * PAGE >= body.count;
  $("refresh-state").textContent = `updated ${new Date().toLocaleTimeString()}`;
  $("refresh-state").classList.remove("failing");
  if (state.selected) loadDetail(state.selected, false);
}

function fillOsFilter(values) {
  const select = $("os-filter");
  const current = select.value;
  const known = [...select.options].map((o) => o.value);
  if (values.length + 1 === known.length && values.every((v, i) => known[i + 1] === v)) return;
  select.replaceChildren(el("option", { value: "", text: "All OS" }));
  for (const v of values) select.append(el("option", { value: v, text: v }));
  select.value = values.includes(current) ? current : "";
}

function firingByMachine() {
  const byMachine = new Map();
  for (const a of state.alerts) {
    if (a.state !== "firing") continue;
    if (!byMachine.has(a.machine_id)) byMachine.set(a.machine_id, []);
    byMachine.get(a.machine_id).push(a);
  }
  return byMachine;
}

function severityBadge(text, kind) { return el("span", { class: `sev ${kind}`, text }); }

// An alert: its head line (severity, rule, machine, marks, age), its summary, and the actions the role allows.
// The parts wrap as whole lines on a narrow screen; the summary never shrinks to a sliver.
function alertItem(a) {
  const item = el("li", { "data-alert": String(a.id), "data-machine": a.machine_id, "data-rule": a.rule });
  const head = el("span", { class: "head" });
  if (a.state === "resolved") {
    head.append(severityBadge("resolved", "resolved"), el("span", { class: "rule", text: a.rule }),
      el("span", { class: "name", text: a.machine_id }),
      el("span", { class: "muted age", text: `resolved ${ago(a.resolved_at)}` }));
  } else {
    head.append(severityBadge(a.state === "pending" ? "pending" : a.severity, a.state === "pending" ? "silenced" : a.severity),
      el("span", { class: "rule", text: a.rule }), el("span", { class: "name", text: a.machine_id }));
    if (a.silenced) head.append(severityBadge("silenced", "silenced"));
    const by = acknowledgedBy(a);
    if (by) head.append(el("span", { class: "sev acked", "data-acked": by, text: `acknowledged by ${by}` }));
    head.append(el("span", { class: "muted age", text: `${a.state === "pending" ? "pending" : "since"} ${ago(a.started_at)}` }));
  }
  item.append(head);
  if (a.summary) item.append(el("span", { class: "what", text: a.summary, title: a.summary }));
  const controls = alertActions(a);
  if (controls.length) item.append(el("span", { class: "row-actions" }, ...controls));
  item.tabIndex = 0;
  item.addEventListener("click", () => loadDetail(a.machine_id, true));
  item.addEventListener("keydown", (ev) => {
    if (ev.target !== item || (ev.key !== "Enter" && ev.key !== " ")) return;
    ev.preventDefault();
    loadDetail(a.machine_id, true, true);
  });
  return item;
}

function silenceItem(s) {
  const until = new Date(s.ends_at * 1000).toLocaleString();
  const item = el("li", { "data-silence": String(s.id) }, el("span", { class: "head" }, severityBadge("silenced", "silenced"),
    el("span", { class: "rule", text: s.rule || "every rule" }), el("span", { class: "name", text: s.machines }),
    el("span", { class: "muted age", text: `until ${until}` })));
  if (s.comment) item.append(el("span", { class: "what", text: s.comment, title: s.comment }));
  if (can("silence")) item.append(el("span", { class: "row-actions" }, endSilenceButton(s)));
  return item;
}

// Replace a list's items, keeping a keyboard user's focus on the same item (and the same control in it).
function replaceItems(list, items) {
  const alertKey = focusKey(list, "data-alert");
  const silenceKey = focusKey(list, "data-silence");
  list.replaceChildren(...items);
  restoreFocus(list, "data-alert", alertKey);
  restoreFocus(list, "data-silence", silenceKey);
}

function renderAlerts() {
  const panel = $("alerts-panel");
  if (!alertsEnabled()) { panel.hidden = true; $("alerts-card").hidden = true; return; }
  const firing = state.alerts.filter((a) => a.state === "firing");
  const resolved = state.alerts.filter((a) => a.state === "resolved");
  const active = state.silences.filter((s) => s.ends_at > Date.now() / 1000 - state.serverSkew);
  $("count-firing").textContent = firing.length;
  $("alerts-card").classList.toggle("on", firing.length > 0);
  $("tab-firing").textContent = firing.length;
  $("tab-resolved").textContent = resolved.length;
  $("tab-silences").textContent = active.length;
  for (const tab of panel.querySelectorAll("[data-tab]")) {
    tab.classList.toggle("active", tab.dataset.tab === state.alertTab);
    tab.setAttribute("aria-selected", String(tab.dataset.tab === state.alertTab));
  }
  let items, none;
  if (state.alertTab === "resolved") { items = resolved.map(alertItem); none = "Nothing resolved in the last 24 hours."; }
  else if (state.alertTab === "silences") { items = active.map(silenceItem); none = "No silences."; }
  else {
    const pending = state.alerts.filter((a) => a.state === "pending");
    items = firing.concat(pending).map(alertItem);
    none = "No alerts firing. All quiet.";
  }
  replaceItems($("alert-list"), items.length ? items : [el("li", { class: "none", text: none })]);
}

// A group's header row: the label's value and its online / stale / offline counts (over every page).
function groupRow(key, group) {
  const counts = group ? group.counts : null;
  const th = el("th", { colspan: "9", scope: "rowgroup" },
    el("span", { text: group && group.value != null ? `${key}=${group.value}` : `no ${key}` }));
  if (counts) {
    for (const s of ["online", "stale", "offline"]) th.append(el("span", { class: `gcount ${s}`, text: `${counts[s]} ${s}` }));
  }
  return el("tr", { class: "group", "data-group": group && group.value != null ? group.value : "" }, th);
}

function renderTable(machines, groups) {
  state.machines = machines;
  const key = $("group-by").value;
  // Rows are rebuilt every refresh: a keyboard user's focus moves to the new row of the same machine.
  const focused = document.activeElement && document.activeElement.closest("#machines tbody tr");
  const refocus = focused ? focused.dataset.machine : null;
  const firing = firingByMachine();
  const rows = machines.map((m) => {
    const flags = el("td");
    const alerts = firing.get(m.machine_id) || [];
    if (alerts.length) {
      const critical = alerts.some((a) => a.severity === "critical");
      flags.append(el("span", { class: `flag alert ${critical ? "critical" : "warning"}`, "data-alerts": String(alerts.length),
        text: alerts.length === 1 ? alerts[0].rule : `${alerts.length} alerts`,
        title: alerts.map((a) => `${a.rule}: ${a.summary || a.severity}`).join("\n") }));
    }
    if (m.conflict) flags.append(el("span", { class: "flag", text: "name conflict", title: "two hardware ids report under this name" }));
    if (typeof m.clock_offset_s === "number" && Math.abs(m.clock_offset_s) > 2) {
      flags.append(el("span", { class: "flag skew", text: `clock ${m.clock_offset_s > 0 ? "-" : "+"}${Math.abs(m.clock_offset_s).toFixed(1)} s` }));
    }
    const sys = m.system || {};
    const row = el("tr", { "data-machine": m.machine_id, tabindex: "0" },
      el("td", {}, badge(m.status)),
      el("td", {}, el("div", { class: "name", text: m.machine_id }), el("div", { class: "sub", text: sys.hostname || "" })),
      el("td", {}, el("div", { text: sys.os || "" }), el("div", { class: "sub", text: sys.os_version || "" })),
      bar(pct(m.metrics && m.metrics.cpu_percent)),
      bar(pct(m.metrics && m.metrics.memory && m.metrics.memory.percent)),
      bar(diskPercent(m)),
      el("td", { text: ago(m.last_seen), title: m.last_seen ? new Date(m.last_seen * 1000).toISOString() : "" }),
      el("td", { class: "labels" }, ...labelChips(m.labels)),
      flags);
    if (m.machine_id === state.selected) row.classList.add("active");
    row.addEventListener("click", () => loadDetail(m.machine_id, true));
    row.addEventListener("keydown", (ev) => {
      if (ev.target !== row || (ev.key !== "Enter" && ev.key !== " ")) return;
      ev.preventDefault();
      loadDetail(m.machine_id, true, true);
    });
    return row;
  });
  let shown = rows;
  if (key && groups) {
    const byValue = new Map(groups.map((g) => [g.value == null ? null : g.value, g]));
    shown = [];
    let last;
    machines.forEach((m, i) => {
      const value = m.labels && key in m.labels ? m.labels[key] : null;
      if (i === 0 || value !== last) shown.push(groupRow(key, byValue.get(value)));
      last = value;
      shown.push(rows[i]);
    });
  }
  $("machines").tBodies[0].replaceChildren(...shown);
  const again = refocus && rows.find((r) => r.dataset.machine === refocus);
  if (again) again.focus({ preventScroll: true });
  $("empty").hidden = machines.length > 0;
}

function fact(dl, label, value) {
  dl.append(el("dt", { text: label }), el("dd", { text: value == null || value === "" ? "–" : String(value) }));
}

async function loadDetail(machineId, open, focus = false) {
  state.selected = machineId;
  for (const row of $("machines").tBodies[0].rows) row.classList.toggle("active", row.dataset.machine === machineId);
  const now = Date.now() / 1000 - state.serverSkew;
  const id = encodeURIComponent(machineId);
  let machine, history, events, inventory;
  try {
    [machine, history, events, inventory] = await Promise.all([
      api(`/api/fleet/${id}`),
      api(`/api/fleet/${id}/history?since=${now - state.range}&until=${now + 60}`),
      api(`/api/events?machine=${id}&limit=50`),
      api(`/api/fleet/${id}/inventory`),
    ]);
  } catch (err) {
    if (open) $("d-sub").textContent = `could not load: ${err.message}`;
    return;
  }
  const wasHidden = $("detail").hidden;
  $("detail").hidden = false;
  $("d-name").textContent = machine.machine_id;
  if (open) announce(`${machine.machine_id}: ${machine.status}, details open`);
  else if (state.selectedStatus && state.selectedStatus !== machine.status) announce(`${machine.machine_id} is now ${machine.status}`);
  state.selectedStatus = machine.status;
  if (focus && wasHidden) $("d-name").focus();  // opened from the keyboard: continue reading in the panel
  $("d-sub").replaceChildren(badge(machine.status), document.createTextNode(`  last seen ${ago(machine.last_seen)}`));
  const sys = machine.system || {}, met = machine.metrics || {};
  const dl = $("d-facts");
  dl.replaceChildren();
  dl.append(el("dt", { text: "Labels" }), el("dd", { id: "d-labels" }, ...(Object.keys(machine.labels || {}).length
    ? labelChips(machine.labels) : [document.createTextNode("–")])));
  fact(dl, "Hostname", sys.hostname);
  fact(dl, "OS", [sys.os, sys.os_version].filter(Boolean).join(" · "));
  fact(dl, "Platform", sys.platform);
  fact(dl, "Architecture", sys.architecture);
  fact(dl, "Python / agent", [sys.python_version, sys.agent_version].filter(Boolean).join(" / "));
  fact(dl, "Hardware id", machine.hardware_id);
  fact(dl, "CPUs", met.cpu_count);
  fact(dl, "Load", (met.load_avg || []).map((v) => fixed(v, 2) ?? "–").join(", "));
  fact(dl, "Disk", diskFact(machine.derived));
  fact(dl, "Uptime", met.uptime_s != null ? `${(met.uptime_s / 86400).toFixed(1)} days` : null);
  fact(dl, "Clock offset", machine.clock_offset_s != null ? `${machine.clock_offset_s.toFixed(2)} s` : null);
  fact(dl, "Session", machine.session);
  fact(dl, "Authenticates with", machine.auth === "certificate" ? "its own certificate" : "the org agent key");
  if (machine.cert_not_after != null) {
    const days = (machine.cert_not_after * 1000 - Date.now()) / 86400000;
    fact(dl, "Certificate ends", `${new Date(machine.cert_not_after * 1000).toISOString().slice(0, 10)} (${days >= 0 ? `in ${Math.floor(days)} days` : "ended"})`);
  }
  fact(dl, "Name conflict", machine.conflict ? "yes: two hardware ids use this name" : "no");
  if (machine.lost || machine.late) fact(dl, "Reports lost", `${machine.lost}${machine.late ? ` (${machine.late} arrived late)` : ""}`);
  const mine = state.alerts.filter((a) => a.machine_id === machine.machine_id && a.state !== "resolved");
  replaceItems($("d-alerts"), mine.map(alertItem));
  const actionsKey = focusKey($("d-actions"), "data-machine-actions");
  const controls = machineActions(machine);
  $("d-actions").replaceChildren(...(controls.length
    ? [el("span", { class: "row-actions", "data-machine-actions": machine.machine_id }, ...controls)] : []));
  $("d-actions").hidden = !controls.length;
  restoreFocus($("d-actions"), "data-machine-actions", actionsKey);
  renderCharts(history.points, now - state.range, now);
  renderAgentExtras(met, history.points, now - state.range, now);
  renderTimeline(events.events, inventory.data);
}

// Status changes and inventory changes, newest first, by the collector's clock.
function renderTimeline(events, inventory) {
  // A label change is an event whose status stays the same and whose reason is "labels: …".
  const labelChange = (e) => e.old_status === e.new_status && (e.reason || "").startsWith("labels: ");
  const items = events.map((e) => ({ ts: e.ts, node: labelChange(e)
    ? el("li", { class: "labels" }, el("time", { text: new Date(e.ts * 1000).toLocaleString() }),
      el("span", { class: "badge inventory", text: "labels" }), el("span", { class: "muted", text: e.reason.slice(8) }))
    : el("li", {},
      el("time", { text: new Date(e.ts * 1000).toLocaleString() }),
      badge(e.new_status === "evicted" ? "offline" : e.new_status),
      el("span", { class: "muted", text: `${e.old_status || "new"} → ${e.new_status}${e.reason ? " (" + e.reason + ")" : ""}` })) }));
  inventory.forEach((inv, i) => items.push({ ts: inv.received, node: el("li", { class: "inventory" },
    el("time", { text: new Date(inv.received * 1000).toLocaleString() }),
    el("span", { class: "badge inventory", text: "inventory" }),
    el("span", { class: "muted", text: i === 0 ? "first reported" : Object.entries(inv.changed)
      .map(([key, [before, after]]) => `${key}: ${before ?? "–"} → ${after ?? "–"}`).join("; ") })) }));
  items.sort((a, b) => b.ts - a.ts);
  const list = $("d-events");
  list.replaceChildren(...items.map((item) => item.node));
  if (!items.length) list.append(el("li", { class: "muted", text: "No status or inventory changes in the log." }));
}

function rates(points, key) {
  const out = [];
  for (let i = 1; i < points.length; i++) {
    const a = points[i - 1], b = points[i];
    if (a[key] == null || b[key] == null || b.ts <= a.ts || b[key] < a[key]) continue;
    out.push({ ts: b.ts, v: (b[key] - a[key]) / (b.ts - a.ts) });
  }
  return out;
}

// Charts span the selected range, [t0, t1] in server time, whatever part of it has data.
function renderCharts(points, t0, t1) {
  const series = (key) => points.filter((p) => typeof p[key] === "number").map((p) => ({ ts: p.ts, v: p[key] }));
  const charts = [
    chart("CPU", "%", [series("cpu_percent")], 100, t0, t1),
    chart("Memory", "%", [series("memory_percent")], 100, t0, t1),
    chart("Disk", "%", [series("disk_percent")], 100, t0, t1),
    chart("Network", "B/s", [rates(points, "net_bytes_recv"), rates(points, "net_bytes_sent")], null, t0, t1),
  ];
  $("d-charts").replaceChildren(...charts);
}

function human(v, unit) {
  if (unit !== "B/s") return `${v.toFixed(1)}${unit}`;
  const units = ["B/s", "KB/s", "MB/s", "GB/s"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

// Time-axis ticks: the first step (seconds) that gives at most `most` ticks over [t0, t1], on local clock boundaries.
const TICK_STEPS = [60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
function timeTicks(t0, t1, most = 4) {
  const step = TICK_STEPS.find((s) => (t1 - t0) / s <= most) || TICK_STEPS[TICK_STEPS.length - 1];
  const zone = new Date(t0 * 1000).getTimezoneOffset() * 60;  // seconds to add to local time to get UTC
  const ticks = [];
  for (let t = Math.ceil((t0 - zone) / step) * step + zone; t <= t1; t += step) ticks.push(t);
  return ticks;
}

function timeLabel(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function chart(title, unit, seriesList, fixedMax, t0, t1) {
  const W = 280, H = 110, P = 4;
  const box = el("div", { class: "chart", "data-chart": title.toLowerCase() });
  const main = seriesList[0];
  const last = main.length ? human(main[main.length - 1].v, unit) : "no data";
  box.append(el("h4", {}, document.createTextNode(title), el("b", { text: last })));
  const all = seriesList.flat();
  const end = Math.max(t1, ...all.map((p) => p.ts));  // a point stamped a little ahead (clock skew) still shows
  const x = (t) => ((t - t0) / (end - t0)) * (W - 2 * P) + P;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
                         "aria-label": `${title} from ${timeLabel(t0)} to ${timeLabel(end)}` });
  for (const y of [0.25, 0.5, 0.75]) s.append(svg("line", { class: "grid", x1: 0, x2: W, y1: H * y, y2: H * y }));
  // The time axis: labels in HTML under the plot (the SVG is stretched, text in it would be too).
  const axis = el("div", { class: "axis" });
  for (const t of timeTicks(t0, end)) {
    const at = x(t);
    s.append(svg("line", { class: "grid", x1: at, x2: at, y1: 0, y2: H }));
    const tick = el("time", { datetime: new Date(t * 1000).toISOString(), text: timeLabel(t) });
    const f = at / W;
    // Centred on its tick, except near an edge, where it slides to stay inside the chart (still covering the tick).
    const shift = f < 0.15 ? (50 * f) / 0.15 : f > 0.85 ? 100 - (50 * (1 - f)) / 0.15 : 50;
    tick.style.left = `${(f * 100).toFixed(2)}%`;
    tick.style.transform = `translateX(${(-shift).toFixed(2)}%)`;
    axis.append(tick);
  }
  if (all.length >= 1) {
    const max = fixedMax || Math.max(1, ...all.map((p) => p.v)) * 1.1;
    const y = (v) => H - P - (Math.min(v, max) / max) * (H - 2 * P);
    seriesList.forEach((points, i) => {
      if (!points.length) return;
      const d = points.map((p, j) => `${j ? "L" : "M"}${x(p.ts).toFixed(1)},${y(p.v).toFixed(1)}`).join("");
      if (i === 0) s.append(svg("path", { class: "area", d: `${d}L${x(points[points.length - 1].ts).toFixed(1)},${H - P}L${x(points[0].ts).toFixed(1)},${H - P}Z` }));
      s.append(svg("path", { class: i ? "line second" : "line", d }));
    });
    const label = svg("text", { x: W - P, y: 12, "text-anchor": "end" });
    label.textContent = fixedMax ? `${fixedMax}${unit}` : human(max, unit);
    s.append(label);
  }
  box.append(s, axis);
  return box;
}

// --- processes, process checks and custom metrics (issue 14) ---------------------------------------
// One section of the detail view, rebuilt on every refresh; its state is the chosen custom series.
function renderAgentExtras(met, points, t0, t1) {
  const parts = [processTable(met.processes), processChecks(met.process_counts), customMetrics(met.custom, points, t0, t1)];
  $("d-extras").replaceChildren(...parts.filter(Boolean));
}

function processTable(processes) {
  if (!Array.isArray(processes)) return null;
  const rows = processes.map((p) => el("tr", {},
    el("td", { class: "name", text: p.name || "?" }), el("td", { class: "num", text: String(p.pid ?? "") }),
    el("td", { class: "num", text: typeof p.cpu_percent === "number" ? `${p.cpu_percent.toFixed(1)}%` : "–" }),
    el("td", { class: "num", text: typeof p.memory_percent === "number" ? `${p.memory_percent.toFixed(1)}%` : "–" })));
  const table = el("table", { class: "mini", id: "d-processes" },
    el("thead", {}, el("tr", {}, el("th", { text: "Process" }), el("th", { class: "num", text: "PID" }),
      el("th", { class: "num", text: "CPU", title: "percent of one core, since the previous report" }),
      el("th", { class: "num", text: "Memory" }))),
    el("tbody", {}, ...rows));
  return el("div", { class: "extra" }, el("h3", { text: "Top processes" }), table);
}

function processChecks(counts) {
  if (!counts || typeof counts !== "object") return null;
  const items = Object.entries(counts).map(([name, n]) => el("li", { class: n > 0 ? "check up" : "check down", "data-check": name },
    el("span", { class: "mark", "aria-hidden": "true", text: n > 0 ? "●" : "✕" }),
    el("code", { text: name }), el("b", { text: String(n), title: n > 0 ? "running" : "not running" })));
  if (!items.length) return null;
  return el("div", { class: "extra" }, el("h3", { text: "Process checks" }), el("ul", { class: "checks", id: "d-checks" }, ...items));
}

function customMetrics(custom, points, t0, t1) {
  if (!custom || typeof custom !== "object" || !Object.keys(custom).length) return null;
  const names = Object.keys(custom).sort();
  if (!names.includes(state.customSeries)) state.customSeries = names[0];
  const select = el("select", { id: "d-custom-series", "aria-label": "custom series to chart" },
    ...names.map((n) => el("option", { value: n, text: `${n} = ${custom[n]}` })));
  select.value = state.customSeries;
  const field = `custom.${state.customSeries}`;
  const series = points.filter((p) => typeof p[field] === "number").map((p) => ({ ts: p.ts, v: p[field] }));
  const box = chart(state.customSeries, "", [series], null, t0, t1);
  box.dataset.chart = "custom";
  select.addEventListener("change", () => {
    state.customSeries = select.value;
    if (state.selected) loadDetail(state.selected, false);
  });
  return el("div", { class: "extra" }, el("h3", { text: `Custom metrics (${names.length})` }), select, box);
}

function schedule() {
  clearInterval(state.timer);
  const every = (state.config && state.config.REFRESH_INTERVAL_MS) || 5000;
  state.timer = setInterval(refresh, every);
}

// Who is this: a reader key in the URL fragment or this tab, else the session the browser holds (after a reload or
// a single sign-on redirect), else the sign-in page.
async function start() {
  try {
    state.config = await (await fetch("/api/config")).json();
  } catch (err) {
    state.config = null;
  }
  const hash = new URLSearchParams(location.hash.slice(1));
  const fromHash = hash.get("token");
  if (fromHash || hash.has("sso_error")) history.replaceState(null, "", location.pathname + location.search);
  loadView();
  const stored = fromHash || sessionStorage.getItem("fleet-token");
  if (stored) useKey(stored);
  else {
    const session = await existingSession();
    if (session) useSession(session);
  }
  if (!auth.mode) { showLogin(hash.get("sso_error") || ""); return; }
  await begin();
}

onSignedOut = (message) => { forgetIdentity(); showLogin(message); };
afterChange = () => (state.view === "fleet" ? refresh() : PANELS[state.view]());

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  useKey($("token").value.trim());
  $("token").value = "";
  begin();
});
$("password-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const button = ev.target.querySelector("button");
  button.disabled = true;
  $("login-error").textContent = "";
  try {
    useSession(await signInWithPassword($("email").value.trim(), $("password").value));
  } catch (err) {
    $("login-error").textContent = err.message;
    return;
  } finally {
    button.disabled = false;
    $("password").value = "";
  }
  await begin();
});
$("logout").addEventListener("click", () => signOut());
$("org-picker").addEventListener("change", () => {
  chooseOrg($("org-picker").value);
  state.page = 0;
  state.selected = null;
  $("detail").hidden = true;
  forgetShownSecrets();
  notice("");
  applyIdentity();
  showView(state.view);
  refresh();
});
for (const button of $("views").querySelectorAll("[data-view]")) {
  button.addEventListener("click", () => { notice(""); showView(button.dataset.view); });
}
let searchTimer = null;
$("search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(() => { state.page = 0; refresh(); }, 200); });
for (const id of ["os-filter", "status-filter", "sort"]) $(id).addEventListener("change", () => { state.page = 0; refresh(); });
let labelTimer = null;
$("label-filter").addEventListener("input", () => {
  clearTimeout(labelTimer);
  labelTimer = setTimeout(() => { state.page = 0; saveView(); refresh(); }, 300);
});
$("group-by").addEventListener("change", () => { state.page = 0; saveView(); refresh(); });
$("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); refresh(); });
$("next").addEventListener("click", () => { state.page += 1; refresh(); });
// Toggle buttons show their state to the eye (a class) and to assistive technology (aria-pressed).
function setPressed(button, pressed, cls) {
  button.classList.toggle(cls, pressed);
  button.setAttribute("aria-pressed", String(pressed));
}
function syncStatusButtons() {
  for (const b of document.querySelectorAll(".stat[data-status]")) setPressed(b, b.dataset.status === $("status-filter").value, "selected");
}
$("status-filter").addEventListener("change", syncStatusButtons);
for (const button of document.querySelectorAll(".stat[data-status]")) {
  button.addEventListener("click", () => {
    const status = button.dataset.status;
    $("status-filter").value = $("status-filter").value === status ? "" : status;
    syncStatusButtons();
    state.page = 0;
    refresh();
  });
}
for (const tab of document.querySelectorAll("#alerts-panel [data-tab]")) {
  tab.addEventListener("click", () => { state.alertTab = tab.dataset.tab; renderAlerts(); });
}
$("alerts-card").addEventListener("click", () => {
  state.alertTab = "firing";
  renderAlerts();
  $("alerts-panel").scrollIntoView({ behavior: "smooth", block: "nearest" });
});
function closeDetail() {
  const row = document.querySelector(`#machines tbody tr[data-machine="${CSS.escape(state.selected || "")}"]`);
  const hadFocus = $("detail").contains(document.activeElement);
  $("detail").hidden = true;
  state.selected = null;
  if (row && hadFocus) row.focus();  // back to the row the keyboard came from
  refresh();
}
$("d-close").addEventListener("click", closeDetail);
$("detail").addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeDetail(); });
for (const button of document.querySelectorAll(".range button")) {
  button.addEventListener("click", () => {
    document.querySelectorAll(".range button").forEach((b) => setPressed(b, b === button, "active"));
    state.range = Number(button.dataset.range);
    if (state.selected) loadDetail(state.selected, true);
  });
}
start();
