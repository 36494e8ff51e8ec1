"""Serve the web app with waitress: ``fleet web`` and a background-thread variant for tests and ``fleet up``."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from waitress.server import create_server

from fleet.config.settings import Settings, local_host
from fleet.store.database import open_database
from fleet.store.pepper import key_pepper
from fleet.web.app import create_app
from fleet.web.errors import WebError
from fleet.web.session import SIGN_IN_MAX

log = logging.getLogger("fleet.web")
API_THREADS = 8  # threads for the API; sign-ins waiting for their password check hold up to SIGN_IN_MAX more


def _server(settings: Settings) -> tuple[Any, Flask]:
    with open_database(settings.database) as db:  # create or migrate the schema before serving
        # Keys verify against the database alone; a database whose keys cannot be verified here stops us now,
        # with the reason, rather than every request later.
        pepper = key_pepper(db, settings.data_dir)
    app = create_app(settings)
    app.config["FLEET_PEPPER"] = pepper
    try:
        # poll(), not select(): in `fleet up` the broker's connections push socket numbers past FD_SETSIZE (1024).
        return create_server(app, host=settings.host, port=settings.http_port, threads=API_THREADS + SIGN_IN_MAX,
                             asyncore_use_poll=True, ident="fleet", clear_untrusted_proxy_headers=True), app
    except OSError as exc:
        raise WebError(f"cannot listen on {settings.host}:{settings.http_port}: {exc.strerror or exc}") from exc


@dataclass
class RunningWeb:
    """A waitress server running in a background thread."""

    host: str
    port: int
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _app: Flask = field(repr=False)

    @property
    def url(self) -> str:
        """Base URL of the app."""
        return f"http://{local_host(self.host)}:{self.port}"

    def stop(self) -> None:
        """Stop accepting, let running requests finish, close every connection (idempotent)."""
        server = self._server
        server.task_dispatcher.shutdown(timeout=5)
        for channel in list(server._map.values()):  # noqa: SLF001 - waitress has no public way to close its channels
            channel.close()
        self._thread.join(10)
        self._app.config["FLEET_DB_POOL"].close()
        self._app.config["FLEET_DB_WRITE_POOL"].close()


def start_in_thread(settings: Settings) -> RunningWeb:
    """Start serving in a thread; ``http_port`` 0 picks a free port (read back in ``.port``)."""
    server, app = _server(settings)
    thread = threading.Thread(target=server.run, name="fleet-web", daemon=True)
    thread.start()
    port = server.effective_port
    log.info("web listening on http://%s:%s", settings.host, port)
    return RunningWeb(settings.host, port, server, thread, app)


def serve(settings: Settings) -> None:
    """``fleet web``: serve until SIGINT/SIGTERM."""
    running = start_in_thread(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"dashboard: {running.url}/", flush=True)
    stop.wait()
    running.stop()
