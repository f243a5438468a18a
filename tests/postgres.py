"""Under `pytest --database postgresql` the suite starts one PostgreSQL server
(deploy/local_postgres.py) and every store and Graft server of the tests gets a database
of its own on it (`database_for`)."""

from __future__ import annotations

import os
from pathlib import Path

from deploy.local_postgres import create_database

# Set while the suite runs on PostgreSQL: the server's maintenance database.
SUITE_SERVER = "GRAFT_TEST_POSTGRES_URL"


def database_for(data_dir: Path) -> str | None:
    """The database of a test's data directory while the suite runs on PostgreSQL (made
    once, so a restarted server finds its data again); None on SQLite (the default file
    in the data directory)."""
    server_url = os.environ.get(SUITE_SERVER)
    if server_url is None:
        return None
    data_dir.mkdir(parents=True, exist_ok=True)
    remembered = data_dir / "database_url"
    if not remembered.exists():
        remembered.write_text(create_database(server_url))
    return remembered.read_text()
