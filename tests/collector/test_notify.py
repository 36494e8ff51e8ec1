"""Alert channels (fleet.notify) against real servers on loopback: an HTTP receiver for webhooks,
Alertmanager's API shape and Apprise's json://, aiosmtpd for email (plain, STARTTLS, implicit TLS, login)."""

from __future__ import annotations

import datetime as dt
import email.policy
import hashlib
import hmac
import logging
import random
import ssl
import sys
import time
from collections.abc import Iterator
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from fleet.notify import (
    RETRY_FOR_S,
    SIGNATURE_HEADER,
    DeliveryError,
    Notice,
    NotifyError,
    SmtpServer,
    apprise_channel,
    channel_kind,
    deliver,
    fingerprint,
    new_secret,
    parse_smtp_url,
    redact,
    render,
    resend_interval,
    retry_delay,
    test_notices,
    verify,
)
from fleet.notify.alertmanager import FIRING_VALID_FOR_S
from fleet.notify.retry import RETRY_CAP_S
from tests.collector.http_recorder import Recorder, recording
from tests.helpers import free_port

needs_apprise = pytest.mark.skipif(not apprise_channel.available(),
                                   reason="apprise is not installed: pip install 'fleet-telemetry[notify]'")

T0 = 1764000000.0


def notice(machine: str = "web-1", *, status: str = "firing", rule: str = "machine-offline", org: str = "acme",
           severity: str = "critical", value: float | None = None, ends_at: float | None = None,
           labels: dict[str, str] | None = None) -> Notice:
    """A notice as the alerts side builds it."""
    if status == "resolved" and ends_at is None:
        ends_at = T0 + 300
    return Notice(status=status, org=org, rule=rule, machine_id=machine, severity=severity,
                  summary=f"{machine} is offline (status == offline for 2m)", value=value, starts_at=T0,
                  ends_at=ends_at, fingerprint=fingerprint(org, rule, machine, severity, labels),
                  machine_labels=labels or {})


def parse_time(text: str) -> float:
    """An RFC 3339 time as Unix seconds."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.fixture
def receiver() -> Iterator[Recorder]:
    """An HTTP server on loopback that records what channels POST."""
    with recording() as rec:
        yield rec


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A CA made at test time."""
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A server TLS context with a certificate for 127.0.0.1 and localhost."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def trust_ca(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Clients (urllib, smtplib) trust the test CA, as SSL_CERT_FILE makes any OpenSSL client do."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    return path


# --- the value objects and helpers ------------------------------------------------------------------------------


def test_notice_validates_itself() -> None:
    assert notice().status == "firing"
    with pytest.raises(NotifyError, match="firing or resolved"):
        notice(status="pending")
    with pytest.raises(NotifyError, match="ends_at"):
        Notice("resolved", "acme", "r", "m", "warning", "", None, T0, None, "f")
    with pytest.raises(NotifyError, match="ends_at"):
        Notice("firing", "acme", "r", "m", "warning", "", None, T0, T0 + 1, "f")
    with pytest.raises(NotifyError, match="finite"):
        notice(value=float("nan"))
    with pytest.raises(NotifyError, match="org"):
        notice(org="")
    assert NotifyError.__mro__[1] is Exception  # the notify package's error root
    assert issubclass(DeliveryError, NotifyError)


def test_fingerprint_is_stable_per_labelset() -> None:
    first = fingerprint("acme", "machine-offline", "web-1", "critical")
    assert first == fingerprint("acme", "machine-offline", "web-1", "critical")
    assert len(first) == 16
    assert int(first, 16) >= 0
    assert first != fingerprint("acme", "machine-offline", "web-2", "critical")
    assert first != fingerprint("globex", "machine-offline", "web-1", "critical")


def test_channel_test_notice_names_org_and_channel() -> None:
    (only,) = test_notices("acme", "ops-hook")
    assert only.status == "firing"
    assert only.org == "acme"
    assert "ops-hook" in only.summary
    assert "acme" in only.summary
    assert only.fingerprint == fingerprint(only.org, only.rule, only.machine_id, only.severity)
    assert abs(only.starts_at - time.time()) < 60


