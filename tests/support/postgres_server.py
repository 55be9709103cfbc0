"""A throwaway PostgreSQL cluster for the tests: ``initdb`` in a temporary folder, ``postgres`` on a free port.

PostgreSQL refuses to run as root; as root the cluster belongs to the ``postgres`` user (Debian's
``postgresql`` package makes it) and its commands run through ``runuser``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
"""Debian keeps the server binaries off PATH, one folder per major version; the newest first."""


def find_binary(name: str) -> str | None:
    for folder in BIN_DIRS:
        if (folder / name).exists():
            return str(folder / name)
    return shutil.which(name)


class PostgresServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="lipsync-pg-"))
        self.data = self.root / "data"
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.url = f"postgresql+psycopg://{self.user}@127.0.0.1:{port}/postgres"

    def _run(self, *command: str) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *command], check=True, capture_output=True, text=True)

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run(find_binary("initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync")
        return self.resume()

    def halt(self) -> None:
        """Shut the server down as an administrator would (``pg_ctl stop -m fast``: open sessions are ended),
        keeping the cluster for :meth:`resume`."""
        self._run(find_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> PostgresServer:
        """Start the server on the cluster and port it had; returns once it takes connections."""
        self._run(
            find_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "start", "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -c fsync=off"
            " -c max_connections=200",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres").close()
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def new_database(self, name: str) -> str:
        """An empty database; returns its SQLAlchemy URL."""
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres", autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        try:
            self._run(find_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
