"""The replicas alive: a heartbeat each, written by its runner (a fleet's rate limits)."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from adapters.store.engine import Database
from adapters.store.tables import replicas


class Replicas(Database):
    def heartbeat(self, *, replica_id: str) -> None:
        dialect = postgresql if self._postgres else sqlite
        now = time.time()
        insert = dialect.insert(replicas).values(id=replica_id, seen_at=now)
        with self._tx() as db:
            db.execute(insert.on_conflict_do_update(index_elements=["id"], set_={"seen_at": now}))

    def live_replicas(self, *, within_s: float) -> int:
        """Replicas whose heartbeat is at most `within_s` old (this one at least)."""
        query = sa.select(sa.func.count()).where(replicas.c.seen_at > time.time() - within_s)
        with self._read() as db:
            return max(1, db.scalar(query.select_from(replicas)) or 0)
