// fleet dashboard, shared DOM helpers. Plain scripts loaded in order (dom, session, actions, admin, app): no
// bundler, no modules, no inline script. Every value from the server goes on the page as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// A real button (keyboard and screen readers get it for free) that runs `onClick` without reaching its row.
function actionButton(text, action, onClick, attrs = {}) {
  const button = el("button", { type: "button", class: "ghost small", "data-action": action, text, ...attrs });
  button.addEventListener("click", (ev) => { ev.stopPropagation(); onClick(button); });
  button.addEventListener("keydown", (ev) => ev.stopPropagation());  // Enter on the button is the button's
  return button;
}

// The one live region (#live-status): written only when the message changes, so nothing is read out twice.
function announce(message) {
  const region = $("live-status");
  if (region.textContent !== message) region.textContent = message;
}

// What an action could not do, in the server's words, until the next action succeeds.
function notice(message) {
  const box = $("notice");
  box.textContent = message || "";
  box.hidden = !message;
}

// A list answer: a bare JSON list, or {"data": [...]}.
function listOf(body) {
  if (Array.isArray(body)) return body;
  return (body && Array.isArray(body.data)) ? body.data : [];
}

function when(ts) { return ts == null ? "–" : new Date(ts * 1000).toLocaleString(); }

// Rebuilding a list every refresh must not lose a keyboard user's place: remember which item's control had focus
// (by the item's key and the control's data-action) and focus its replacement.
function focusKey(container, itemAttr) {
  const active = document.activeElement;
  if (!active || !container.contains(active)) return null;
  const item = active.closest(`[${itemAttr}]`);
  return item ? { id: item.getAttribute(itemAttr), action: active.dataset.action || null } : null;
}

function restoreFocus(container, itemAttr, key) {
  if (!key) return;
  const item = [...container.querySelectorAll(`[${itemAttr}]`)].find((n) => n.getAttribute(itemAttr) === key.id);
  if (!item) return;
  const target = key.action ? item.querySelector(`[data-action="${CSS.escape(key.action)}"]`) : item;
  (target || item).focus({ preventScroll: true });
}

// Where a control sits (its list, its item's key, its data-action), taken before its list may be rebuilt.
const ITEM_KEYS = ["data-alert", "data-silence", "data-row", "data-machine-actions"];
function placeOf(control) {
  if (!control || !control.closest) return null;
  for (const attr of ITEM_KEYS) {
    const item = control.closest(`[${attr}]`);
    const list = item && item.parentElement ? item.parentElement.closest("[id]") : null;
    if (list) return { listId: list.id, attr, id: item.getAttribute(attr), action: control.dataset.action || null };
  }
  return null;
}

// Focus the control again, or, when its list was rebuilt meanwhile, its replacement (or its item's new row).
function returnTo(control, place) {
  if (control && control.isConnected) { control.focus(); return; }
  const list = place && $(place.listId);
  if (list) restoreFocus(list, place.attr, { id: place.id, action: place.action });
}
