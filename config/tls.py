"""TLS facts every part shares: what a server certificate may be named, and how a CA is fingerprinted.

The fingerprint is the one agents, enrolment tokens and the server's start-up lines agree on: the lowercase hex
SHA-256 of the CA certificate's DER bytes (``openssl x509 -noout -fingerprint -sha256`` prints the same digest
in uppercase with colons).
"""

from __future__ import annotations

import re

# A DNS name as certificates carry it: dot-separated labels of letters, digits, '-' and '_' (private names
# often have one), no label starting or ending with '-', optionally a leading "*." wildcard label.
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
MAX_DNS_NAME = 253


def cert_name(text: str) -> str:
    """``text`` as a certificate names it (an IP address, or a lowercase DNS name); ValueError if it is neither."""
    import ipaddress

    name = text.strip()
    try:
        return str(ipaddress.ip_address(name.split("%", 1)[0]))  # an interface's fe80::1%eth0 is fe80::1
    except ValueError:
        pass
    name = name.lower().removesuffix(".")
    if len(name) > MAX_DNS_NAME or not _DNS_NAME.fullmatch(name) or name.replace(".", "").isdigit():
        raise ValueError(f"{text!r} is neither a DNS name nor an IP address")
    return name


def is_ip_address(name: str) -> bool:
    """True when ``name`` (as ``cert_name`` returns it) is an IP address rather than a DNS name."""
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def ca_fingerprint(pem: bytes | str) -> str:
    """The lowercase hex SHA-256 of the DER bytes of the first certificate in ``pem``."""
    import base64
    import hashlib

    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError("no PEM certificate found")
    der = base64.b64decode("".join(text[start + len(begin):stop].split()), validate=True)
    return hashlib.sha256(der).hexdigest()
