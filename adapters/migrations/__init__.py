"""The store's schema history, as Alembic revisions in `versions/`.

Every process brings the database to the latest revision when it opens the store: one at
a time (SQLite: the write lock; PostgreSQL: an advisory lock), a no-op once done. A fleet
can run it once before its replicas start (a Kubernetes init step): `python -m
service.migrate`.

A new revision: `python -m adapters.migrations revision "what changes"` writes its file;
revisions only add (columns with defaults, tables), so that replicas of the previous
release keep working during a rolling update.
"""

from __future__ import annotations

import sys
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

# pg_advisory_xact_lock's key: any constant that no other application on the server uses.
MIGRATION_LOCK = 0x67726166  # "graf"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    return config


def latest_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "the revisions have one head"
    return head


def upgrade(writer: sa.Engine) -> None:
    """Brings the database of `writer` (an engine whose transactions take the write lock)
    to the latest revision, in one transaction."""
    config = _config()
    with writer.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def main(argv: list[str]) -> None:
    if argv[:1] != ["revision"]:
        sys.exit('usage: python -m adapters.migrations revision "what changes"')
    command.revision(_config(), message=" ".join(argv[1:]) or None)


if __name__ == "__main__":
    main(sys.argv[1:])
