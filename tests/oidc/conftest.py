"""A real OpenID Provider on loopback (oidc-provider run by node, tests/oidc/provider.js) and fleet's web app
served by waitress on a socket bound first, so each knows the other's address before either starts."""

from __future__ import annotations

import contextlib
import json
import queue
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

import pytest
import requests
from waitress.server import create_server

from fleet.config.settings import Settings
from fleet.store.database import open_database
from fleet.store.pepper import key_pepper
from fleet.web.app import create_app
from tests import stores
from tests.helpers import wait_for

HERE = Path(__file__).resolve().parent
PROVIDER_JS = HERE / "provider.js"
NODE_MODULES = HERE / "node" / "node_modules" / "oidc-provider"
START_TIMEOUT_S = 30.0
CLIENT_ID = "fleet-dashboard"
# Logins of the provider's accounts (its development sign-in page takes any password).
ACCOUNTS = {
    "alice": {"email": "Alice@Example.com", "email_verified": True},  # a fleet person (stored lowercased)
    "mallory": {"email": "mallory@example.com", "email_verified": True},  # verified, but no fleet account
    "carol": {"email": "carol@example.com", "email_verified": False},  # a fleet person, email not verified
    "nomail": {},  # no email at all
}


@dataclass
class Provider:
    """The running provider: its issuer URL and the client fleet is registered as."""

    issuer: str
    client_secret: str
    proc: subprocess.Popen
    output: list[str] = field(default_factory=list)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_provider(redirect_uri: str, email_in_id_token: bool = True) -> Provider:
    """Start provider.js; read back the port it prints, then wait for its discovery document (both bounded)."""
    node = shutil.which("node")
    if node is None or not NODE_MODULES.is_dir():
        pytest.fail("node or the npm package oidc-provider is missing: ./scripts/test installs both")
    secret = secrets.token_urlsafe(32)
    config = {"client_id": CLIENT_ID, "client_secret": secret, "redirect_uris": [redirect_uri],
              "accounts": ACCOUNTS, "email_in_id_token": email_in_id_token}
    proc = subprocess.Popen([node, str(PROVIDER_JS), json.dumps(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="oidc-provider-output", daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    port = None
    try:
        while port is None:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError("provider.js ended before listening:\n" + "\n".join(output))
            if line.startswith("listening "):
                port = int(line.split()[1])
    except queue.Empty:
        proc.kill()
        raise RuntimeError("provider.js did not start in time:\n" + "\n".join(output)) from None
    provider = Provider(f"http://127.0.0.1:{port}", secret, proc, output)

    def discovered() -> bool:
        try:
            return requests.get(f"{provider.issuer}/.well-known/openid-configuration", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_for(discovered, timeout=max(1.0, deadline - time.monotonic()), message="provider discovery")
    except BaseException:
        provider.stop()
        raise
    return provider


@dataclass
class Web:
    """fleet's web app served by waitress in a thread."""

    url: str
    settings: Settings
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        """Stop as fleet.web.server.RunningWeb does: no more requests, every connection closed, the thread joined."""
        self.server.task_dispatcher.shutdown(timeout=5)
        for channel in list(self.server._map.values()):  # noqa: SLF001 - waitress has no public way to close them
            channel.close()
        self.thread.join(10)
        assert not self.thread.is_alive()

    @property
    def callback(self) -> str:
        return f"{self.url}/login/oidc/callback"


def bind_loopback() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def serve(settings: Settings, sock: socket.socket) -> Web:
    with open_database(settings.database) as db:
        pepper = key_pepper(db, settings.data_dir)
    app = create_app(settings)
    app.config["FLEET_PEPPER"] = pepper
    server = create_server(app, sockets=[sock], threads=4, ident="fleet", clear_untrusted_proxy_headers=True)
    thread = threading.Thread(target=server.run, name="fleet-web-oidc", daemon=True)
    thread.start()
    host, port = sock.getsockname()[:2]
    return Web(f"http://{host}:{port}", settings, server, thread)


def add_people(settings: Settings) -> None:
    """fleet's people: alice (operator of acme) and carol (viewer); mallory has no account."""
    from fleet.store.people import add_person

    stores.add_org(settings.data_dir, "acme", settings.database)
    with open_database(settings.database) as db:
        add_person(db, "alice@example.com", {"acme": "operator"}, password=None)
        add_person(db, "carol@example.com", {"acme": "viewer"}, password=None)


@dataclass
class SignOn:
    """A provider and fleet's app, each registered with the other."""

    provider: Provider
    web: Web


@contextlib.contextmanager
def sign_on(data_dir: Path, email_in_id_token: bool = True) -> Iterator[SignOn]:
    """The provider, then fleet's app configured for it; both stopped after."""
    sock = bind_loopback()
    host, port = sock.getsockname()[:2]
    provider = start_provider(f"http://{host}:{port}/login/oidc/callback", email_in_id_token)
    try:
        settings = Settings(data_dir=data_dir, mqtt_port=1, oidc_issuer=provider.issuer, oidc_client_id=CLIENT_ID,
                            oidc_client_secret=provider.client_secret)
        add_people(settings)
        web = serve(settings, sock)
        try:
            yield SignOn(provider, web)
        finally:
            web.stop()
    finally:
        sock.close()
        provider.stop()


@pytest.fixture(scope="module")
def sso(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignOn]:
    """One provider and one app for a module's tests (the provider's accounts and fleet's people differ by test)."""
    with sign_on(tmp_path_factory.mktemp("oidc") / "fleet-data") as running:
        yield running


class _Forms(HTMLParser):
    """The forms of a page: action, method and the named inputs' values."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.forms.append({"action": values.get("action") or "", "method": (values.get("method") or "get"),
                               "fields": {}})
        elif tag == "input" and self.forms and values.get("name"):
            self.forms[-1]["fields"][values["name"]] = values.get("value") or ""


def forms(html: str) -> list[dict[str, Any]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


class Browser:
    """A person's browser: one cookie jar for fleet and the provider, redirects followed one at a time."""

    def __init__(self, sso: SignOn) -> None:
        self.sso = sso
        self.http = requests.Session()
        self.http.headers["Accept"] = "text/html,application/xhtml+xml"
        self.state = ""  # of the last sign-in begun

    def follow(self, response: requests.Response, stop_at: str) -> requests.Response | str:
        """Follow redirects until one leads to a URL starting with ``stop_at`` (returned, not requested)."""
        for _ in range(20):
            if not response.is_redirect:
                return response
            target = urljoin(response.url, response.headers["Location"])
            if target.startswith(stop_at):
                return target
            response = self.http.get(target, allow_redirects=False, timeout=10)
        raise AssertionError("too many redirects")

    def to_provider(self) -> requests.Response:
        """``GET /login/oidc`` and on to the provider's sign-in page."""
        start = self.http.get(f"{self.sso.web.url}/login/oidc", allow_redirects=False, timeout=10)
        assert start.status_code == 302, start.text
        assert start.headers["Location"].startswith(self.sso.provider.issuer + "/")
        self.state = dict(parse_qsl(urlsplit(start.headers["Location"]).query))["state"]
        page = self.follow(start, stop_at=self.sso.web.callback)
        assert isinstance(page, requests.Response), page
        assert page.status_code == 200, page.text
        return page

    def submit(self, page: requests.Response, **fields: str) -> requests.Response | str:
        """Submit the page's first form with these fields; follow on until fleet's callback."""
        form = forms(page.text)[0]
        data = {**form["fields"], **fields}
        response = self.http.post(urljoin(page.url, form["action"]), data=data, allow_redirects=False, timeout=10)
        return self.follow(response, stop_at=self.sso.web.callback)

    def sign_in_at_provider(self, login: str) -> str:
        """Sign in as ``login`` on the provider's page and consent: the callback URL it sends the browser to."""
        step: requests.Response | str = self.submit(self.to_provider(), login=login, password="any")
        for _ in range(3):  # the consent page, and any further prompt
            if isinstance(step, str):
                return step
            assert step.status_code == 200, step.text
            step = self.submit(step)
        raise AssertionError(f"the provider never sent the browser back: {step}")

    def callback(self, url: str) -> requests.Response:
        return self.http.get(url, allow_redirects=False, timeout=10)

    def session(self) -> requests.Response:
        return self.http.get(f"{self.sso.web.url}/api/session", headers={"Accept": "application/json"}, timeout=10)
