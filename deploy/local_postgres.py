"""A real PostgreSQL server from Debian's packages, in a temporary directory, on a free
loopback port (the local fleet, the tests and benchmarks). Nothing outside the directory is
touched; the server is stopped and the directory removed at the end.

PostgreSQL refuses to run as root: as root (this machine's CI), its programs run as the
`postgres` user that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from deploy.local_server import free_port

# Debian installs the programs under a versioned folder, off the PATH.
_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _program(name: str) -> str:
    for folder in _BIN_DIRS:
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: apt-get install postgresql")
    return found


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def create_database(server_url: str) -> str:
    """A new, empty database on the server of `server_url`; its SQLAlchemy URL."""
    name = f"graft_{uuid.uuid4().hex[:12]}"
    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


@contextlib.contextmanager
def postgres(database: str = "graft") -> Iterator[str]:
    """Starts a server and yields a SQLAlchemy URL of a new, empty database on it."""
    folder = Path(tempfile.mkdtemp(prefix="graft-postgres-"))
    data = folder / "data"
    user = "postgres" if os.geteuid() == 0 else getpass.getuser()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    try:
        subprocess.run(
            _as_server_user(
                [_program("initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
            text=True,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
        subprocess.run(
            _as_server_user(
                [_program("pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"),
                 "-w", "start"]
            ),
            check=True,
            capture_output=True,
            text=True,
        )  # fmt: skip
        try:
            subprocess.run(
                _as_server_user(
                    [_program("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user,
                     database]
                ),
                check=True,
            capture_output=True,
            text=True,
            )  # fmt: skip
            yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/{database}"
        finally:
            subprocess.run(
                _as_server_user([_program("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                capture_output=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
