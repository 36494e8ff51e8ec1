"""Plain-text rendering of a notification (email, Apprise): a subject with a count and a readable body."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from fleet.notify.notice import Notice

MAX_SUBJECT_RULES = 3
MAX_CHAT_ALERTS = 20  # alerts listed per status in an Apprise (chat) message


def group_status(notices: Sequence[Notice]) -> str:
    """"firing" when any notice fires, else "resolved" (as Alertmanager sets a group's status)."""
    return "firing" if any(n.status == "firing" for n in notices) else "resolved"


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _joined(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_SUBJECT_RULES])
    more = len(names) - MAX_SUBJECT_RULES
    return f"{shown} +{more} more" if more > 0 else shown


def subject(notices: Sequence[Notice]) -> str:
    """E.g. ``[FIRING:3] acme: machine-offline``: the group's status and how many alerts have it, then their
    org(s), rule(s) and machine if only one (what is still firing leads; the body lists everything)."""
    status = group_status(notices)
    leading = [n for n in notices if n.status == status]
    orgs = sorted({n.org for n in leading})
    rules = sorted({n.rule for n in leading})
    machines = {n.machine_id for n in leading}
    text = f"[{status.upper()}:{len(leading)}] {_joined(orgs)}: {_joined(rules)}"
    return f"{text} ({machines.pop()})" if len(machines) == 1 else text


def _line(notice: Notice) -> list[str]:
    what = notice.summary or f"{notice.rule} on {notice.machine_id}"
    value = "" if notice.value is None else f", value {notice.value:g}"
    if notice.status == "firing":
        when = f"since {_when(notice.starts_at)}"
    else:
        assert notice.ends_at is not None  # a resolved Notice always has one
        when = f"from {_when(notice.starts_at)} to {_when(notice.ends_at)}"
    lines = [f"- [{notice.severity}] {notice.rule} on {notice.machine_id}: {what}", f"  {when}{value}"]
    if notice.acked_by:
        lines.append(f"  acknowledged by {notice.acked_by}")
    if notice.machine_labels:
        lines.append("  labels: " + ", ".join(f"{k}={v}" for k, v in sorted(notice.machine_labels.items())))
    return lines


def body(notices: Sequence[Notice], group_key: str, max_listed: int | None = None) -> str:
    """The alerts listed by status with their counts, each with severity, rule, machine, summary and times;
    past ``max_listed`` per status, a line says how many more (chat messages stay short)."""
    firing = [n for n in notices if n.status == "firing"]
    resolved = [n for n in notices if n.status == "resolved"]
    orgs = ", ".join(sorted({n.org for n in notices}))
    lines = [f"{len(firing)} firing, {len(resolved)} resolved in {orgs}.", ""]
    for title, group in (("FIRING", firing), ("RESOLVED", resolved)):
        if group:
            lines.append(f"{title} ({len(group)})")
            ordered = sorted(group, key=lambda n: (n.rule, n.machine_id))
            for notice in ordered[:max_listed]:
                lines.extend(_line(notice))
            if max_listed is not None and len(ordered) > max_listed:
                lines.append(f"… and {len(ordered) - max_listed} more")
            lines.append("")
    lines += ["-- ", f"fleet alerts, group {group_key}"]
    return "\n".join(lines) + "\n"
