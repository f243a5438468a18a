"""`python -m service.migrate`: brings the store of GRAFT_DATABASE_URL (or the data
directory's SQLite file) to the latest revision, as every process does when it opens it; a
fleet runs it once before its replicas start (deploy/kubernetes, an init container)."""

from __future__ import annotations

import sqlalchemy as sa

from adapters.store import Store
from service.settings import Settings


def main() -> None:
    settings = Settings()
    Store(settings.database_url).close()  # opening it migrates it
    shown = sa.make_url(settings.database_url).render_as_string(hide_password=True)
    print(f"the store at {shown} is at the latest revision")


if __name__ == "__main__":
    main()
