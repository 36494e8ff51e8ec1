// What an operator does during an incident: silence (1 h / 4 h / 1 d) from an alert or a machine, end a silence,
// acknowledge an alert; and the two dialogs (silence, confirm). Native <dialog>: Escape closes, focus returns.
"use strict";

const SILENCE_FOR = { "1h": "1 h", "4h": "4 h", "1d": "1 d" };
// Set by app.js: re-read the fleet and alerts after a change (resolves once they are on the page).
let afterChange = async () => {};
let opener = null;  // the control that opened the dialog, to go back to
let openerPlace = null;

// After a change, a keyboard user continues from the control they used, or, when the re-rendered list no longer
// has it (an acknowledged alert has no Acknowledge button), from the same item's row.
function refocus(control, place) {
  const lost = !document.activeElement || document.activeElement === document.body;
  if (lost) returnTo(control, place);
}

// Open a modal dialog; when it closes (Escape, Cancel, or a finished action) focus goes back to its opener.
function openDialog(dialog, focus) {
  opener = document.activeElement;
  openerPlace = placeOf(opener);
  dialog.querySelectorAll(".error").forEach((p) => { p.textContent = ""; });
  dialog.showModal();
  if (focus) focus.focus();
}

for (const dialog of document.querySelectorAll("dialog")) {
  dialog.addEventListener("close", () => returnTo(opener, openerPlace));
}

// --- silences ------------------------------------------------------------------------------------------------

let silenceTarget = null;  // {machines, rule, label}

function openSilence(target) {
  silenceTarget = target;
  $("silence-what").textContent = target.label;
  $("silence-comment").value = "";
  openDialog($("silence-dialog"), $("silence-dialog").querySelector("[data-for='1h']"));
}

$("silence-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const duration = ev.submitter && ev.submitter.dataset.for;
  if (!duration || !silenceTarget) return;
  const body = { for: duration, machines: silenceTarget.machines, rule: silenceTarget.rule };
  const comment = $("silence-comment").value.trim();
  if (comment) body.comment = comment;
  const buttons = $("silence-form").querySelectorAll("button");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    await send("POST", "/api/silences", body);
  } catch (err) {
    $("silence-error").textContent = err.message;
    return;
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
  const [from, place] = [opener, openerPlace];
  $("silence-dialog").close();
  notice("");
  announce(`Silenced ${silenceTarget.label} for ${SILENCE_FOR[duration]}`);
  await afterChange();
  refocus(from, place);
});

function silenceAlertButton(a) {
  return actionButton("Silence…", "silence", () => openSilence({ machines: a.machine_id, rule: a.rule,
    label: `${a.rule} on ${a.machine_id}` }), { "aria-label": `Silence ${a.rule} on ${a.machine_id}` });
}

function silenceMachineButton(machineId) {
  return actionButton("Silence this machine…", "silence-machine", () => openSilence({ machines: machineId, rule: null,
    label: `every alert of ${machineId}` }));
}

function endSilenceButton(s) {
  return actionButton("End", "unsilence", () => act(`Silence ${s.id} ended`,
    () => send("DELETE", `/api/silences/${encodeURIComponent(s.id)}`)), { "aria-label": `End silence ${s.id}` });
}

// --- acknowledgement -----------------------------------------------------------------------------------------

// Who acknowledged an alert (an actor: user:EMAIL, token:EMAIL or cli:USER), shown as the person or user.
function acknowledgedBy(a) {
  return a.acked_by ? String(a.acked_by).replace(/^(user|token|cli):/, "") : null;
}

function ackButton(a) {
  return actionButton("Acknowledge", "ack", () => act(`Acknowledged ${a.rule} on ${a.machine_id}`,
    () => send("POST", `/api/alerts/${encodeURIComponent(a.id)}/ack`)),
  { "aria-label": `Acknowledge ${a.rule} on ${a.machine_id}` });
}

// The controls of an alert row that this person's role allows.
function alertActions(a) {
  if (a.state === "resolved") return [];
  const controls = [];
  if (can("silence") && !a.silenced) controls.push(silenceAlertButton(a));
  if (can("ack") && a.state === "firing" && !acknowledgedBy(a)) controls.push(ackButton(a));
  return controls;
}

// Run one change; its error goes to the notice (the server's message), its success to the live region.
async function act(done, change) {
  const from = document.activeElement;
  const place = placeOf(from);
  try {
    await change();
  } catch (err) {
    notice(err.message);
    return false;
  }
  notice("");
  announce(done);
  await afterChange();
  refocus(from, place);
  return true;
}

// --- confirmation ----------------------------------------------------------------------------------------------

let confirmAction = null;

// Ask before something that cannot be undone; `change` runs on confirm, its error stays in the dialog.
function confirmThen(title, text, okText, change) {
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okText;
  confirmAction = change;
  openDialog($("confirm-dialog"), $("confirm-dialog").querySelector("[data-close]"));
}

$("confirm-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!confirmAction) return;
  $("confirm-ok").disabled = true;
  try {
    await confirmAction();
  } catch (err) {
    $("confirm-error").textContent = err.message;
    return;
  } finally {
    $("confirm-ok").disabled = false;
  }
  const [from, place] = [opener, openerPlace];
  $("confirm-dialog").close();
  await afterChange();
  refocus(from, place);
});

// --- machines (admin) --------------------------------------------------------------------------------------

function machineActions(machine) {
  const controls = [];
  if (can("silence")) controls.push(silenceMachineButton(machine.machine_id));
  if (!can("machines")) return controls;
  const id = encodeURIComponent(machine.machine_id);
  if (machine.auth === "certificate") {
    controls.push(actionButton("Revoke certificate…", "revoke", () => confirmThen(`Revoke ${machine.machine_id}?`,
      "Its connection is closed within seconds and its certificate refused from then on. History stays. Enrolling this name again needs a new token.",
      "Revoke", async () => { await send("POST", `/api/fleet/${id}/revoke`); announce(`${machine.machine_id} revoked`); })));
  }
  controls.push(actionButton("Forget…", "forget", () => confirmThen(`Forget ${machine.machine_id}?`,
    "It leaves the live view now; its history is kept.",
    "Forget", async () => {
      await send("DELETE", `/api/fleet/${id}`);
      announce(`${machine.machine_id} forgotten`);
      closeDetail();
    })));
  return controls;
}
