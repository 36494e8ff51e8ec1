"""One JSON POST over urllib for the webhook and Alertmanager channels, its failures sorted into retryable or not."""

from __future__ import annotations

import base64
import http.client
import ssl
import urllib.error
import urllib.request
from urllib.parse import unquote, urlsplit, urlunsplit

from fleet.notify.errors import DeliveryError
from fleet.notify.urls import redact

USER_AGENT = "fleet-telemetry/0.1 (alerts)"
MAX_REASON_CHARS = 200
MAX_READ_BYTES = 64 * 1024


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A receiver that redirects is misconfigured: urllib would turn the POST into a GET and drop the body."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "…"


def _without_userinfo(url: str) -> tuple[str, str | None]:
    """The URL without ``user:password@`` and the Basic Authorization header they stand for."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    auth = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), auth


def _http_error(shown: str, error: urllib.error.HTTPError) -> DeliveryError:
    try:
        detail = error.read(MAX_REASON_CHARS * 4).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        detail = ""
    finally:
        error.close()
    code = error.code
    message = f"{shown}: HTTP {code} {error.reason}" + (f": {_one_line(detail)}" if detail.strip() else "")
    if 300 <= code < 400:
        message += " (redirects are not followed: put the final URL in the channel)"
    return DeliveryError(message, retryable=code >= 500)


def _transport_error(shown: str, reason: object, timeout: float) -> DeliveryError:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return DeliveryError(f"{shown}: TLS certificate not trusted: {reason.verify_message}", retryable=False)
    if isinstance(reason, TimeoutError):
        return DeliveryError(f"{shown}: no answer within {timeout:g} s", retryable=True)
    return DeliveryError(f"{shown}: cannot connect: {_one_line(str(reason))}", retryable=True)


def post_json(url: str, body: bytes, timeout: float, headers: dict[str, str] | None = None) -> int:
    """POST ``body`` as JSON; returns the 2xx status. DeliveryError: 5xx, timeouts and network retryable, else not."""
    shown = redact(url)
    try:
        target, auth = _without_userinfo(url)
        request = urllib.request.Request(target, data=body, method="POST")
    except ValueError:
        raise DeliveryError(f"{shown}: bad URL", retryable=False) from None
    request.add_header("Content-Type", "application/json")
    request.add_header("User-Agent", USER_AGENT)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    if auth:
        request.add_header("Authorization", auth)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read(MAX_READ_BYTES)
            return int(response.status)
    # ``from None``: the original errors may quote the URL, and with it a token.
    except urllib.error.HTTPError as exc:
        raise _http_error(shown, exc) from None
    except urllib.error.URLError as exc:
        raise _transport_error(shown, exc.reason, timeout) from None
    except (http.client.InvalidURL, ValueError):  # their text quotes the URL's pieces
        raise DeliveryError(f"{shown}: bad URL", retryable=False) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _transport_error(shown, exc, timeout) from None