@pytest.mark.parametrize(("url", "kind"), [
    ("https://hooks.example.com/fleet", "webhook"),
    ("http://127.0.0.1:8080/hook?x=1", "webhook"),
    ("alertmanager+http://127.0.0.1:9093", "alertmanager"),
    ("alertmanager+https://am.example.com:443/prefix", "alertmanager"),
    ("mailto:ops@example.com", "email"),
    ("mailto:ops@example.com,oncall@example.org", "email"),
    pytest.param("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ/#alerts", "apprise", marks=needs_apprise),
    pytest.param("tgram://123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/12315544", "apprise", marks=needs_apprise),
    pytest.param("ntfys://ntfy.sh/fleet-alerts", "apprise", marks=needs_apprise),
    pytest.param("json://127.0.0.1:8080/hook", "apprise", marks=needs_apprise),
])
def test_channel_kind(url: str, kind: str) -> None:
    assert channel_kind(url) == kind


@pytest.mark.parametrize(("url", "problem"), [
    ("", "empty"),
    ("hooks.example.com/fleet", "not a channel URL"),
    ("https:///nohost", "needs a host"),
    ("https://example.com:99999/x", "bad port"),
    ("alertmanager+http://127.0.0.1", "HOST:PORT"),
    ("alertmanager://127.0.0.1:9093", "alertmanager\\+http"),
    ("mailto:", "needs an address"),
    ("mailto:not-an-address", "not an email address"),
    ("mailto:ops@example.com?subject=hi", "addresses only"),
    ("https://example.com/a b", "spaces"),
    pytest.param("nosuchservice://token", "Apprise", marks=needs_apprise),
])
def test_channel_kind_refuses_with_one_line(url: str, problem: str) -> None:
    with pytest.raises(NotifyError, match=problem) as info:
        channel_kind(url)
    assert "\n" not in str(info.value)


def test_apprise_url_without_apprise_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "apprise", None)  # what `import apprise` sees when it is not installed
    with pytest.raises(NotifyError, match=r"pip install 'fleet-telemetry\[notify\]'") as info:
        channel_kind("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ")
    assert "TIiajkdnlazkcOXrIdevi7FQ" not in str(info.value)
    with pytest.raises(DeliveryError, match="fleet-telemetry") as info:
        deliver("apprise", "discord://1234/abcd", None, [notice()], "g", smtp_url=None)
    assert info.value.retryable is False


