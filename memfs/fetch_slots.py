"""Read slots with priority: demand reads go before prefetch reads.

The fetcher bounds how many disk reads are in flight; a prefetch read that
wants a slot waits while a demand read is waiting for one, unless a demand
read waits for that very prefetch (its flight is ``urgent``).
"""

from __future__ import annotations

from typing import Protocol

import trio


class Urgent(Protocol):
    """What a prefetch read tells the slots about its fetch."""
    urgent: bool


class Slots:
    """``slots`` read slots; demand first."""

    def __init__(self, slots: int) -> None:
        self._limiter = trio.CapacityLimiter(slots)
        self._demand_waiting = 0
        self._demand_idle = trio.Condition()
        self._parked = 0  # prefetch reads waiting on _demand_idle

    def statistics(self) -> trio.CapacityLimiterStatistics:
        """The limiter's: who holds and who waits (tests)."""
        return self._limiter.statistics()

    def release(self) -> None:
        self._limiter.release()

    def try_acquire(self, prefetch: bool) -> bool:
        """A free slot at once (none is waited for), if priority allows."""
        if prefetch and self._demand_waiting:
            return False
        try:
            self._limiter.acquire_nowait()  # fair: fails while anyone waits
        except trio.WouldBlock:
            return False
        return True

    async def acquire(self, prefetch: bool, flight: Urgent | None = None) -> None:
        """A slot; demand reads first (and a prefetch a demand read waits for)."""
        if prefetch:
            async with self._demand_idle:
                self._parked += 1
                try:
                    while self._demand_waiting and not (flight is not None and flight.urgent):
                        await self._demand_idle.wait()
                finally:
                    self._parked -= 1
            await self._limiter.acquire()
            return
        self._demand_waiting += 1
        try:
            await self._limiter.acquire()
        finally:
            self._demand_waiting -= 1
            if not self._demand_waiting and self._parked:
                with trio.CancelScope(shield=True):  # a cancelled demand still wakes them
                    async with self._demand_idle:
                        self._demand_idle.notify_all()

    async def wake_parked(self) -> None:
        """A parked prefetch read may now be urgent: let it look again."""
        async with self._demand_idle:
            self._demand_idle.notify_all()
