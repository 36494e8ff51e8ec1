// Who is signed in, and how: a person's session (an HttpOnly cookie; its CSRF token is kept in memory only) or an
// org's reader key (Bearer, kept in this tab's sessionStorage, role viewer). Every API call goes through request().
"use strict";

const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };
// The least role each action needs (SPEC, "People"): the page offers an action only to the roles allowed it.
const ACTION_ROLE = { silence: "operator", ack: "operator", rules: "admin", channels: "admin", enrol: "admin",
                      machines: "admin", people: "admin", audit: "admin" };
const ORG_KEY = "fleet-org";  // the org last chosen in the picker (a name, not a secret)
const auth = { mode: null, token: "", csrf: "", email: "", orgs: {}, org: "" };

function currentRole() {
  if (auth.mode === "session") return auth.orgs[auth.org] || null;
  return auth.mode === "key" ? "viewer" : null;
}

function can(action) {
  if (action === "tokens") return auth.mode === "session";  // personal tokens belong to a person
  const have = currentRole();
  return have != null && ROLE_RANK[have] >= ROLE_RANK[ACTION_ROLE[action]];
}

// A session names its org on every request: ?org= here, and "org" in every body (request() adds both).
function withOrg(path) {
  if (auth.mode !== "session") return path;
  const url = new URL(path, location.origin);
  url.searchParams.set("org", auth.org);
  return url.pathname + url.search;
}

// Called when the server no longer accepts who we are (401): set by app.js.
let onSignedOut = () => {};

async function request(method, path, body = null) {
  const headers = {};
  const init = { method, headers, credentials: "same-origin" };
  if (auth.mode === "key") headers.Authorization = `Bearer ${auth.token}`;
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    if (auth.mode === "session") headers["X-CSRF-Token"] = auth.csrf;
    init.body = JSON.stringify(auth.mode === "session" ? { ...(body || {}), org: auth.org } : (body || {}));
  }
  const res = await fetch(withOrg(path), init);
  let data = null;
  try { data = await res.json(); } catch (err) { data = null; }  // an empty answer (204)
  if (res.status === 401 && auth.mode) {
    onSignedOut(auth.mode === "key" ? "That key was not accepted." : "Your session has ended: sign in again.");
  }
  if (!res.ok) {
    const err = new Error((data && data.error) || `${res.status} ${res.statusText}`);
    err.status = res.status;
    err.badRequest = res.status === 400;
    throw err;
  }
  return data;
}

function api(path) { return request("GET", path); }

function send(method, path, body = null) { return request(method, path, body); }

// --- signing in and out --------------------------------------------------------------------------------------

function useKey(token) {
  Object.assign(auth, { mode: "key", token, csrf: "", email: "", orgs: {}, org: "" });
  sessionStorage.setItem("fleet-token", token);
}

// Take the answer of POST or GET /api/session: {"email", "orgs": {ORG: ROLE}, "csrf_token"}.
function useSession(body) {
  sessionStorage.removeItem("fleet-token");
  const orgs = body.orgs || {};
  const names = Object.keys(orgs).sort();
  const wanted = localStorage.getItem(ORG_KEY);
  Object.assign(auth, { mode: "session", token: "", csrf: body.csrf_token || "", email: body.email || "", orgs,
                        org: names.includes(wanted) ? wanted : names[0] || "" });
}

function chooseOrg(org) {
  if (!(org in auth.orgs)) return;
  auth.org = org;
  localStorage.setItem(ORG_KEY, org);
}

// The session the browser already holds (after a reload or a single sign-on redirect), or null.
async function existingSession() {
  try {
    const res = await fetch("/api/session", { credentials: "same-origin" });
    return res.ok ? await res.json() : null;
  } catch (err) {
    return null;
  }
}

// POST /api/session; resolves to the session body, or rejects with the server's message (401 and 429 alike).
async function signInWithPassword(email, password) {
  const res = await fetch("/api/session", { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ email, password }) });
  let data = null;
  try { data = await res.json(); } catch (err) { data = null; }
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

// Forget who we are here; a session is also ended on the server (DELETE /api/session).
async function forgetIdentity() {
  const wasSession = auth.mode === "session";
  const csrf = auth.csrf;
  sessionStorage.removeItem("fleet-token");
  Object.assign(auth, { mode: null, token: "", csrf: "", email: "", orgs: {}, org: "" });
  if (!wasSession) return;
  try {
    await fetch("/api/session", { method: "DELETE", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } });
  } catch (err) { /* the cookie ends with the session on the server; nothing more to do here */ }
}