def test_new_secret() -> None:
    secrets = {new_secret("webhook") for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret is not None
        assert len(secret) >= 43
    assert new_secret("alertmanager") is None
    assert new_secret("email") is None
    assert new_secret("apprise") is None
    with pytest.raises(NotifyError):
        new_secret("pager")


def test_retry_delay_is_capped_exponential_full_jitter() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (6, 64.0), (9, RETRY_CAP_S), (10**6, RETRY_CAP_S)]:
        samples = [retry_delay(attempt, rng) for _ in range(400)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert min(samples) < ceiling * 0.1
        assert max(samples) > ceiling * 0.9
    assert retry_delay(0, rng) <= 2.0
    assert [retry_delay(n, random.Random(1)) for n in range(1, 6)] == \
        [retry_delay(n, random.Random(1)) for n in range(1, 6)]
    # Within the hour of retries a delivery gets many tries, the later ones minutes apart.
    elapsed, tries = 0.0, 0
    while elapsed < RETRY_FOR_S:
        tries += 1
        elapsed += retry_delay(tries, rng)
    assert RETRY_FOR_S == 3600.0
    assert 12 <= tries <= 60


def test_resend_interval() -> None:
    assert resend_interval("alertmanager") == 60.0
    assert FIRING_VALID_FOR_S > 60.0  # a firing alert outlives several re-sends
    assert resend_interval("webhook") is None
    assert resend_interval("email") is None
    assert resend_interval("apprise") is None


def test_subject_and_body_count_and_list_the_alerts() -> None:
    three = [notice(f"web-{i}") for i in (1, 2, 3)]
    assert render.subject(three) == "[FIRING:3] acme: machine-offline"
    one_resolved = [notice("db-1", status="resolved", rule="disk-full")]
    assert render.subject(one_resolved) == "[RESOLVED:1] acme: disk-full (db-1)"
    mixed = [*three, notice("db-1", status="resolved", rule="disk-full", severity="warning", value=93.5)]
    assert render.subject(mixed) == "[FIRING:3] acme: machine-offline"
    other_rule = [*mixed, notice("db-2", rule="disk-full")]
    assert render.subject(other_rule) == "[FIRING:4] acme: disk-full, machine-offline"
    text = render.body(mixed, "group-1")
    assert "3 firing, 1 resolved" in text
    assert "FIRING (3)" in text
    assert "RESOLVED (1)" in text
    for i in (1, 2, 3):
        assert f"web-{i} is offline (status == offline for 2m)" in text
    assert "[warning] disk-full on db-1" in text
    assert "value 93.5" in text
    assert "2025-11-24 16:00:00 UTC" in text  # T0, readable
    many = [notice(f"m-{i:03}") for i in range(500)]
    short = render.body(many, "g", max_listed=20)
    assert "500 firing" in short
    assert "m-019 is offline" in short
    assert "m-020" not in short
    assert "… and 480 more" in short
    assert "m-499 is offline" in render.body(many, "g")  # email lists them all


# --- webhook ------------------------------------------------------------------------------------------------------


def test_webhook_posts_alertmanager_format_signed(receiver: Recorder) -> None:
    secret = new_secret("webhook")
    notices = [notice("web-1"), notice("web-2", value=1.0), notice("db-1", status="resolved")]
    deliver("webhook", receiver.url + "/hook", secret, notices, "acme/3", smtp_url=None,
            receiver="ops", external_url="https://fleet.example.com")
    (request,) = receiver.wait_for_count(1)
    assert request.method == "POST"
    assert request.path == "/hook"
    assert request.headers["Content-Type"] == "application/json"
    assert secret is not None
    expected = "sha256=" + hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
    assert request.headers[SIGNATURE_HEADER] == expected
    assert verify(secret, request.body, request.headers[SIGNATURE_HEADER])
    assert not verify("another-secret", request.body, request.headers[SIGNATURE_HEADER])
    assert not verify(secret, request.body + b" ", request.headers[SIGNATURE_HEADER])

    body = request.json()
    assert body["version"] == "4"
    assert body["status"] == "firing"
    assert body["groupKey"] == "acme/3"
    assert body["receiver"] == "ops"
    assert body["externalURL"] == "https://fleet.example.com"
    assert body["truncatedAlerts"] == 0
    assert body["groupLabels"] == {"org": "acme"}
    assert body["commonLabels"] == {"alertname": "machine-offline", "org": "acme", "severity": "critical"}
    assert body["commonAnnotations"] == {}
    assert [a["labels"]["machine_id"] for a in body["alerts"]] == ["web-1", "web-2", "db-1"]
    first, _, resolved = body["alerts"]
    assert set(first) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
    assert first["status"] == "firing"
    assert first["labels"] == {"alertname": "machine-offline", "org": "acme", "machine_id": "web-1",
                               "severity": "critical"}
    assert first["annotations"] == {"summary": "web-1 is offline (status == offline for 2m)"}
    assert parse_time(first["startsAt"]) == T0
    assert first["endsAt"] == "0001-01-01T00:00:00Z"
    assert first["fingerprint"] == fingerprint("acme", "machine-offline", "web-1", "critical")
    assert resolved["status"] == "resolved"
    assert parse_time(resolved["endsAt"]) == T0 + 300


def test_every_notification_carries_the_machines_labels(receiver: Recorder) -> None:
    labelled = [notice("web-1", labels={"env": "prod", "role": "web"}), notice("web-2", labels={"env": "prod"}),
                notice("bare")]
    deliver("webhook", receiver.url, "s3cret", labelled, "g", smtp_url=None)
    body = receiver.wait_for_count(1)[0].json()
    assert body["alerts"][0]["labels"] == {"env": "prod", "role": "web", "alertname": "machine-offline",
                                           "org": "acme", "machine_id": "web-1", "severity": "critical"}
    assert body["alerts"][0]["fingerprint"] == fingerprint("acme", "machine-offline", "web-1", "critical",
                                                           {"env": "prod", "role": "web"})
    assert "env" not in body["commonLabels"]  # bare has none
    text = render.body(labelled, "g")
    assert "  labels: env=prod, role=web\n" in text
    assert text.count("labels:") == 2
    # A machine label named like one of fleet's own does not replace it.
    assert notice("m", labels={"severity": "low", "org": "x"}).labels["severity"] == "critical"
    with pytest.raises(NotifyError, match="machine_labels"):
        Notice(status="firing", org="acme", rule="r", machine_id="m", severity="warning", summary="", value=None,
               starts_at=T0, ends_at=None, fingerprint="f", machine_labels={"env": 3})  # type: ignore[dict-item]


def test_webhook_all_resolved_is_resolved(receiver: Recorder) -> None:
    deliver("webhook", receiver.url, "s3cret", [notice(status="resolved")], "g", smtp_url=None)
    assert receiver.wait_for_count(1)[0].json()["status"] == "resolved"


def test_webhook_500_alerts_are_one_post(receiver: Recorder) -> None:
    deliver("webhook", receiver.url, "s3cret", [notice(f"m-{i}") for i in range(500)], "g", smtp_url=None)
    (request,) = receiver.wait_for_count(1)
    assert len(request.json()["alerts"]) == 500


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (502, True), (503, True),
                                                   (400, False), (401, False), (404, False), (410, False),
                                                   (429, False)])
