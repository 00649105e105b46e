"""Single flight: which fetch is reading a page now, and fetched pages whose
store write has not landed yet.

A page is read from the disk by one fetch at a time.  The fetcher sorts the
pages it is asked for into those it can answer from held bytes, those it
reads itself (a new flight) and those it joins (another fetch's flight); the
bookkeeping is here, the policy (who asks the disk again) in the fetcher.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import trio


class Flight:
    """Pages one fetch is reading; the others that want them wait on ``done``."""

    __slots__ = ("prefetch", "urgent", "done", "got", "reason", "finished")

    def __init__(self, prefetch: bool) -> None:
        self.prefetch = prefetch
        #: a demand fetch waits for it: its reads go at demand priority
        self.urgent = not prefetch
        self.done = trio.Event()
        self.got: dict[int, memoryview] = {}
        self.reason = "cancelled"
        self.finished = False  # False at ``done``: cancelled, ask again


class Flights:
    """Per region: the flight reading each page, and the held pages."""

    def __init__(self) -> None:
        #: region -> page -> the fetch reading it now
        self.flights: dict[str, dict[int, Flight]] = {}
        #: region -> page -> fetched bytes whose store write has not landed
        self.held: dict[str, dict[int, memoryview]] = {}

    def sort(self, region: str, pages: Sequence[int]
             ) -> tuple[dict[int, memoryview], list[int], dict[Flight, list[int]]]:
        """(held pages with their bytes, pages nobody reads, flight -> its
        pages among ``pages``)."""
        flights = self.flights.setdefault(region, {})
        held = self.held.setdefault(region, {})
        good: dict[int, memoryview] = {}
        mine: list[int] = []
        joined: dict[Flight, list[int]] = {}
        for p in pages:
            data = held.get(p)
            if data is not None:
                good[p] = data
                continue
            f = flights.get(p)
            if f is None:
                mine.append(p)
            else:
                joined.setdefault(f, []).append(p)
        return good, mine, joined

    def start(self, region: str, pages: Sequence[int], prefetch: bool) -> Flight:
        """A new flight that reads ``pages`` (nobody else does)."""
        flight = Flight(prefetch)
        flights = self.flights.setdefault(region, {})
        for p in pages:
            flights[p] = flight
        return flight

    def land(self, region: str, flight: Flight, got: dict[int, memoryview]) -> None:
        """``flight`` read and verified ``got``: its joiners take them, and
        they are held until settled."""
        flight.got = got
        flight.finished = True
        self.held.setdefault(region, {}).update(got)

    def end(self, region: str, pages: Sequence[int], flight: Flight) -> None:
        """``flight`` is over (landed, failed or cancelled): wake its joiners."""
        flights = self.flights.get(region, {})
        for p in pages:
            if flights.get(p) is flight:
                del flights[p]
        flight.done.set()

    def settled(self, region: str, pages: Iterable[int]) -> None:
        held = self.held.get(region)
        if held:
            for p in pages:
                held.pop(p, None)

    def in_flight(self, region: str) -> int:
        return len(self.flights.get(region, ()))
