"""A throwaway PostgreSQL server, from Debian's server binaries, for the tests and the bench.

PostgreSQL refuses to run as root, and CI runs as root: then the cluster lives in a
temporary folder owned by ``nobody`` (uid/gid 65534) and every server command runs through
``setpriv`` as that user. It listens on 127.0.0.1 only, on a free port, with its socket in
its own folder. The tests (``tests/conftest.py``) and ``make bench`` (``bench/runner.py``)
both use it; it lives here, outside the shipped packages.

The bench may pin the server to CPUs (``cpus="0"``): every server command then runs under
``taskset``, and the postmaster and its backends inherit the affinity.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bindir", "free_port"]

NOBODY = 65534
BINARIES_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing or the server would not start."""


def find_bindir() -> Path:
    """The newest Debian PostgreSQL server binary folder, or a loud reason why not."""
    found = [Path(d) for d in glob.glob(BINARIES_GLOB) if os.access(Path(d) / "initdb", os.X_OK)]
    if not found:
        raise PostgresUnavailable(
            f"PostgreSQL server binaries not found ({BINARIES_GLOB}/initdb): `make test` "
            "installs Debian's postgresql package, or run `apt-get install postgresql`")

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.name))

    return max(found, key=version)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder: init, start, stop, remove."""

    def __init__(self, *, durable: bool = True, cpus: str | None = None) -> None:
        self.bindir = find_bindir()
        self.durable = durable
        self.cpus = cpus
        self.root = Path(tempfile.mkdtemp(prefix="ticketbooth-pg-"))
        self.as_nobody = os.geteuid() == 0
        if self.as_nobody:
            os.chown(self.root, NOBODY, NOBODY)
        os.chmod(self.root, 0o700)
        self.data = self.root / "data"
        self.port = 0
        self._names = itertools.count(1)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bindir / program), *args]
        if self.as_nobody:
            command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                       *command]
        if self.cpus is not None:
            command = ["taskset", "-c", self.cpus, *command]
        return command

    def _run(self, program: str, *args: str, timeout: float = 60) -> str:
        command = self._command(program, *args)
        result = subprocess.run(command, cwd="/", capture_output=True, text=True,
                                timeout=timeout, check=False)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{program} failed ({result.returncode}): "
                                      f"{result.stderr.strip()}\n{self.log_tail()}")
        return result.stdout

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "log").read_text().splitlines()[-lines:])
        return ""

    def start(self) -> None:
        """Start the server (on a new free port the first time); returns once it accepts."""
        options = [f"-c listen_addresses=127.0.0.1 -k {self.root}"]
        if not self.durable:  # the shared test cluster: speed over crash safety
            options.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        for _attempt in range(3):  # a free port can be taken before the server binds it
            port = self.port or free_port()
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"),
                          "-o", f"-p {port} " + " ".join(options), "-w", "-t", "30", "start")
            except PostgresUnavailable:
                if self.port:
                    raise
                continue
            self.port = port
            return
        raise PostgresUnavailable(f"PostgreSQL would not start:\n{self.log_tail()}")

    def stop(self) -> None:
        """Fast shutdown: running transactions are rolled back, connections cut."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def is_running(self) -> bool:
        command = self._command("pg_ctl", "-D", str(self.data), "status")
        return subprocess.run(command, cwd="/", capture_output=True, timeout=30,
                              check=False).returncode == 0

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"tb_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def remove(self) -> None:
        """Stop the server if it runs, and delete its folder."""
        try:
            if self.is_running():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