def test_webhook_status_decides_retry(receiver: Recorder, status: int, retryable: bool) -> None:
    receiver.status = status
    with pytest.raises(DeliveryError, match=f"HTTP {status}") as info:
        deliver("webhook", receiver.url + "/hook", "s3cret", [notice()], "g", smtp_url=None)
    assert info.value.retryable is retryable
    assert "refused by test" in str(info.value)  # the receiver's reason, for `channel list`


def test_webhook_redirect_is_not_followed(receiver: Recorder) -> None:
    with recording() as elsewhere:
        receiver.status, receiver.location = 301, elsewhere.url + "/moved"
        with pytest.raises(DeliveryError, match="301") as info:
            deliver("webhook", receiver.url, "s3cret", [notice()], "g", smtp_url=None)
        assert info.value.retryable is False
        assert elsewhere.requests == []


def test_webhook_timeout_is_retryable(receiver: Recorder) -> None:
    receiver.hang = True
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="no answer within 0.3 s") as info:
        deliver("webhook", receiver.url, "s3cret", [notice()], "g", smtp_url=None, timeout=0.3)
    assert info.value.retryable is True
    assert time.monotonic() - started < 5


def test_webhook_connection_refused_is_retryable() -> None:
    with pytest.raises(DeliveryError, match="cannot connect") as info:
        deliver("webhook", f"http://127.0.0.1:{free_port()}/hook", "s3cret", [notice()], "g", smtp_url=None)
    assert info.value.retryable is True


def test_webhook_without_secret_is_refused(receiver: Recorder) -> None:
    with pytest.raises(DeliveryError, match="signing secret") as info:
        deliver("webhook", receiver.url, None, [notice()], "g", smtp_url=None)
    assert info.value.retryable is False
    assert receiver.requests == []


def test_webhook_basic_auth_from_userinfo(receiver: Recorder) -> None:
    deliver("webhook", f"http://fleet:pa%24%24word@127.0.0.1:{receiver.port}/hook", "s3cret", [notice()], "g",
            smtp_url=None)
    (request,) = receiver.wait_for_count(1)
    assert request.headers["Authorization"] == "Basic ZmxlZXQ6cGEkJHdvcmQ="  # fleet:pa$$word


def test_webhook_over_https(server_tls: ssl.SSLContext, trust_ca: Path) -> None:
    rec = Recorder()
    rec.use_tls(server_tls)
    rec.start()
    try:
        deliver("webhook", f"https://localhost:{rec.port}/hook", "s3cret", [notice()], "g", smtp_url=None)
        assert rec.wait_for_count(1)[0].json()["alerts"][0]["labels"]["machine_id"] == "web-1"
    finally:
        rec.stop()


