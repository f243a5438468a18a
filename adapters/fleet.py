"""This replica among the others: its heartbeat, and how many replicas are alive.

Every API worker writes its replica's heartbeat every HEARTBEAT_S; a replica not heard
from for ALIVE_S is gone (a stopped one too: it is not removed at once, so for ALIVE_S
the others' shares stay smaller, never larger, than they should). Each API worker counts
the live replicas as often, and holds a tenant to its replica's share of the fleet-wide
rate limit (service/limits.py).
"""

from __future__ import annotations

from collections.abc import Callable

from adapters.coherence import Every
from adapters.store import Store

HEARTBEAT_S = 5.0
ALIVE_S = 3 * HEARTBEAT_S


class Heartbeat(Every):
    """This replica is alive (written by each of its API workers, to one row)."""

    def __init__(self, store: Store, replica_id: str) -> None:
        super().__init__(
            lambda: store.heartbeat(replica_id=replica_id), HEARTBEAT_S, "graft-heartbeat"
        )


class FleetSize(Every):
    """An API worker's count of the live replicas, kept current on a thread."""

    def __init__(self, store: Store, on_change: Callable[[int], None]) -> None:
        self.replicas = 1

        def count() -> None:
            live = store.live_replicas(within_s=ALIVE_S)
            if live != self.replicas:
                self.replicas = live
                on_change(live)

        super().__init__(count, HEARTBEAT_S, "graft-fleet-size")
