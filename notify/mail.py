"""The email channel: a plain-text message over SMTP (FLEET_SMTP_URL), STARTTLS when offered, login if asked."""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import smtplib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from urllib.parse import parse_qs

from fleet.notify import render
from fleet.notify.errors import DeliveryError, NotifyError
from fleet.notify.notice import Notice
from fleet.notify.urls import mail_recipients, redact, split

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"smtp": 25, "smtps": 465}
SMTP_URL_HELP = "FLEET_SMTP_URL is smtp://[user:password@]host[:port][?from=ADDR] or smtps://… (implicit TLS)"


@dataclass(frozen=True)
class SmtpServer:
    """Where and how to send mail; the password never shows in a repr."""

    host: str
    port: int
    implicit_tls: bool
    sender: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.host:
            raise NotifyError(f"SMTP server needs a host: {SMTP_URL_HELP}")
        if not 0 < self.port < 65536:
            raise NotifyError(f"SMTP port out of range: {self.port}")
        if "@" not in self.sender:
            raise NotifyError(f"SMTP sender is not an address: {self.sender!r}")


def parse_smtp_url(url: str) -> SmtpServer:
    """The SMTP server of ``smtp://user:pass@host:587?from=fleet@example.com``; NotifyError if unusable."""
    parts = split(url.strip()) if isinstance(url, str) else None
    if parts is None or parts.scheme not in DEFAULT_PORTS:
        raise NotifyError(f"not an SMTP URL ({redact(url)}): {SMTP_URL_HELP}")
    if parts.port_text and parts.port is None:
        raise NotifyError(f"SMTP URL has a bad port: {redact(url)}")
    path, _, query = parts.rest.partition("?")
    if path not in ("", "/"):
        raise NotifyError(f"SMTP URL takes no path: {redact(url)}")
    options = parse_qs(query)
    unknown = set(options) - {"from"}
    if unknown:
        raise NotifyError(f"SMTP URL option(s) not understood: {', '.join(sorted(unknown))} ({SMTP_URL_HELP})")
    username = parts.username
    sender = options["from"][-1] if "from" in options else (
        username if username and "@" in username else f"fleet@{socket.gethostname()}")
    return SmtpServer(host=parts.host, port=parts.port or DEFAULT_PORTS[parts.scheme],
                      implicit_tls=parts.scheme == "smtps", sender=sender, username=username,
                      password=parts.password)


def message(sender: str, recipients: Sequence[str], notices: Sequence[Notice], group_key: str) -> EmailMessage:
    """The notification as a plain-text email."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = render.subject(notices)
    msg["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid("fleet", domain=sender.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: vacation responders stay quiet
    msg.set_content(render.body(notices, group_key))
    return msg


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: the one place a password may travel without TLS."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return " ".join(text.split())


def _smtp_error(where: str, exc: Exception, timeout: float) -> DeliveryError:
    """SMTP's own convention: 4xx replies are transient (retry), 5xx permanent."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        refused = ", ".join(f"{addr} ({code} {_text(reply)})" for addr, (code, reply) in exc.recipients.items())
        return DeliveryError(f"{where}: recipients refused: {refused}", retryable=all(400 <= c < 500 for c in codes))
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return DeliveryError(f"{where}: login refused ({exc.smtp_code} {_text(exc.smtp_error)})", retryable=False)
    if isinstance(exc, smtplib.SMTPResponseException):
        return DeliveryError(f"{where}: {exc.smtp_code} {_text(exc.smtp_error)}",
                             retryable=400 <= exc.smtp_code < 500)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return DeliveryError(f"{where}: {exc}", retryable=False)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return DeliveryError(f"{where}: TLS certificate not trusted: {exc.verify_message}", retryable=False)
    if isinstance(exc, TimeoutError):
        return DeliveryError(f"{where}: no answer within {timeout:g} s", retryable=True)
    return DeliveryError(f"{where}: {type(exc).__name__}: {_text(str(exc))}", retryable=True)


def _connect(server: SmtpServer, timeout: float, context: ssl.SSLContext) -> smtplib.SMTP:
    if server.implicit_tls:
        return smtplib.SMTP_SSL(server.host, server.port, timeout=timeout, context=context)
    return smtplib.SMTP(server.host, server.port, timeout=timeout)


def send(url: str, notices: Sequence[Notice], group_key: str, *, smtp_url: str | None, timeout: float) -> None:
    """Mail the notification to the channel's addresses through the configured SMTP server."""
    recipients = mail_recipients(url)
    if not smtp_url:
        raise DeliveryError("email channels need an SMTP server: set FLEET_SMTP_URL "
                            "(e.g. smtp://user:password@mail.example.com:587)", retryable=False)
    try:
        server = parse_smtp_url(smtp_url)
    except NotifyError as exc:
        raise DeliveryError(str(exc), retryable=False) from None
    where = f"SMTP {server.host}:{server.port}"
    msg = message(server.sender, recipients, notices, group_key)
    context = ssl.create_default_context()
    try:
        client = _connect(server, timeout, context)
    except (smtplib.SMTPException, OSError) as exc:
        raise _smtp_error(where, exc, timeout) from None
    try:
        client.ehlo()
        encrypted = server.implicit_tls
        if not encrypted and client.has_extn("starttls"):
            client.starttls(context=context)
            client.ehlo()
            encrypted = True
        if server.username is not None:
            if not encrypted and not is_loopback(server.host):
                raise DeliveryError(f"{where} offers no STARTTLS: the password is not sent in clear "
                                    "(use smtps:// or a server with STARTTLS)", retryable=False)
            client.login(server.username, server.password or "")
        refused = client.send_message(msg, from_addr=server.sender, to_addrs=list(recipients))
        if refused:  # some got it: a retry would send them duplicates
            log.warning("%s: mail delivered, but refused for %s", where, ", ".join(sorted(refused)))
    except (smtplib.SMTPException, OSError) as exc:
        # ``from None``: the login exchange may echo credentials back in an error
        raise _smtp_error(where, exc, timeout) from None
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()