def test_webhook_untrusted_certificate_is_not_retried(server_tls: ssl.SSLContext) -> None:
    rec = Recorder()
    rec.use_tls(server_tls)
    rec.start()
    try:
        with pytest.raises(DeliveryError, match="certificate") as info:
            deliver("webhook", f"https://localhost:{rec.port}/hook", "s3cret", [notice()], "g", smtp_url=None)
        assert info.value.retryable is False
        assert rec.requests == []
    finally:
        rec.stop()


# --- Alertmanager's API (its real delivery is in test_notify_alertmanager.py) -------------------------------------


def test_alertmanager_posts_to_api_v2(receiver: Recorder) -> None:
    url = f"alertmanager+http://127.0.0.1:{receiver.port}/am/"
    before = time.time()
    deliver("alertmanager", url, None, [notice("web-1", value=3.0), notice("db-1", status="resolved")], "g",
            smtp_url=None, external_url="https://fleet.example.com")
    (request,) = receiver.wait_for_count(1)
    assert request.path == "/am/api/v2/alerts"
    firing, resolved = request.json()
    assert firing["labels"] == {"alertname": "machine-offline", "org": "acme", "machine_id": "web-1",
                                "severity": "critical"}
    assert firing["annotations"] == {"summary": "web-1 is offline (status == offline for 2m)"}
    assert parse_time(firing["startsAt"]) == T0
    assert firing["generatorURL"] == "https://fleet.example.com"
    # Firing: valid for a few resend intervals (it resolves by itself only if fleet stops re-sending).
    assert before + FIRING_VALID_FOR_S - 1 <= parse_time(firing["endsAt"]) <= time.time() + FIRING_VALID_FOR_S + 1
    assert parse_time(resolved["endsAt"]) == T0 + 300


def test_alertmanager_400_is_not_retried(receiver: Recorder) -> None:
    receiver.status = 400
    with pytest.raises(DeliveryError) as info:
        deliver("alertmanager", f"alertmanager+http://127.0.0.1:{receiver.port}", None, [notice()], "g",
                smtp_url=None)
    assert info.value.retryable is False


# --- email --------------------------------------------------------------------------------------------------------


class Mailbox:
    """An aiosmtpd handler that keeps every message with its envelope and whether it came over TLS."""

    def __init__(self, rcpt_reply: str | None = None) -> None:
        self.messages: list[tuple[Any, EmailMessage, bool]] = []
        self.rcpt_reply = rcpt_reply

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        tls = session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None
        msg = message_from_bytes(envelope.original_content, policy=email.policy.default)
        self.messages.append((envelope, msg, tls))
        return "250 Message accepted"


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"fleet@example.com", b"hunter2!")
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 535 itself


@pytest.fixture
def smtp_servers() -> Iterator[Any]:
    """Start aiosmtpd controllers with ``smtp_servers(handler, **options)``; all stopped after the test."""
    started: list[Controller] = []

    def start(handler: Any, **options: Any) -> int:
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, **options)
        controller.start()
        started.append(controller)
        return port

    yield start
    for controller in started:
        controller.stop()


def mail(smtp_url: str | None, notices: list[Notice] | None = None) -> None:
    """Deliver to ``mailto:ops@example.com`` through ``smtp_url``."""
    deliver("email", "mailto:ops@example.com", None, notices or [notice()], "g", smtp_url=smtp_url)


def test_email_plain_lists_alerts(smtp_servers: Any) -> None:
    box = Mailbox()
    port = smtp_servers(box)
    notices = [notice(f"web-{i}") for i in (1, 2, 3)]
    deliver("email", "mailto:ops@example.com,oncall@example.org", None, notices, "acme/1",
            smtp_url=f"smtp://127.0.0.1:{port}?from=fleet@example.com")
    ((envelope, msg, tls),) = box.messages
    assert envelope.mail_from == "fleet@example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "oncall@example.org"]
    assert msg["Subject"] == "[FIRING:3] acme: machine-offline"
    assert msg["To"] == "ops@example.com, oncall@example.org"
    assert msg["Message-ID"]
    text = msg.get_content()
    assert "FIRING (3)" in text
    assert "web-3 is offline (status == offline for 2m)" in text
    assert tls is False


