"""A throwaway PostgreSQL server for tests and benchmarks, from Debian's ``postgresql`` package.

``initdb`` in a temporary directory, ``postgres`` on a free loopback port (password authentication over
TCP, as a deployment would use it), run as the ``postgres`` user when we are root (PostgreSQL refuses to
run as root). ``python -m tests.postgres`` starts one and prints a URL until Ctrl-C (for bench/ingest.py).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import free_port, wait_for

APP_USER = "fleet"
TEST_DB = "fleet_tests"


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (FLEET_PG_BIN overrides), or None."""
    override = os.environ.get("FLEET_PG_BIN")
    candidates = [Path(override)] if override else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True)
    for path in candidates:
        if (path / "initdb").exists() and (path / "postgres").exists():
            return path
    return None


def unavailable_reason() -> str | None:
    """Why a test server cannot run here, or None when it can."""
    if find_bin_dir() is None:
        return "PostgreSQL binaries not found (apt-get install postgresql, or set FLEET_PG_BIN)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    return None


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory; ``database()`` hands out fresh, empty databases.

    Each "database" is a schema of its own in one database, reached through a URL whose ``options`` put
    it first on the search path: creating one takes milliseconds, where CREATE DATABASE takes a
    checkpoint (a quarter of a second on a busy machine, for every test).
    """

    def __init__(self) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(unavailable_reason())
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.admin_password = secrets.token_urlsafe(16)
        self.app_password = secrets.token_urlsafe(16)
        self.proc: subprocess.Popen | None = None
        self._admin = None
        self._as_user: dict = {}
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.admin_password + "\n")
        if self._as_user:
            os.chown(pwfile, self._as_user["user"], self._as_user["group"])
        subprocess.run([str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                        "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8",
                        "--locale=C.UTF-8"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       **self._as_user)
        pwfile.unlink()

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> PostgresServer:
        """Start the server and wait until it accepts connections."""
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(self.root), "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200",
             "-c", "shared_buffers=32MB"], stdout=log, stderr=log, stdin=subprocess.DEVNULL, **self._as_user)
        log.close()
        wait_for(self._accepts, timeout=30, message=f"PostgreSQL on port {self.port} (log: {self.root}/postgres.log)",
                 interval=0.05)
        if not self.admin(f"SELECT 1 FROM pg_roles WHERE rolname = '{APP_USER}'", "postgres"):
            self.admin(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{self.app_password}'", "postgres")
            self.admin(f"CREATE DATABASE {TEST_DB} OWNER {APP_USER}", "postgres")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (SIGINT: sessions cut, clean) or ``immediate`` (SIGQUIT: crash recovery next)."""
        proc, self.proc = self.proc, None
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port."""
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        """Stop the server and delete its files."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- SQL -------------------------------------------------------------------------------------
    def url(self, dbname: str = "postgres", user: str = APP_USER) -> str:
        """A ``postgresql://`` URL for ``dbname``, as the app user (or the superuser)."""
        password = self.admin_password if user == "postgres" else self.app_password
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, sql: str, dbname: str = TEST_DB) -> list[tuple]:
        """Run one statement as the superuser (autocommit) in ``dbname``."""
        import psycopg

        if dbname != TEST_DB:
            with psycopg.connect(self.url(dbname, "postgres"), autocommit=True, connect_timeout=5) as conn:
                cursor = conn.execute(sql)
                return cursor.fetchall() if cursor.description else []
        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(self.url(TEST_DB, "postgres"), autocommit=True, connect_timeout=5)
            self._admin.execute("SET lock_timeout = '5s'")
        cursor = self._admin.execute(sql)
        return cursor.fetchall() if cursor.description else []

    def database(self) -> str:
        """Create a fresh, empty database (a schema of its own) for the app user; returns its URL."""
        name = "t_" + secrets.token_hex(6)
        self.admin(f"CREATE SCHEMA {name} AUTHORIZATION {APP_USER}")
        return f"{self.url(TEST_DB)}?options=-csearch_path%3D{name}"

    def drop(self, url: str) -> None:
        """Drop a database made by ``database()``; one a client still locks is left for destroy()."""
        import psycopg

        try:
            self.admin(f"DROP SCHEMA IF EXISTS {url.rsplit('%3D', 1)[1]} CASCADE")
        except psycopg.Error:
            pass

    def _accepts(self) -> bool:
        import psycopg

        if self.proc is not None and self.proc.poll() is not None:
            log = (self.root / "postgres.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"postgres exited with {self.proc.returncode}: {log}")
        try:
            psycopg.connect(self.url(user="postgres"), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True



def main() -> None:
    """Start a server, print the URLs of N empty databases (argument, default 1), and run until Ctrl-C."""
    server = PostgresServer().start()
    try:
        for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
            print(server.database(), flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.destroy()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
