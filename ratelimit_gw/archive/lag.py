"""Every instance's view of the archive's lag (``rlgw_archive_lag_seconds``).

The archiver records in storage up to when the archive is complete; every instance with an
``[archive]`` reads it each ``interval_s``. So the lag grows on every instance when no
archiver runs at all (each died, or none was started), which is what the alert is for.
"""

from __future__ import annotations

import asyncio
import time

from ..keyspace import ARCHIVE_PROGRESS
from ..metrics import Metrics
from ..storage import Storage, StorageError


async def complete_until_ms(storage: Storage) -> int | None:
    value = await storage.call("HGET", ARCHIVE_PROGRESS, "complete_until_ms")
    return None if value is None else int(value)


async def follow_lag(storage: Storage, metrics: Metrics, interval_s: float) -> None:
    """Until cancelled: the gauge set from storage every ``interval_s``."""
    started = time.time()
    while True:
        try:
            until = await complete_until_ms(storage)
        except StorageError:
            until = -1  # storage down: the gauge keeps its last reading
        if until is None:
            # Nothing archived yet (or a wiped Redis): behind since this process started.
            metrics.archive_lag.set(time.time() - started)
        elif until >= 0:
            metrics.archive_lag.set(max(0.0, time.time() - until / 1000))
        await asyncio.sleep(interval_s)