def test_email_starttls_when_offered(smtp_servers: Any, server_tls: ssl.SSLContext, trust_ca: Path) -> None:
    box = Mailbox()
    port = smtp_servers(box, tls_context=server_tls, require_starttls=True)
    mail(f"smtp://localhost:{port}?from=fleet@example.com", [notice(status="resolved")])
    ((_, msg, tls),) = box.messages
    assert tls is True
    assert msg["Subject"] == "[RESOLVED:1] acme: machine-offline (web-1)"


def test_email_starttls_untrusted_certificate_fails(smtp_servers: Any, server_tls: ssl.SSLContext) -> None:
    box = Mailbox()
    port = smtp_servers(box, tls_context=server_tls, require_starttls=True)
    with pytest.raises(DeliveryError, match="certificate") as info:
        mail(f"smtp://localhost:{port}")
    assert info.value.retryable is False
    assert box.messages == []


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_email_login_over_tls(smtp_servers: Any, server_tls: ssl.SSLContext, trust_ca: Path, scheme: str) -> None:
    """smtp:// upgrades with STARTTLS before the login; smtps:// is TLS from the first byte."""
    box = Mailbox()
    if scheme == "smtp":
        port = smtp_servers(box, tls_context=server_tls, authenticator=_authenticator, auth_required=True)
    else:  # aiosmtpd counts only STARTTLS as TLS for AUTH; this connection is TLS from its first byte
        port = smtp_servers(box, ssl_context=server_tls, authenticator=_authenticator, auth_require_tls=False)
    mail(f"{scheme}://fleet%40example.com:hunter2%21@localhost:{port}")
    ((envelope, _, tls),) = box.messages
    assert tls is True
    assert envelope.mail_from == "fleet@example.com"  # the login is the sender by default


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_email_wrong_password_is_not_retried_and_not_shown(smtp_servers: Any) -> None:
    box = Mailbox()
    # A server on loopback without TLS: the one place a password may go in clear (like Go's net/smtp).
    port = smtp_servers(box, authenticator=_authenticator, auth_required=True, auth_require_tls=False)
    url = f"smtp://fleet%40example.com:wrong-Passw0rd@127.0.0.1:{port}"
    with pytest.raises(DeliveryError, match="login refused") as info:
        mail(url)
    assert info.value.retryable is False
    assert "wrong-Passw0rd" not in str(info.value) + repr(info.value)
    mail(f"smtp://fleet%40example.com:hunter2%21@127.0.0.1:{port}")
    assert len(box.messages) == 1


@pytest.mark.parametrize(("reply", "retryable"), [("550 5.1.1 no such user", False),
                                                  ("451 4.3.0 try again later", True)])
def test_email_refused_recipient(smtp_servers: Any, reply: str, retryable: bool) -> None:
    port = smtp_servers(Mailbox(rcpt_reply=reply))
    with pytest.raises(DeliveryError, match="recipients refused") as info:
        mail(f"smtp://127.0.0.1:{port}")
    assert info.value.retryable is retryable
    assert reply.split()[0] in str(info.value)


def test_email_needs_smtp_url() -> None:
    with pytest.raises(DeliveryError, match="FLEET_SMTP_URL") as info:
        mail(None)
    assert info.value.retryable is False
    with pytest.raises(DeliveryError, match="not an SMTP URL") as info:
        mail("http://mail:25")
    assert info.value.retryable is False


def test_unusable_channel_is_a_delivery_error_not_retried() -> None:
    for kind, url in [("email", "mailto:nobody"), ("pager", "https://example.com/"), ("webhook", "https://h:x/")]:
        with pytest.raises(DeliveryError) as info:
            deliver(kind, url, "s3cret", [notice()], "g", smtp_url="smtp://127.0.0.1:25")
        assert info.value.retryable is False


