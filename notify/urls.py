"""Channel URLs taken apart by hand: display without secrets, the pieces that are secrets, mailto addresses."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from fleet.notify.errors import NotifyError

HIDDEN = "***"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.DOTALL)
_HOSTNAME = re.compile(r"^(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\.?$")
_ADDRESS = re.compile(r"^[^@\s,<>()\[\]\\;:\"]+@[A-Za-z0-9.-]+$")
_HTTP_SCHEMES = {"http", "https", "alertmanager+http", "alertmanager+https", "smtp", "smtps"}


@dataclass(frozen=True)
class Parts:
    """A hierarchical URL split by hand (Apprise URLs are not always valid for urllib: ``tgram://123:abc/…``)."""

    scheme: str
    # Everything but scheme and port may be a secret (a password, a token where the host would be): no repr.
    userinfo: str | None = field(repr=False)
    host: str = field(repr=False)
    port: int | None
    port_text: str = field(repr=False)  # what followed the host's colon, numeric or not
    rest: str = field(repr=False)  # path, query and fragment, unparsed

    @property
    def username(self) -> str | None:
        """The decoded user name of the userinfo, if any."""
        return None if self.userinfo is None else unquote(self.userinfo.partition(":")[0]) or None

    @property
    def password(self) -> str | None:
        """The decoded password of the userinfo, if any."""
        if self.userinfo is None or ":" not in self.userinfo:
            return None
        return unquote(self.userinfo.partition(":")[2])


def split(url: str) -> Parts | None:
    """``scheme://[userinfo@]host[:port][rest]`` split into parts; None when the URL has no ``//`` authority."""
    match = _SCHEME.match(url)
    if not match or not match.group(2).startswith("//"):
        return None
    scheme, tail = match.group(1).lower(), match.group(2)[2:]
    end = min((i for i in (tail.find(c) for c in "/?#") if i >= 0), default=len(tail))
    netloc, rest = tail[:end], tail[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if hostport.startswith("["):
        host, _, after = hostport[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else after
    else:
        host, _, port_text = hostport.partition(":")
    port = int(port_text) if port_text.isascii() and port_text.isdigit() and int(port_text) < 65536 else None
    return Parts(scheme, userinfo if at else None, host, port, port_text, rest)


def is_hostname(host: str) -> bool:
    """True for an IP address, ``localhost`` or a dotted DNS name (not a token that sits where a host would)."""
    if host.lower() == "localhost" or _HOSTNAME.match(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def redact(url: str) -> str:
    """The URL for display: scheme, host and port kept; userinfo, path, query and tokens hidden."""
    text = url.strip() if isinstance(url, str) else ""
    match = _SCHEME.match(text)
    if not match:
        return HIDDEN
    scheme = match.group(1).lower()
    parts = split(text)
    if parts is None:
        if scheme == "mailto":
            return "mailto:" + match.group(2).partition("?")[0]
        return f"{scheme}:{HIDDEN}"
    shown = f"{scheme}://"
    if parts.userinfo is not None:
        shown += f"{HIDDEN}@"
    numeric_port = parts.port is not None or not parts.port_text
    if numeric_port and (scheme in _HTTP_SCHEMES or is_hostname(parts.host)):
        shown += _host_text(parts.host) + (f":{parts.port}" if parts.port is not None else "")
    else:
        shown += HIDDEN
    if parts.rest not in ("", "/"):
        shown += f"/{HIDDEN}"
    return shown


def secret_parts(url: str) -> list[str]:
    """The pieces of a URL that may be secrets (userinfo, token hosts, path segments, query values), as written
    and decoded; what a log line or an error message about it must never show."""
    parts = split(url)
    if parts is None:
        return []
    pieces = [parts.userinfo or "", parts.username or "", parts.password or ""]
    if not is_hostname(parts.host) or (parts.port_text and parts.port is None):
        pieces += [parts.host, parts.port_text]
    path, _, query = parts.rest.partition("?")
    query, _, fragment = query.partition("#")
    path, _, path_fragment = path.partition("#")
    pieces += path.split("/") + [path_fragment, fragment]
    pieces += [pair.partition("=")[2] for pair in query.split("&")]
    found = {p for piece in pieces for p in (piece, unquote(piece)) if len(p) >= 3}
    return sorted(found, key=len, reverse=True)


def mail_recipients(url: str) -> list[str]:
    """The addresses of a ``mailto:a@example.com[,b@example.com]`` channel; NotifyError when there is none valid."""
    match = _SCHEME.match(url.strip())
    if not match or match.group(1).lower() != "mailto" or match.group(2).startswith("//"):
        raise NotifyError(f"not a mailto: URL: {redact(url)}")
    spec = match.group(2)
    if "?" in spec:
        raise NotifyError("mailto: channel takes addresses only (mailto:ops@example.com,oncall@example.com)")
    addresses = [unquote(a).strip() for a in spec.split(",") if a.strip()]
    if not addresses:
        raise NotifyError("mailto: channel needs an address (mailto:ops@example.com)")
    for address in addresses:
        if not _ADDRESS.match(address):
            raise NotifyError(f"not an email address: {address!r}")
    return addresses


def scheme_of(url: str) -> tuple[str, str] | None:
    """(lower-case scheme, what follows its colon), or None when the text has no scheme."""
    match = _SCHEME.match(url)
    return (match.group(1).lower(), match.group(2)) if match else None