def test_email_server_down_is_retryable() -> None:
    with pytest.raises(DeliveryError) as info:
        mail(f"smtp://127.0.0.1:{free_port()}")
    assert info.value.retryable is True


def test_parse_smtp_url() -> None:
    server = parse_smtp_url("smtp://alerts%40example.com:s3cr%40t@mail.example.com:587")
    assert (server.host, server.port, server.implicit_tls) == ("mail.example.com", 587, False)
    assert (server.username, server.password, server.sender) == ("alerts@example.com", "s3cr@t", "alerts@example.com")
    assert parse_smtp_url("smtps://mail.example.com").port == 465
    assert parse_smtp_url("smtp://mail.example.com?from=fleet@example.com").port == 25
    assert parse_smtp_url("smtp://relay.example.com?from=fleet@example.com").sender == "fleet@example.com"
    for bad in ("mail.example.com:25", "smtp://", "smtp://h:x", "smtp://h/path", "smtp://h?tls=1"):
        with pytest.raises(NotifyError):
            parse_smtp_url(bad)


# --- Apprise ------------------------------------------------------------------------------------------------------


@needs_apprise
def test_apprise_json_delivers_subject_and_body(receiver: Recorder) -> None:
    url = f"json://127.0.0.1:{receiver.port}/notify"
    assert channel_kind(url) == "apprise"
    deliver("apprise", url, None, [notice("web-1"), notice("web-2")], "acme/7", smtp_url=None)
    (request,) = receiver.wait_for_count(1)
    assert request.path == "/notify"
    body = request.json()
    assert body["title"] == "[FIRING:2] acme: machine-offline"
    assert "FIRING (2)" in body["message"]
    assert "web-2 is offline (status == offline for 2m)" in body["message"]
    assert body["type"] == "failure"  # critical firing


@needs_apprise
@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (404, False), (400, False)])
def test_apprise_failure_reason_and_retry(receiver: Recorder, status: int, retryable: bool) -> None:
    receiver.status = status
    with pytest.raises(DeliveryError, match="Apprise could not deliver") as info:
        deliver("apprise", f"json://127.0.0.1:{receiver.port}/", None, [notice(status="resolved")], "g",
                smtp_url=None)
    assert info.value.retryable is retryable
    assert str(status) in str(info.value)


@needs_apprise
def test_apprise_connection_refused_is_retryable() -> None:
    with pytest.raises(DeliveryError) as info:
        deliver("apprise", f"json://127.0.0.1:{free_port()}/", None, [notice()], "g", smtp_url=None, timeout=2)
    assert info.value.retryable is True


# --- secrets never shown ------------------------------------------------------------------------------------------

SECRET_URLS = [
    ("https://hooks.example.com/services/T000/B000/XXXXsecretXXXX", ["XXXXsecretXXXX"], "https://hooks.example.com/***"),
    ("https://user:pa55word@hooks.example.com:8443/h?token=t0ken1234", ["pa55word", "t0ken1234"],
     "https://***@hooks.example.com:8443/***"),
    ("alertmanager+https://admin:pa55word@am.example.com:9093", ["pa55word"],
     "alertmanager+https://***@am.example.com:9093"),
    ("smtp://alerts:pa55word@mail.example.com:587", ["pa55word"], "smtp://***@mail.example.com:587"),
    ("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ/#alerts", ["T1JJ3T3L2", "TIiajkdnlazkcOXrIdevi7FQ"],
     "slack://***/***"),
    ("tgram://123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/12315544", ["AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"],
     "tgram://***/***"),
    ("discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js", ["JHMHI8qBe7bk2ZwO5U711o3dV_js"], "discord://***/***"),
    ("ntfys://ntfy.sh/private-topic-42", ["private-topic-42"], "ntfys://ntfy.sh/***"),
    ("json://user:pa55word@127.0.0.1:8080/t0kenpath?x=1", ["pa55word", "t0kenpath"], "json://***@127.0.0.1:8080/***"),
    ("mailto:ops@example.com", [], "mailto:ops@example.com"),
]


@pytest.mark.parametrize(("url", "secrets", "shown"), SECRET_URLS)
def test_redact_keeps_scheme_host_port_only(url: str, secrets: list[str], shown: str) -> None:
    assert redact(url) == shown
    for secret in secrets:
        assert secret not in redact(url)


def test_url_parts_repr_shows_no_secret() -> None:
    from fleet.notify.urls import split

    parts = split("tgram://123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/12315544?x=pa55word")
    assert parts is not None
    assert "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw" not in repr(parts)
    assert "pa55word" not in repr(split("json://u:pa55word@h:1/p")) + repr(split("https://h/?t=pa55word"))


def test_smtp_password_not_in_repr() -> None:
    server = parse_smtp_url("smtp://alerts:pa55word@mail.example.com:587?from=a@example.com")
    assert "pa55word" not in repr(server)
    assert "pa55word" not in str(server)
    assert isinstance(server, SmtpServer)
    assert server.password == "pa55word"


def test_bad_urls_do_not_echo_their_secrets() -> None:
    for url in ("alertmanager+http://admin:pa55word@127.0.0.1", "https://admin:pa55word@h:99999/x",
                "smtp://admin:pa55word@h:x", "smtp://admin:pa55word@h/path"):
        with pytest.raises(NotifyError) as info:
            channel_kind(url) if not url.startswith("smtp") else parse_smtp_url(url)
        assert "pa55word" not in str(info.value)
        assert "pa55word" not in repr(info.value)


def test_webhook_secret_and_url_token_never_logged(receiver: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = new_secret("webhook")
    assert secret is not None
    url = f"http://fleet:pa55word@127.0.0.1:{receiver.port}/t0kenpath"
    deliver("webhook", url, secret, [notice()], "g", smtp_url=None)
    receiver.status = 503
    with pytest.raises(DeliveryError) as info:
        deliver("webhook", url, secret, [notice()], "g", smtp_url=None)
    shown = str(info.value) + repr(info.value) + caplog.text
    for leaked in (secret, "pa55word", "t0kenpath"):
        assert leaked not in shown
    assert f"127.0.0.1:{receiver.port}" in str(info.value)  # but where it failed is said


@needs_apprise
def test_apprise_tokens_never_logged(receiver: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    """Apprise and urllib3 log the URLs they POST to at DEBUG; the scrubbing filter hides the tokens."""
    caplog.set_level(logging.DEBUG)
    url = f"json://fleet:pa55word@127.0.0.1:{receiver.port}/t0kenpath?:X-Token=h3aderT0ken"
    deliver("apprise", url, None, [notice()], "g", smtp_url=None)
    assert receiver.wait_for_count(1)[0].path == "/t0kenpath"
    receiver.status = 500
    with pytest.raises(DeliveryError) as info:
        deliver("apprise", url, None, [notice()], "g", smtp_url=None)
    assert any("127.0.0.1" in r.getMessage() for r in caplog.records)  # apprise did log, scrubbed
    shown = str(info.value) + repr(info.value) + caplog.text
    for leaked in ("pa55word", "t0kenpath", "h3aderT0ken"):
        assert leaked not in shown


def test_loopback_is_the_only_cleartext_login_host() -> None:
    from fleet.notify.mail import is_loopback

    assert is_loopback("127.0.0.1")
    assert is_loopback("localhost")
    assert is_loopback("::1")
    assert not is_loopback("mail.example.com")
    assert not is_loopback("10.0.0.1")


def test_an_acknowledged_notice_says_who_in_its_annotations_and_text() -> None:
    acked = Notice("resolved", "acme", "r", "m", "warning", "s", None, T0, T0 + 1, "f", acked_by="neo@example.com")
    assert acked.annotations == {"summary": "s", "acked_by": "neo@example.com"}
    assert notice().annotations == {"summary": notice().summary}
    assert "acknowledged by neo@example.com" in render.body([acked], "g")
    with pytest.raises(NotifyError, match="acked_by"):
        Notice("firing", "acme", "r", "m", "warning", "s", None, T0, None, "f", acked_by=3)
